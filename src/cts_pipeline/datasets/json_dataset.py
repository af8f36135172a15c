"""``JSONDataset``: kedro-datasets' JSON dataset with an atomic save (metrics are read back by reports)."""

from __future__ import annotations

import json
from typing import Any

from kedro.io.core import get_filepath_str
from kedro_datasets._typing import JSONPreview
from kedro_datasets.json import JSONDataset as _KedroJSONDataset

from ._atomic import atomic_write
from ._records import RecordedArtifact


class JSONDataset(RecordedArtifact, _KedroJSONDataset):
    """Same options as ``kedro_datasets.json.JSONDataset``; the file appears only once complete."""

    def preview(self) -> JSONPreview:  # kedro-viz picks its widget by this annotation
        """kedro-viz's preview: the top-level numbers, strings and flags (a metrics file's per-epoch
        histories would bury them), floats to four decimals."""
        data = self.load.__wrapped__(self)
        if isinstance(data, dict):
            data = {k: round(v, 4) if isinstance(v, float) else v for k, v in data.items()
                    if isinstance(v, str | int | float | bool) or v is None}
        return JSONPreview(json.dumps(data, indent=2))

    def save(self, data: Any) -> None:
        path = get_filepath_str(self._get_save_path(), self._protocol)
        text = json.dumps(data, **self._save_args)
        atomic_write(self._fs, path, text.encode("utf-8"))
        self._invalidate_cache()

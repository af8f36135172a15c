"""``JSONDataset``: kedro-datasets' JSON dataset with an atomic save (metrics are read back by reports)."""

from __future__ import annotations

import json
from typing import Any

from kedro.io.core import get_filepath_str
from kedro_datasets.json import JSONDataset as _KedroJSONDataset

from ._atomic import atomic_write


class JSONDataset(_KedroJSONDataset):
    """Same options as ``kedro_datasets.json.JSONDataset``; the file appears only once complete."""

    def save(self, data: Any) -> None:
        path = get_filepath_str(self._get_save_path(), self._protocol)
        text = json.dumps(data, **self._save_args)
        atomic_write(self._fs, path, text.encode("utf-8"))
        self._invalidate_cache()

"""``JSONDataset``: kedro-datasets' JSON dataset with an atomic save (metrics are read back by reports)."""

from __future__ import annotations

import json
from typing import Any

from kedro.io.core import get_filepath_str
from kedro_datasets._typing import JSONPreview
from kedro_datasets.json import JSONDataset as _KedroJSONDataset

from ._atomic import atomic_write
from ._records import RecordedArtifact

# What a metrics preview leads with: the result, then what it is a result of.
PREVIEW_FIRST = ("test_accuracy", "method", "target_sparsity", "sparsity", "achieved_sparsity", "seed", "kept_weights",
                 "effective_kept_weights", "dense_test_accuracy", "diverged")


def preview_of(data: dict[str, Any]) -> dict[str, Any]:
    """A metrics or manifest dict as kedro-viz shows it: the top-level numbers, strings and flags
    (the per-epoch histories would bury them), the result first, floats to four decimals, the
    stage times in seconds to one, and Unix times (``*_at``) as local date and time."""
    import time

    out: dict[str, Any] = {}
    for key in [k for k in PREVIEW_FIRST if k in data] + [k for k in data if k not in PREVIEW_FIRST]:
        value = data[key]
        if key.endswith("_at") and isinstance(value, int | float) and value > 1e9:
            out[key] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
        elif key == "seconds" and isinstance(value, dict):
            out[key] = {k: round(v, 1) for k, v in value.items() if isinstance(v, int | float)}
        elif isinstance(value, float):
            out[key] = round(value, 4)
        elif isinstance(value, str | int | bool) or value is None:
            out[key] = value
    return out


class JSONDataset(RecordedArtifact, _KedroJSONDataset):
    """Same options as ``kedro_datasets.json.JSONDataset``; the file appears only once complete."""

    def preview(self) -> JSONPreview:  # kedro-viz picks its widget by this annotation
        """kedro-viz's preview: the top-level numbers, strings and flags (a metrics file's per-epoch
        histories would bury them), floats to four decimals."""
        data = self.load.__wrapped__(self)
        if isinstance(data, dict):
            data = preview_of(data)
        return JSONPreview(json.dumps(data, indent=2))

    def save(self, data: Any) -> None:
        path = get_filepath_str(self._get_save_path(), self._protocol)
        text = json.dumps(data, **self._save_args)
        atomic_write(self._fs, path, text.encode("utf-8"))
        self._invalidate_cache()

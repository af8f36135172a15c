"""kedro-datasets' CSV and matplotlib datasets with an atomic save: a full disk or a killed run
never leaves a truncated table or image under its final name (their own save writes in place)."""

from __future__ import annotations

import io

import pandas as pd
from kedro.io.core import get_filepath_str
from kedro_datasets._typing import TablePreview
from kedro_datasets.matplotlib import MatplotlibDataset as _KedroMatplotlibDataset
from kedro_datasets.pandas import CSVDataset as _KedroCSVDataset
from matplotlib.figure import Figure

from ._atomic import atomic_write
from ._records import RecordedArtifact

# The columns a results table's preview leads with, where it has them.
PREVIEW_FIRST = ("method", "target_sparsity_pct", "seed", "test_accuracy", "test_accuracy_mean", "test_accuracy_std",
                 "accuracy_drop", "achieved_sparsity_pct", "kept_weights", "total_s")


class CSVDataset(RecordedArtifact, _KedroCSVDataset):
    """Same options as ``kedro_datasets.pandas.CSVDataset``; the file appears only once complete.
    kedro-viz's preview rounds to two decimals (a CSV's floats read back as 89.25999999999999)."""

    def preview(self, nrows: int = 60) -> TablePreview:  # kedro-viz picks its widget by this annotation
        """Every row of a small table (a sweep's results: a few dozen), the columns a comparison
        reads first leading (method, sparsity, seed, test accuracy), floats to two decimals."""
        table = self._copy(_load_args={**self._load_args, "nrows": nrows}).load()
        first = [c for c in PREVIEW_FIRST if c in table]
        table = table[first + [c for c in table if c not in first]]
        return TablePreview(table.round(2).to_dict(orient="split"))

    def save(self, data: pd.DataFrame) -> None:
        path = get_filepath_str(self._get_save_path(), self._protocol)
        atomic_write(self._fs, path, data.to_csv(**self._save_args).encode("utf-8"))
        self._invalidate_cache()


class MatplotlibDataset(RecordedArtifact, _KedroMatplotlibDataset):
    """Same options as ``kedro_datasets.matplotlib.MatplotlibDataset``; each image is written whole.

    Loading gives the PNG's bytes (kedro-datasets' version cannot load), so a process that did not
    draw the figure (the driver of a distributed run) can still hand it to MLflow.
    """

    def load(self) -> bytes:
        path = get_filepath_str(self._get_load_path(), self._protocol)
        with self._fs.open(path, "rb") as f:
            return f.read()

    def _save_to_fs(self, full_key_path: str, plot: Figure) -> None:
        buffer = io.BytesIO()
        plot.savefig(buffer, **self._save_args)
        atomic_write(self._fs, full_key_path, buffer.getvalue())

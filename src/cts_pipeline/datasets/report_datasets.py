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


class CSVDataset(RecordedArtifact, _KedroCSVDataset):
    """Same options as ``kedro_datasets.pandas.CSVDataset``; the file appears only once complete.
    kedro-viz's preview rounds to two decimals (a CSV's floats read back as 89.25999999999999)."""

    def preview(self, nrows: int = 5) -> TablePreview:  # kedro-viz picks its widget by this annotation
        table = self._copy(_load_args={**self._load_args, "nrows": nrows}).load()
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

"""Kedro datasets for this project's artifacts: torch tensors, JSON, CSV tables and figures, all
written atomically."""

from .json_dataset import JSONDataset
from .report_datasets import CSVDataset, MatplotlibDataset
from .torch_dataset import TorchDataset

__all__ = ["CSVDataset", "JSONDataset", "MatplotlibDataset", "TorchDataset"]

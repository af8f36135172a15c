"""Kedro datasets for this project's artifacts: torch tensors and JSON, written atomically."""

from .json_dataset import JSONDataset
from .torch_dataset import TorchDataset

__all__ = ["JSONDataset", "TorchDataset"]

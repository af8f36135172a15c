"""Kedro datasets for this project's artifacts: torch tensors, tickets (safetensors), JSON, CSV
tables and figures, all written atomically."""

from .json_dataset import JSONDataset
from .report_datasets import CSVDataset, MatplotlibDataset
from .ticket_dataset import TicketDataset
from .torch_dataset import TorchDataset

__all__ = ["CSVDataset", "JSONDataset", "MatplotlibDataset", "TicketDataset", "TorchDataset"]

"""Someone's own data as the loops take it (``find_ticket``, ``Ticket.retrain``): tensors held as
one :class:`~.splits.Split`, or a ``DataLoader`` read batch by batch in every epoch, never gathered.

Their inputs are what their model takes, of any shape (``[N, features]``, sequences, images): no
scaling, no normalisation, no augmentation; only made float32 on the model's device.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .registry import DatasetInfo
from .splits import Split


def inputs_info(sample_shape: tuple[int, ...], classes: int) -> DatasetInfo:
    """What the loops need to know of data that comes ready for the model: its sample shape and
    class count (no statistics, no normaliser)."""
    return DatasetInfo("user data", tuple(sample_shape), classes, (), (), 1.0, "user", inputs_ready=True)


def tensor_split(inputs: torch.Tensor, labels: torch.Tensor, classes: int, device: torch.device) -> Split:
    return Split(images=inputs.to(device, torch.float32), labels=labels.to(device, torch.int64),
                 info=inputs_info(tuple(inputs.shape[1:]), classes))


def is_streamable(data: Any) -> bool:
    """A loader the loops can read per epoch: batches of a fixed ``batch_size`` and a length in
    batches, as a ``torch.utils.data.DataLoader`` over a map-style dataset has."""
    try:
        return isinstance(getattr(data, "batch_size", None), int) and len(data) > 0
    except TypeError:  # an IterableDataset's loader has no length
        return False


@dataclass
class LoaderSplit:
    """A ``DataLoader`` as a split: what the loops use of one (``len``, ``device``, ``info``,
    batches through ``iterate_batches``), reading the loader afresh in every epoch.

    The loader's own order and batches are used (its sampler shuffles, or not); the search's
    seeded order applies to tensors only. ``len`` is the loader's batches times its batch size:
    the loops plan their steps from it, one per batch.
    """

    loader: Any
    info: DatasetInfo
    device: torch.device

    streamed = True  # batches come from outside; under DDP each rank's loader gives its own part

    def __len__(self) -> int:
        return len(self.loader) * self.loader.batch_size

    def batches(self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
                augment: bool = False, drop_last: bool = False,
                parts: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if parts > 1:  # its batches are its own: this split cannot pad an epoch for several ranks
            raise ValueError(f"a DataLoader's batches cannot be dealt to {parts} ranks; its sampler must "
                             "shard them (DistributedSampler), one process per rank")
        if batch_size != self.loader.batch_size:
            raise ValueError(f"the loader gives batches of {self.loader.batch_size}, the loop asked for {batch_size}")
        for inputs, labels in self.loader:
            yield inputs.to(self.device, torch.float32), labels.to(self.device, torch.int64)

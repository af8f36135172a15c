"""The epochs of one long loop, with what every such loop needs besides its own step.

Dense training (:func:`.loop.train`), stacked retraining (:func:`.batched.train_tickets`)
and the search (:func:`.cts.search.concrete_search`) differ in what one epoch computes, and in
nothing else: each resumes from a matching checkpoint, shows a progress bar, times its epochs,
saves its state after an epoch, logs one record per epoch for the live display, and lets the
checkpoint go once it is done. This module is that shared part, written once; the loops call it
around their own epoch body (OpenLTH's trainer has the same shape, with these as callbacks).

A loop uses it as::

    loop = EpochLoop(stage, first=start, end=end, total=recipe.epochs, checkpoint=checkpoint)
    loop.resume(restore)                # restore(saved) puts the saved state back, or declines
    for epoch in loop:                  # the progress bar; each epoch timed from here
        ...                             # the epoch's own work
        seconds = loop.seconds()        # its training wall-clock, before any evaluation
        loop.end_epoch(epoch, state, message)   # checkpoint (if due) and the log record
    loop.finish()                       # the loop is complete: its checkpoint may go
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from tqdm.auto import tqdm

from ..artifacts.checkpoints import Checkpoint
from ..device.distributed import rank_and_world

logger = logging.getLogger(__name__)


class EpochLoop:
    """Epochs ``first … end − 1`` of a schedule of ``total`` epochs, for the loop named ``stage``.

    With ``checkpoint``, the state is saved after an epoch when the checkpoint's interval says so
    (every epoch by default; never after the last), by rank 0 alone in a process group (every rank
    resumes from what rank 0 read), and :meth:`resume` picks a matching one up.
    Epochs are counted from 0; a record's and a checkpoint's ``epochs_done`` from 1.
    """

    def __init__(self, stage: str, *, first: int, end: int, total: int, checkpoint: Checkpoint | None = None,
                 progress: bool = True):
        self.stage, self.first, self.end, self.total = stage, first, end, total
        self.checkpoint = checkpoint
        self.progress = progress
        self._bar = None
        self._epoch_started = 0.0

    def resume(self, restore: Callable[[Mapping[str, Any]], bool | None]) -> int | None:
        """Load this loop's checkpoint, if there is one, and hand it to ``restore``, which puts the
        loop's state back (or returns False to decline a checkpoint it cannot use; it then logs why).
        Returns the epochs already done, and starts the loop after them; None when starting afresh."""
        saved = self.checkpoint.load() if self.checkpoint is not None else None
        if saved is None or restore(saved) is False:
            return None
        self.first = int(saved["epochs_done"])
        logger.info("%s: resuming from the checkpoint after epoch %d/%d", self.stage, self.first, self.end)
        return self.first

    def __iter__(self) -> Iterator[int]:
        self._bar = tqdm(range(self.first, self.end), desc=self.stage, unit="epoch",
                         disable=not self.progress or None, leave=False)
        for epoch in self._bar:
            self._epoch_started = time.perf_counter()
            yield epoch

    def seconds(self) -> float:
        """Wall-clock since the current epoch began."""
        return time.perf_counter() - self._epoch_started

    def is_last(self, epoch: int) -> bool:
        return epoch + 1 == self.end

    def end_epoch(self, epoch: int, state: Callable[[], Mapping[str, Any]], messages: list[str] | str, *,
                  postfix: Mapping[str, str] | None = None) -> None:
        """After epoch ``epoch``: save ``state()`` if a checkpoint is due (never after the last
        epoch), then log each message with the stage and epoch as record attributes, which a
        display follows (``terminal/progress.py``)."""
        if (self.checkpoint is not None and not self.is_last(epoch) and rank_and_world()[0] == 0
                and self.checkpoint.due(self.seconds())):
            self.checkpoint.save({"epochs_done": epoch + 1, **state()})
        for message in [messages] if isinstance(messages, str) else messages:
            logger.info(message, extra={"stage": self.stage, "epoch": epoch + 1, "epochs": self.total})
        if postfix and self._bar is not None and self.progress:
            self._bar.set_postfix(**postfix)

    def finish(self) -> None:
        """The loop is complete: its checkpoint goes now, or once the caller has stored the result."""
        if self.checkpoint is not None:
            self.checkpoint.finish()

"""Fitting streamed loaders into ``/dev/shm``: DataLoader workers hand their batches to the main
process through shared memory, ``workers × prefetch`` batches at a time per loader.

15 workers × 4 batches × a 1024-image uint8 ImageNet batch is about 9 GB for one loader, and a run
keeps three (training, evaluation, search); a container's default ``/dev/shm`` is 64 MB, where
torch's workers die with "DataLoader worker … Bus error". So each loader's prefetch, then its
workers, are cut to fit a share of the free space, and a run says so in one line.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass

logger = logging.getLogger(__name__)

SHARED_MEMORY = "/dev/shm"
# The loaders one run keeps alive at once (training, evaluation, search): each may fill this share.
LOADERS_AT_ONCE = 3


@dataclass(frozen=True)
class LoaderPlan:
    workers: int
    prefetch: int  # batches each worker keeps ready

    @property
    def batches_in_flight(self) -> int:
        return self.workers * self.prefetch


def free_shared_memory(path: str = SHARED_MEMORY) -> int | None:
    """Bytes free in ``path``; None where there is no such file system (macOS, Windows)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def fit_loader(workers: int, prefetch: int, batch_bytes: int, *, what: str,
               free: int | None = None) -> LoaderPlan:
    """The workers and prefetch depth of one loader whose batches in flight fit its share of the
    free shared memory: the prefetch first (down to 1), then the workers (down to 0: read in the
    process itself, no shared memory at all). Logs one WARNING when it cuts."""
    wanted = LoaderPlan(workers, prefetch)
    free = free_shared_memory() if free is None else free
    if workers == 0 or free is None:
        return wanted
    fits = free // LOADERS_AT_ONCE // max(batch_bytes, 1)  # batches in flight this loader may hold
    if wanted.batches_in_flight <= fits:
        return wanted
    plan = (LoaderPlan(workers, max(1, fits // workers)) if fits >= workers
            else LoaderPlan(int(fits), 1) if fits >= 1 else LoaderPlan(0, prefetch))
    logger.warning(
        "%s: %d workers x %d batches of %.1f MB (%.0f MB) do not fit a third of the %.0f MB free in %s (a run "
        "keeps %d loaders); using %s (a container given more shared memory, e.g. docker run --shm-size=16g, "
        "reads faster)", what, workers, prefetch, batch_bytes / 2**20, wanted.batches_in_flight * batch_bytes / 2**20,
        free / 2**20, SHARED_MEMORY, LOADERS_AT_ONCE,
        f"{plan.workers} workers x {plan.prefetch} batches" if plan.workers else "no workers (read in this process)")
    return plan

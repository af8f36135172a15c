"""Fitting a step into device memory: a plan from a small probe, and a fallback when it was wrong.

A search step keeps the activations of its masked forward for the backward pass: about 82 GiB for
a ResNet-50 at batch 1024, three times that for three densities searched together. No rule
predicts that across models, precisions and cuDNN's choices, so a step is measured once at a small
batch (the peak it allocates above what was there), scaled to the full batch, and the batch is cut
into as many micro-batches as it takes to fit :data:`DEVICE_MEMORY_SHARE` of the free memory.
Stacked retraining, whose K tickets cannot split a batch without changing BatchNorm, caps K
instead (:func:`plan_rows`).
Where the plan is still wrong (fragmentation, another process), an out-of-memory error doubles
the micro-batches and repeats the step, with one warning.

On a CPU there is no device memory to plan for (the operating system pages), so nothing is
measured and steps run whole; the fallback still holds for any ``torch.OutOfMemoryError``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The share of the free device memory a step's planned activations may take: the rest is for
# cuDNN's workspaces, the allocator's fragmentation and what the estimate from a small batch misses.
DEVICE_MEMORY_SHARE = 0.8
PROBE_SAMPLES = 8  # the probe's batch: large enough for BatchNorm's statistics, small enough to fit anywhere


def free_bytes(device: torch.device) -> int | None:
    """Memory a step may still take on ``device`` (CUDA), or None where there is none to plan for
    (the CPU): what the driver reports free plus what PyTorch's allocator holds cached but
    unallocated (the driver counts those blocks as used; the allocator hands them out first)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free) + max(0, int(cached))


def peak_bytes(device: torch.device, step: Callable[[], object]) -> int | None:
    """The most memory ``step()`` holds at once above what was allocated before it (CUDA), or None.
    The step runs once unmeasured first: a cold call includes cuDNN's autotuning workspaces, which
    scaled by batch / probe would overstate every later step many times over."""
    if device.type != "cuda":
        return None
    step()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - before)


def _probed_peak(device: torch.device, step: Callable[[], object]) -> int | None:
    """:func:`peak_bytes` of a probe, or None where even the probe ran out of device memory (its
    cached blocks then handed back)."""
    try:
        return peak_bytes(device, step)
    except torch.OutOfMemoryError:
        pass
    release_cached_memory()  # past the except clause, whose traceback held the probe's tensors
    return None


def micro_batches_to_fit(bytes_per_sample: float, batch: int, free: int, share: float = DEVICE_MEMORY_SHARE,
                         min_samples: int = 2) -> int:
    """How many micro-batches a batch of ``batch`` samples needs so that one micro-batch's
    activations fit ``share`` of ``free`` bytes; never so many that a micro-batch falls below
    ``min_samples`` (BatchNorm's statistics need two)."""
    wanted = math.ceil(batch * bytes_per_sample / max(1.0, share * free))
    return max(1, min(wanted, batch // min_samples if batch >= min_samples else 1))


def plan_micro_batches(device: torch.device, batch: int, probe: Callable[[int], object], stage: str,
                       min_samples: int = 2, *, batchnorm: bool = False) -> int:
    """Micro-batches for a step over ``batch`` samples, from ``probe(n)`` (one step's forward and
    backward on ``n`` samples) measured at :data:`PROBE_SAMPLES`; 1 on a CPU. ``batchnorm``: the
    model normalises with batch statistics, so micro-batches change its gradient (one warning)."""
    free = free_bytes(device)
    samples = min(PROBE_SAMPLES, batch)
    if free is None or samples >= batch:
        return 1
    used = _probed_peak(device, lambda: probe(samples))
    if used is None:
        count = max(1, batch // min_samples)
        logger.warning("%s: even a probe step on %d samples ran out of device memory; the step will "
                       "split its batch as far as it can", stage, samples)
        if batchnorm:
            logger.warning("%s: %s", stage, split_batchnorm_warning(batch, count))
        return count
    count = micro_batches_to_fit(used / samples, batch, free, min_samples=min_samples)
    if count > 1:
        logger.info("%s: a step's activations at batch %d come to about %.1f GiB, over %.0f %% of the "
                    "%.1f GiB free; each batch runs as %d micro-batches", stage, batch,
                    used / samples * batch / 2**30, 100 * DEVICE_MEMORY_SHARE, free / 2**30, count)
        if batchnorm:
            logger.warning("%s: %s", stage, split_batchnorm_warning(batch, count))
    return count


def split_batchnorm_warning(batch: int, count: int) -> str:
    """What micro-batches do to a model with batch-statistics BatchNorm, in one line."""
    return (f"{count} micro-batches of a {batch}-sample batch (a recipe rank's chunk) on a model with "
            "BatchNorm: each micro-batch is normalised with its own statistics, so the search's gradient is no "
            "longer the whole chunk's (about 3 % apart on the digits convnet); the tables and MLflow record "
            "search_micro_batches")


def rows_to_fit(fixed_bytes: float, bytes_per_sample: float, batch: int, free: int,
                share: float = DEVICE_MEMORY_SHARE) -> int:
    """How many stacked rows of one step over ``batch`` samples fit ``share`` of ``free`` bytes,
    each row costing ``fixed_bytes`` (its weights, gradients, optimizer state) plus
    ``bytes_per_sample`` per sample (its activations)."""
    per_row = fixed_bytes + bytes_per_sample * batch
    return int(share * free // per_row) if per_row > 0 else 2**31


def plan_rows(device: torch.device, rows: int, batch: int, probe: Callable[[int], object], stage: str, *,
              eval_batch: int | None = None, eval_probe: Callable[[int], object] | None = None) -> int:
    """How many of ``rows`` stacked rows (tickets) to run at once in a step over ``batch`` samples,
    from ``probe(n)`` (one step of a single row on ``n`` samples) measured at half and all of
    :data:`PROBE_SAMPLES`: the difference gives a row's activations per sample, the rest its
    fixed cost, so a large model's weights are not scaled with the batch. With ``eval_probe``
    (one row's evaluation of ``n`` samples), the rows' test evaluation at ``eval_batch`` must fit
    too. ``rows`` on a CPU."""
    free = free_bytes(device)
    if free is None or rows == 1:
        return rows
    small, large = PROBE_SAMPLES // 2, PROBE_SAMPLES
    at_small = _probed_peak(device, lambda: probe(small))
    at_large = _probed_peak(device, lambda: probe(large)) if at_small is not None else None
    if at_large is None:
        logger.warning("%s: even one row's probe step ran out of device memory; one row at a time", stage)
        return 1
    slope = (at_large - at_small) / (large - small)
    if slope <= 0:
        logger.warning("%s: the probe steps at %d and %d samples took %.0f and %.0f MB, so a row's activations "
                       "per sample could not be told from its fixed cost; planning with the larger step's "
                       "memory per sample", stage, small, large, at_small / 2**20, at_large / 2**20)
    per_sample = slope if slope > 0 else at_large / large
    fixed = max(0.0, at_large - per_sample * large)
    count = max(1, min(rows, rows_to_fit(fixed, per_sample, batch, free)))
    if eval_probe is not None and eval_batch:
        evaluating = _probed_peak(device, lambda: eval_probe(large))
        if evaluating is None:
            logger.warning("%s: even one row's evaluation probe ran out of device memory; one row at a time", stage)
            return 1
        count = max(1, min(count, rows_to_fit(fixed, evaluating / large, eval_batch, free)))
    if count < rows:
        logger.info("%s: one row's step at batch %d comes to about %.1f GiB; %d rows at once fit %.0f %% of the "
                    "%.1f GiB free, so the %d rows run in groups of %d", stage, batch,
                    (fixed + per_sample * batch) / 2**30, count, 100 * DEVICE_MEMORY_SHARE, free / 2**30, rows,
                    count)
    return count


class MicroBatches:
    """How many micro-batches a step cuts its batch into, doubled after an out-of-memory error.

    ``run(step)`` calls ``step(count)`` and returns what it returns. If it raises
    ``torch.OutOfMemoryError``, the count doubles (up to ``limit``), cached blocks go back to the
    device, one warning says so, and the step runs again; beyond ``limit`` the error stands. The
    step must leave no trace when it fails part-way (draw its noise before, step its optimizer
    after), so the repeat computes what one unfailed step would have.
    """

    def __init__(self, count: int = 1, *, limit: int, stage: str, batchnorm: bool = False, batch: int = 0):
        self.count = max(1, min(count, limit))
        self.limit = max(1, limit)
        self.stage = stage
        self.fell_back = False
        self.batchnorm, self.batch = batchnorm, batch  # for the warning: what splitting changes

    def run(self, step: Callable[[int], T]) -> T:
        while True:
            try:
                return step(self.count)
            except torch.OutOfMemoryError:
                if self.count >= self.limit:
                    raise
            # Past the except clause: the error's traceback, and with it the failed step's tensors,
            # is gone, so their blocks can go back to the device before the step runs again.
            self.count = min(2 * self.count, self.limit)
            release_cached_memory()
            if not self.fell_back:
                if self.batchnorm:
                    logger.warning("%s: out of device memory; %s", self.stage,
                                   split_batchnorm_warning(self.batch, self.count))
                else:
                    logger.warning("%s: out of device memory; each batch now runs as %d micro-batches (the same "
                                   "gradient, up to float rounding)", self.stage, self.count)
            self.fell_back = True


def release_cached_memory() -> None:
    """Hand the allocator's cached blocks back to the device after an out-of-memory error."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

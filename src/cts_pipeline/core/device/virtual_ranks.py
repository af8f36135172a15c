"""N-device data parallelism reproduced on fewer devices (``training.virtual_ranks``).

The authors train and search on 4 GPUs with DDP (TLAB 68c9740), and three things there depend on
the number of devices, not only on the global batch:

- BatchNorm normalises each GPU's 128 images (256 on ImageNet) with their own statistics;
- DDP averages the ranks' gradients, so with a loss summed over each rank's images the step sees
  the global sum ÷ N (weight decay is relatively N times stronger wherever clipping is idle);
- the search draws its Concrete noise on each rank, and computes GradBalance's λ* on each rank
  from that rank's gradient before averaging (``search/concrete.py``, ``optimize_step``).

With ``virtual_ranks: N`` each global batch is dealt into N chunks, every N-th sample to a chunk
as ``DistributedSampler`` deals to N devices (the epoch padded with its own first samples to a
multiple of N, as that sampler pads it, so the last batch gives every rank as many), and each
chunk plays one rank: its own forward, so its own
BatchNorm statistics; its loss's gradient weighted 1/N, as DDP's average; in the search its own
noise stream and its own λ*. With DDP's default ``broadcast_buffers``, every rank starts each
forward from rank 0's running statistics, so only the first chunk updates them here.

N counts the recipe's ranks, not the processes: under M real processes (``runtime.distributed``
or ``torchrun``) process ``r`` plays ranks ``r, r + M, …`` (N/M of them), so the preset's ``virtual_ranks: 4``
means the authors' 4 GPUs whether the run has 1, 2 or 4 processes, and gives the same numbers up
to float rounding. N must then be a multiple of M (:func:`check_ranks`). N = 1 is the plain step,
and several processes with N = 1 split one device's step (:mod:`.distributed`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

# How a process plays its N/M ranks (``runtime.virtual_rank_passes``): one forward and backward of its
# whole part with ghost BatchNorm (.ghost_batchnorm), or one per rank's chunk, the reference the
# one pass is tested against; auto: one on a GPU, where a step of a small network costs its kernel
# launches (P times fewer operations), sequential on a CPU, which is compute-bound: there ResNet-20's
# one-pass training step took 1.9x the sequential one at batch 512, its search's rows 1.9x too
# (four chunks of 128 run faster per sample than one batch of 512; docs/performance.md).
RANK_PASSES = ("auto", "one", "sequential")


def check_ranks(virtual_ranks: int, processes: int) -> None:
    """Refuse N virtual ranks that M processes cannot share equally (``config.validate_run`` says
    the same at run start, naming the process count's setting)."""
    if virtual_ranks > 1 and virtual_ranks % processes:
        raise ValueError(f"training.virtual_ranks = {virtual_ranks} must be a multiple of the {processes} "
                         "processes: each process plays an equal number of the recipe's ranks")


def padded_order(order: torch.Tensor, parts: int) -> torch.Tensor:
    """``order`` padded to a multiple of ``parts`` with its own first samples, as
    ``DistributedSampler`` (``drop_last=False``) pads an epoch for ``parts`` devices."""
    short = -len(order) % parts
    if short == 0:
        return order
    # (an epoch shorter than the padding repeats itself as often as needed, as the sampler does)
    repeats = math.ceil(short / len(order))
    return torch.cat([order, order.repeat(repeats)[:short]])


def padded_size(n: int, parts: int) -> int:
    """The samples of an epoch of ``n`` once padded for ``parts`` ranks (:func:`padded_order`)."""
    return n + (-n % parts)


@dataclass(frozen=True)
class RankLayout:
    """The recipe's ``ranks`` as this process (``process`` of ``processes``) plays them.

    ``presharded``: each batch the loop gets is already this process's part (a streamed split's
    loader shards by process), not the global batch."""

    ranks: int = 1
    process: int = 0
    processes: int = 1
    presharded: bool = False

    def __post_init__(self) -> None:
        check_ranks(self.ranks, self.processes)

    @property
    def plain(self) -> bool:
        """One rank: the plain step (several processes then split one device's step)."""
        return self.ranks == 1

    @property
    def parts(self) -> int:
        """The ranks each global batch is dealt to: the recipe's ranks, or the processes for the
        plain step. An epoch is padded to a multiple of it (:func:`padded_order`)."""
        return self.processes if self.plain else self.ranks

    @property
    def per_process(self) -> int:
        """The chunks this process plays: one for the plain step, whatever the processes."""
        return 1 if self.plain else self.ranks // self.processes

    def rank_of(self, chunk: int) -> int:
        """The recipe rank this process's ``chunk`` plays: process ``r`` plays ranks ``r``,
        ``r + M``, ``r + 2M``, … (0 for the plain step, which every process plays together)."""
        return 0 if self.plain else self.process + self.processes * chunk

    def one_pass(self, passes: str, device: torch.device) -> bool:
        """Whether this process's ranks run as one pass on ``device`` (``passes``: one of
        :data:`RANK_PASSES`): only where it plays several; one rank's chunk is its whole part."""
        if passes not in RANK_PASSES:
            raise ValueError(f"runtime.virtual_rank_passes must be one of {', '.join(RANK_PASSES)}, got {passes!r}")
        wanted = device.type != "cpu" if passes == "auto" else passes == "one"
        return wanted and self.per_process > 1

    @property
    def loss_weight(self) -> float:
        """Each chunk's loss weight before DDP averages over the processes: 1/N in all."""
        return self.processes / self.ranks

    def process_part(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's part of a global batch: every M-th sample from the ``r``-th (what a
        presharded loader already hands it), whose every (N/M)-th sample is one of its chunks."""
        if self.presharded or self.processes == 1:
            return x, y
        return x[self.process::self.processes], y[self.process::self.processes]

    def chunks(self, x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This process's chunks of a batch. Recipe rank ``g`` takes every N-th sample from the
        ``g``-th, as ``DistributedSampler`` deals a batch to N devices; so this process's part of the
        global batch is every M-th sample from the ``r``-th, which is also what a streamed split's
        loader hands it (``presharded``), and its chunks are every (N/M)-th sample of that part.
        The chunks are the same whatever the process count."""
        if self.plain:
            return [(x, y)]
        x, y = self.process_part(x, y)
        step = self.per_process
        # Contiguous copies of the strided chunks: torch.compile's CPU code read a strided chunk
        # wrongly under AVX2 kernels (NaN losses from the second step; torch 2.14.1,
        # test_a_compiled_forward_under_ddp_with_virtual_ranks_trains_as_the_eager_one), and
        # convolutions copy a strided input anyway.
        return [(x[c::step].contiguous(), y[c::step]) for c in range(step)]

    def stream_suffix(self, chunk: int) -> tuple:
        """What tells this chunk's random stream from another rank's: nothing for recipe rank 0,
        so one rank keeps the plain stream."""
        rank = self.rank_of(chunk)
        return () if rank == 0 else ("rank", rank)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """``[per_process, ...]`` values of this process's chunks as ``[ranks, ...]`` on every
        process (one all-reduce of a small tensor; nothing to do in one process)."""
        if self.processes == 1:
            return local
        every = local.new_zeros((self.ranks, *local.shape[1:]))
        every[[self.rank_of(c) for c in range(self.per_process)]] = local
        dist.all_reduce(every, op=dist.ReduceOp.SUM)
        return every


@contextmanager
def running_stats_of(model: nn.Module, rank: int) -> Iterator[None]:
    """Within the block, BatchNorm running statistics are updated only if ``rank`` is 0 (DDP's
    broadcast of rank 0's buffers); the other ranks normalise with their own batch all the same.
    ``rank`` is the chunk's index in its process: under real DDP another process's first chunk
    updates its own copy, which DDP overwrites with rank 0's at the next forward."""
    if rank == 0:  # the plain step (and the first chunk): nothing to do, no scan of the modules
        yield
        return
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 − 0)·running + 0·batch: unchanged
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)

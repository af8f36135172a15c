"""N-device data parallelism reproduced on one device (``training.virtual_ranks``).

The authors train and search on 4 GPUs with DDP (TLAB 68c9740), and three things there depend on
the number of devices, not only on the global batch:

- BatchNorm normalises each GPU's 128 images (256 on ImageNet) with their own statistics;
- DDP averages the ranks' gradients, so with a loss summed over each rank's images the step sees
  the global sum ÷ N (weight decay is relatively N times stronger wherever clipping is idle);
- the search draws its Concrete noise on each rank, and computes GradBalance's λ* on each rank
  from that rank's gradient before averaging (``search/concrete.py``, ``optimize_step``).

With ``virtual_ranks: N`` each global batch is cut into N equal chunks (the last batch too, as
evenly as ``torch.tensor_split`` can), and each chunk plays one rank: its own forward, so its own
BatchNorm statistics; its loss's gradient weighted 1/N, as DDP's average; in the search its own
noise draw and its own λ*. With DDP's default ``broadcast_buffers``, every rank starts each
forward from rank 0's running statistics, so only the first chunk updates them here.

This module holds the two pieces the trainer and the search share; N = 1 is the plain step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def rank_chunks(x: torch.Tensor, y: torch.Tensor, ranks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batch ``(x, y)`` as each of ``ranks`` virtual ranks sees it."""
    if ranks == 1:
        return [(x, y)]
    return list(zip(torch.tensor_split(x, ranks), torch.tensor_split(y, ranks), strict=True))


@contextmanager
def running_stats_of(model: nn.Module, rank: int) -> Iterator[None]:
    """Within the block, BatchNorm running statistics are updated only if ``rank`` is 0 (DDP's
    broadcast of rank 0's buffers); the other ranks normalise with their own batch all the same."""
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


def check_one_process(virtual_ranks: int, world: int) -> None:
    """Virtual ranks reproduce N devices inside one process; several real processes as well are not
    supported yet (``config.validate_run`` refuses the combination at run start)."""
    if virtual_ranks > 1 and world > 1:
        raise ValueError("training.virtual_ranks cannot be combined with runtime.distributed yet; "
                         "use one or the other")

"""A process's virtual ranks as rows of one stacked search step, instead of one rank after another.

Under ``training.virtual_ranks: N`` (:mod:`..device.virtual_ranks`) each of the P ranks a process
plays draws its own Concrete noise, runs the teacher and the masked network on its own chunk
(every P-th sample) with its own BatchNorm statistics, and has its own gradient, whose norm gives
it its own λ*. Played one after another, that is P teacher forwards, P masked forwards and P
backwards per step. Here the same step is one pass:

- the P noise draws (each rank's own stream, drawn in rank order as the sequential path draws them)
  make P soft masks, ``[P, d]`` or ``[P, K, d]`` with K densities, so rank ``c``'s row ``k`` is
  row ``c·K + k`` of ``R = P·K`` stacked rows (:mod:`..train.stacked`);
- the stacked network takes a per-row input: the batch ``[B, C, H, W]`` viewed as ``[B/P, P, C, H, W]``
  holds rank ``c``'s chunk at ``[:, c]``, repeated for its K rows, so every row normalises with its
  own rank's batch statistics, as that rank alone would;
- the teacher is one forward of the whole batch with ghost BatchNorm (:mod:`..device.ghost_batchnorm`);
- one backward to the soft masks gives every rank's gradient at once (``∂/∂s = ∂/∂m̃ · σ(1 − σ)``,
  the sigmoid's own backward), so λ* is still taken per rank and averaged, and the task gradient
  summed over the ranks and divided by N, exactly as :func:`.search.search_step` does.

``tests/core/test_rank_rows.py`` checks it against the ranks one after another.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import nn

from ..device.ghost_batchnorm import ghost_batchnorm
from ..device.runtime import UniformNoise
from ..device.virtual_ranks import RankLayout
from ..train.memory import release_cached_memory
from ..train.stacked import stacked_forward
from ..train.stacked import supports as stacked_supports
from .forwards import check_stacked
from .objectives import Objective
from .relaxation import NOISE_EPS, ConcreteMask, soft_mask

logger = logging.getLogger(__name__)
T = TypeVar("T")


def rank_rows_hold(model: nn.Module, relaxation: ConcreteMask, x: torch.Tensor, stage: str) -> bool:
    """Whether this model's ranks can run as stacked rows: its layers are ones the stacked layout
    knows, checked once against ``vmap`` in float64 (for K densities the search's own check)."""
    if not stacked_supports(model):
        return False
    if relaxation.batched:
        return relaxation.stacked  # the search's own check, at its first step
    two_rows = copy.copy(relaxation)
    two_rows.logits = relaxation.logits.detach().expand(2, -1)
    return check_stacked(model, two_rows, x, stage)


class ReplayedNoise:
    """A rank's uniform draw, handed out again: the ranks' step repeated one rank after another
    (after an out-of-memory error) computes with the noise the failed attempt drew."""

    def __init__(self, uniform: torch.Tensor) -> None:
        self.uniform = uniform

    def fill_(self, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.uniform)


def draw_rank_noise(relaxation: ConcreteMask, noises: Sequence[UniformNoise]) -> torch.Tensor:
    """Each rank's uniform draw, ``[P, d]``, from its own stream, in rank order."""
    uniform = torch.empty((len(noises), relaxation.num_weights), dtype=relaxation.theta.dtype,
                          device=relaxation.theta.device)
    for c, source in enumerate(noises):
        source.fill_(uniform[c])
    return uniform


def objective_and_rank_gradients(model: nn.Module, relaxation: ConcreteMask, objective: Objective,
                                 uniform: torch.Tensor, x: torch.Tensor, y: torch.Tensor, ranks: RankLayout,
                                 loss_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's objective (``[P]``, or ``[P, K]``) and its gradient of ``loss_scale × objective``
    to the logits (``[P, d]``, or ``[P, K, d]``), in one pass. ``x`` is the global batch (or this
    process's part of it, when presharded); ``uniform`` the ranks' draws (:func:`draw_rank_noise`)."""
    x, y = ranks.process_part(x, y)
    per_process = ranks.per_process
    rows_per_rank = relaxation.logits.shape[0] if relaxation.batched else 1
    with torch.no_grad():  # the soft masks as a leaf: one backward gives each rank's gradient apart
        noise = torch.logit(uniform, eps=NOISE_EPS)  # as concrete_noise, which draws in place
        soft = soft_mask(relaxation.logits.detach().unsqueeze(0), noise[:, None] if relaxation.batched else noise)
    soft.requires_grad_(True)
    rows = per_process * rows_per_rank
    masked = (relaxation.theta * soft).reshape(rows, -1)
    by_rank = x.unflatten(0, (x.shape[0] // per_process, per_process))  # [B/P, P, ...]: rank c's chunk at [:, c]
    samples = by_rank.shape[0]
    per_row = by_rank.unsqueeze(2).expand(samples, per_process, rows_per_rank, *x.shape[1:])
    sparse = stacked_forward(model, relaxation.row_weights(masked), per_row.reshape(samples, rows * x.shape[1],
                                                                                    *x.shape[2:]))
    labels = _per_row(y.unflatten(0, (samples, per_process)).transpose(0, 1), rows_per_rank)
    teacher = None
    if objective.needs_teacher:
        with torch.no_grad(), ghost_batchnorm(model, per_process, in_evaluation=True):
            dense = model(x)
        teacher = _per_row(dense.unflatten(0, (samples, per_process)).transpose(0, 1), rows_per_rank)
    loss = torch.vmap(objective.fn, in_dims=(0, None if teacher is None else 0, 0))(sparse, teacher, labels)
    (soft_grad,) = torch.autograd.grad(loss.sum() * loss_scale, soft)
    # ∂s/∂logits = σ(1 − σ): the sigmoid's own backward, as autograd takes it through the soft mask.
    gradients = torch.ops.aten.sigmoid_backward(soft_grad, soft.detach())
    shape = (per_process, rows_per_rank) if relaxation.batched else (per_process,)
    return loss.detach().reshape(shape), gradients


def _per_row(by_rank: torch.Tensor, rows_per_rank: int) -> torch.Tensor:
    """``[P, ...]`` per rank as ``[P·K, ...]`` per row (rank ``c``'s value for its K rows)."""
    if rows_per_rank == 1:
        return by_rank
    return by_rank.unsqueeze(1).expand(by_rank.shape[0], rows_per_rank, *by_rank.shape[1:]).flatten(0, 1)


class RankRows:
    """Whether a search's ranks run as rows (decided at its first step), and off for good after an
    out-of-memory error: the rows hold P chunks' activations at once, one rank's only a chunk's."""

    def __init__(self, active: bool, stage: str) -> None:
        self.active, self.stage = active, stage

    def run(self, step: Callable[[], T]) -> T | None:
        """``step()``, or None after it ran out of device memory (and the rows are off from then on)."""
        try:
            return step()
        except torch.OutOfMemoryError:
            pass
        # Past the except clause: the failed step's tensors are gone, so their blocks can go back.
        self.active = False
        release_cached_memory()
        logger.warning("%s: out of device memory with the virtual ranks as rows of one pass; one rank after "
                       "another from now on (the same step, up to float rounding)", self.stage)
        return None

"""S seeds' batched searches as rows of one stacked search step (``runtime.stack_seeds``).

A seed's batched search runs its K densities as K stacked rows over one network, θ_k, on one
batch (:mod:`..train.stacked`). Several seeds differ in everything the rows shared: their θ_k (and
every other weight: BatchNorm's γ and β, biases), their Concrete noise and their batches. Here row
``s·K + k`` is seed ``s`` at density ``k``:

- the seeds' uniform draws, one per seed (and virtual rank) from its own stream, make ``[S, P, d]``
  noise, so seed ``s``'s K rows share its draw exactly as its own batched search shares one;
- every parameter is a ``[R, *shape]`` row tensor: the prunable weights ``θ_k^s ⊙ m̃_r``, the others
  seed ``s``'s own, repeated for its K rows;
- the stacked network takes a per-row input: seed ``s``'s batch in the channels of its K rows;
- the teacher is one stacked forward of the S dense networks, each on its own batch;
- the rows share nothing, so one backward of the summed objective gives each row its own gradient,
  and GradBalance, Adam and the budgets act per row as they do for K densities;
- under ``training.virtual_ranks: P`` each seed's rows are P × K, rank ``c``'s on its chunk of the
  seed's batch (:mod:`.rank_rows`): their gradients are summed over the ranks and divided by P, and
  λ* is taken per rank and averaged, as the seed's own search does.

Each row is then seed ``s``'s batched search at density ``k`` up to float rounding
(``tests/core/test_seed_rows.py``). It needs what the stacked layout needs, an objective on the
logits and one process; :func:`seed_rows_decline` says why not otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..device.virtual_ranks import RankLayout
from ..nets.masks import prunable_parameters
from ..train.loop import to_layout
from ..train.stacked import rewired, unstack, unsupported_layers
from ..train.stacked import supports as stacked_supports
from .objectives import Objective
from .relaxation import NOISE_EPS, ConcreteMask, soft_mask


class SeedRowsDeclined(ValueError):
    """The seeds' searches cannot run as rows here (the message says why): search one seed at a time."""


def seed_rows_decline(model: nn.Module, objective: Objective, ranks: RankLayout) -> str | None:
    """Why these seeds' searches cannot run as rows of one step, or None when they can."""
    if objective.kind == "network":
        return "network objectives search one density of one seed at a time"
    if ranks.processes > 1:
        return "several processes search one seed at a time"
    if not stacked_supports(model):
        return f"the stacked layout does not know its {', '.join(unsupported_layers(model))} layers"
    return None


class SeedRows:
    """Every seed's parameters as ``[S, *shape]`` rows and its prunable weights flat, ``[S, d]``, for
    a search of P virtual ranks and K densities per seed. The weights are frozen, so their rows are
    laid out once here, not at every step: the frozen ones for the ``S·P·K`` masked rows, and every
    parameter for the ``S·P`` teacher rows."""

    def __init__(self, model: nn.Module, starts: Sequence[Mapping[str, torch.Tensor]], device: torch.device, *,
                 ranks: int = 1, densities: int = 1):
        self.seeds = len(starts)
        self.params = {n: torch.stack([start[n].to(device, p.dtype) for start in starts])
                       for n, p in model.named_parameters()}
        prunable = list(prunable_parameters(model))
        self.theta = torch.cat([self.params[n].reshape(self.seeds, -1) for n in prunable], dim=1)
        self.frozen_rows = {n: p.repeat_interleave(ranks * densities, 0) for n, p in self.params.items()
                            if n not in set(prunable)}
        self.teacher_rows = self.params if ranks == 1 else \
            {n: p.repeat_interleave(ranks, 0) for n, p in self.params.items()}

    def objective_and_gradients(self, model: nn.Module, relaxation: ConcreteMask, objective: Objective,
                                uniform: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, loss_scale: float,
                                channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's objective and its gradient of ``loss_scale × objective`` to the logits, in one
        pass: ``[S, P, K]`` and ``[S, P, K, d]`` for S seeds, P virtual ranks and K densities.

        ``uniform`` is ``[S, P, d]``, seed ``s``'s rank ``c``'s draw from its own stream; ``xs`` and
        ``ys`` the seeds' batches, ``[S, B, …]``, whose every P-th sample from the ``c``-th is rank
        ``c``'s chunk (as :meth:`..device.virtual_ranks.RankLayout.chunks` deals them). Row
        ``(s, c, k)`` runs seed ``s``'s network at density ``k`` on that chunk, with that chunk's
        batch statistics, as seed ``s``'s own search plays rank ``c``. The soft masks are a leaf, so
        one backward gives every rank its own gradient (λ* is taken per rank, :mod:`.rank_rows`)."""
        seeds, ranks = uniform.shape[:2]
        per_seed = relaxation.logits.shape[0] // seeds
        rows = seeds * ranks * per_seed
        with torch.no_grad():  # the soft masks as a leaf, so that each rank's gradient stays apart
            noise = torch.logit(uniform, eps=NOISE_EPS)  # as concrete_noise, which draws in place
            soft = soft_mask(relaxation.logits.detach().view(seeds, 1, per_seed, -1), noise[:, :, None])
        soft.requires_grad_(True)
        masked = (self.theta[:, None, None] * soft).view(rows, -1)
        weights = {**self.frozen_rows, **relaxation.row_weights(masked)}
        chunks, labels = (xs, ys) if ranks == 1 else (_by_rank(xs, ranks), _by_rank(ys, ranks))  # [S·P, B/P, …]
        with rewired(model, weights, rows):
            sparse = unstack(model(to_layout(_side_by_side(chunks, per_seed), channels_last)), rows)
        teacher = None
        if objective.needs_teacher:
            with torch.no_grad(), rewired(model, self.teacher_rows, seeds * ranks):
                teacher = unstack(model(to_layout(_side_by_side(chunks, 1), channels_last)), seeds * ranks)
            teacher = teacher.repeat_interleave(per_seed, 0)
        labels = labels.repeat_interleave(per_seed, 0)
        loss = torch.vmap(objective.fn, in_dims=(0, None if teacher is None else 0, 0))(sparse, teacher, labels)
        # Rows share nothing: the gradient of their sum is each row's own; ∂s/∂logits = σ(1 − σ).
        (soft_grad,) = torch.autograd.grad(loss.sum() * loss_scale, soft)
        gradients = torch.ops.aten.sigmoid_backward(soft_grad, soft.detach())
        return loss.detach().view(seeds, ranks, per_seed), gradients


def _by_rank(batches: torch.Tensor, ranks: int) -> torch.Tensor:
    """Seeds' batches ``[S, B, …]`` as their ranks' chunks ``[S·P, B/P, …]``: rank ``c`` of seed ``s``
    at ``s·P + c``, its every P-th sample from the ``c``-th."""
    return batches.unflatten(1, (batches.shape[1] // ranks, ranks)).transpose(1, 2).flatten(0, 1)


def _side_by_side(xs: torch.Tensor, repeats: int) -> torch.Tensor:
    """Seeds' batches ``[S, B, C, …]`` as the stacked layout's per-row input ``[B, S·repeats·C, …]``
    (seed ``s``'s batch in the channels of its ``repeats`` rows)."""
    seeds, batch = xs.shape[:2]
    per_row = xs.unsqueeze(1).expand(seeds, repeats, *xs.shape[1:]).reshape(seeds * repeats, *xs.shape[1:])
    return per_row.transpose(0, 1).reshape(batch, seeds * repeats * xs.shape[2], *xs.shape[3:])

"""Sparsity control: turn the objective's gradient into the gradient handed to Adam.

Logits are either one flat row ``[d]`` (one search) or ``[K, d]`` (K searches at K densities on
the same θ_k, batched): every sum and norm runs over the last dimension, per row, so the rows
never interact and a batched search is K independent searches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BUDGET_SLACK = 1.1  # GradBalance budget D = 1.1·κ·d on the expected kept count
MULTIPLIER_EMA = 0.01  # rate of the moving average of the GradBalance multiplier
CONSTRAINT_SCALE = 100.0  # c = 100·(Σσ(s)/D − 1)
LAGRANGE_LR_RATIO = 0.01  # the Lagrangian ablation's multiplier rate, relative to the mask rate
BALANCERS = ("gradbalance", "lagrangian")


def _per_row(t: torch.Tensor) -> dict:
    return {"dim": -1, "keepdim": t.dim() > 1}


def row_sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(**_per_row(t))


def _row_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t, **_per_row(t))


def _budgets(densities: float | Sequence[float], num_weights: int, slack: float) -> float | tuple[float, ...]:
    if isinstance(densities, Sequence):
        return tuple(slack * k * num_weights for k in densities)
    return slack * densities * num_weights


class _RowConstants:
    """Per-row constants of a balancer: the floats themselves for one row, ``[K, 1]`` tensors on the
    logits' device for K rows, made on first use rather than at every step (a host-to-device copy)."""

    def __init__(self, **values: float | tuple[float, ...]):
        self._values = values
        self._made: dict[tuple, float | torch.Tensor] = {}

    def get(self, name: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> float | torch.Tensor:
        values = self._values[name]
        if not isinstance(values, tuple):
            return values
        key = (name, like.device, dtype or like.dtype)
        if key not in self._made:
            self._made[key] = torch.tensor(values, dtype=key[2], device=like.device)[:, None]
        return self._made[key]


def _row_constants(budget: float | tuple[float, ...]) -> _RowConstants:
    scale = tuple(CONSTRAINT_SCALE / b for b in budget) if isinstance(budget, tuple) else CONSTRAINT_SCALE / budget
    return _RowConstants(budget=budget, scale=scale)


class GradBalance:
    """Scale the budget constraint's gradient to the objective's, smoothed over steps.

    ``c = 100·(Σσ(s)/D − 1)`` with ``D = 1.1·κ·d``; ``g_sp = (100/D)·σ(s)(1 − σ(s))``;
    ``λ* = ‖g_task‖/‖g_sp‖`` when over budget (``c > 0``), else 0; ``λ`` is a moving average of
    ``λ*`` at rate 0.01 started at the first ``λ*``; Adam receives ``g_task + λ·g_sp``.
    With several densities, each row has its own budget, norms and ``λ``.
    Everything stays on the device: no host sync per step.
    """

    def __init__(self, density: float | Sequence[float], num_weights: int):
        self.budget = _budgets(density, num_weights, BUDGET_SLACK)
        self._rows = _row_constants(self.budget)
        self.multiplier: torch.Tensor | None = None
        self.over_budget: torch.Tensor | None = None  # this step's c > 0, per row (diagnostics)

    def combine(self, logits: torch.Tensor, task_grad: torch.Tensor,
                rank_norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the gradient for the optimizer and the current expected kept count ``Σσ(s)``.

        ``rank_norms`` (``[N]``, or ``[N, K, 1]`` for K rows): ‖g_task‖ of each of N recipe ranks,
        whose gradients average to ``task_grad``; λ* is then computed per rank and averaged, as the
        authors' code does under DDP (:mod:`..device.virtual_ranks`)."""
        keep_prob = torch.sigmoid(logits)
        expected = row_sum(keep_prob)
        # g_sp = scale·σ(1 − σ); kept unscaled as `spread` and scaled inside the norms and the sum
        # below, so each step makes six passes over the logits instead of ten.
        scale = self._rows.get("scale", logits)
        spread = torch.addcmul(keep_prob, keep_prob, keep_prob, value=-1.0)
        self.over_budget = expected > self._rows.get("budget", logits, torch.float64)  # ⇔ c > 0
        sparsity_norm = _row_norm(scale * spread).clamp_min(1e-12)
        if rank_norms is None:
            ratio = _row_norm(task_grad) / sparsity_norm
        else:
            ratio = (rank_norms / sparsity_norm).mean(0)
        target = torch.where(self.over_budget, ratio, torch.zeros_like(ratio))
        if self.multiplier is None:
            self.multiplier = target
        else:
            self.multiplier = self.multiplier + MULTIPLIER_EMA * (target - self.multiplier)
        return torch.addcmul(task_grad, spread, self.multiplier * scale), expected

    def drop_lr(self, factor: float) -> None:
        """GradBalance has no rate of its own."""

    def state_dict(self) -> dict:
        return {"multiplier": self.multiplier}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        """``device``: where the search runs (a checkpoint is read to the CPU, and a CPU ``[K, 1]``
        multiplier beside CUDA logits would fail the next step)."""
        self.multiplier = _on(state["multiplier"], device)


class Lagrangian:
    """Ablation: minimise ``R + λ·c_eq`` with ``c_eq = 100·(Σσ(s)/(κ·d) − 1)`` (no slack).

    ``λ`` starts at 0, may take any sign, and climbs ``c_eq`` by plain gradient ascent at 0.01 × the
    mask rate, dropped with the same schedule. With several densities, one ``λ`` per row.
    """

    def __init__(self, density: float | Sequence[float], num_weights: int, mask_lr: float):
        self.budget = _budgets(density, num_weights, 1.0)
        self._rows = _row_constants(self.budget)
        self.lr = LAGRANGE_LR_RATIO * mask_lr
        self.multiplier: torch.Tensor | None = None
        self.over_budget: torch.Tensor | None = None

    def combine(self, logits: torch.Tensor, task_grad: torch.Tensor,
                rank_norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As GradBalance's; λ's ascent does not depend on the ranks' gradients (the authors
        average λ's gradient over ranks, and it is the same constraint on every rank)."""
        keep_prob = torch.sigmoid(logits)
        expected = row_sum(keep_prob)
        budget = self._rows.get("budget", logits)
        if self.multiplier is None:
            self.multiplier = torch.zeros_like(expected)
        constraint = CONSTRAINT_SCALE * (expected / budget - 1)
        self.over_budget = constraint > 0
        spread = torch.addcmul(keep_prob, keep_prob, keep_prob, value=-1.0)  # σ(1 − σ)
        grad = torch.addcmul(task_grad, spread, self.multiplier * (CONSTRAINT_SCALE / budget))
        self.multiplier = self.multiplier + self.lr * constraint  # ∂(R + λc)/∂λ = c: ascent
        return grad, expected

    def drop_lr(self, factor: float) -> None:
        self.lr *= factor

    def state_dict(self) -> dict:
        return {"multiplier": self.multiplier, "lr": self.lr}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        """``device`` as for :meth:`GradBalance.load_state_dict`."""
        self.multiplier, self.lr = _on(state["multiplier"], device), state["lr"]


def _on(value: torch.Tensor | None, device: torch.device | str | None) -> torch.Tensor | None:
    return value if value is None or device is None else value.to(device)


def make_balancer(name: str, density: float | Sequence[float], num_weights: int,
                  mask_lr: float, lagrange_lr_factor: float = 1.0) -> GradBalance | Lagrangian:
    """``lagrange_lr_factor``: the objective's own scaling of the Lagrangian's rate
    (``Objective.lagrange_lr_factor``)."""
    if name == "gradbalance":
        return GradBalance(density, num_weights)
    if name == "lagrangian":
        return Lagrangian(density, num_weights, mask_lr * lagrange_lr_factor)
    raise ValueError(f"cts.balance must be one of {BALANCERS}, got {name!r}")

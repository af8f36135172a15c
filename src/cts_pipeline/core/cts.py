"""Concrete Ticket Search (Arora & Teuscher, arXiv:2512.07142): learn which weights of ``θ_k`` to keep.

One real logit ``s_i`` per prunable weight, initialised to ``logit(κ)``. Each step draws one
uniform ``u`` per weight (shared by the whole mini-batch), forms the Binary Concrete soft mask
``m̃ = σ(s + L/τ)`` with ``L = log u − log(1 − u)`` and the fixed temperature ``τ = 2/3``, and runs
the frozen network with weights ``θ_k ⊙ m̃``. The objective compares that network with the same
weights unmasked (the "dense teacher"); both forwards normalise with the batch's statistics.
GradBalance keeps the expected kept count ``Σσ(s)`` near a budget of ``1.1·κ·d`` without a tuned
penalty, and the mask is the global top ``round(κ·d)`` logits at the end.

The constants below are the method's, not knobs: see ``docs/method.md`` of the shared notes.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from .checkpoints import Checkpoint
from .data import Split, iterate_batches
from .distributed import all_sum, average_over_ranks, rank_and_world, shard
from .masks import prunable_parameters, unflatten
from .runtime import UniformNoise, generator, synchronize
from .stacked import stacked_forward
from .stacked import supports as stacked_supports
from .training import STARTS, TrainRecipe, check_finite, to_layout

logger = logging.getLogger(__name__)

TEMPERATURE = 2.0 / 3.0  # fixed: no annealing, no straight-through, no hard-concrete stretch
BUDGET_SLACK = 1.1  # GradBalance budget D = 1.1·κ·d on the expected kept count
MULTIPLIER_EMA = 0.01  # rate of the moving average of the GradBalance multiplier
CONSTRAINT_SCALE = 100.0  # c = 100·(Σσ(s)/D − 1)
LR_DROP_AT = 0.88  # Adam's rate is multiplied by 0.1 once, at 88 % of the search steps
LR_DROP_FACTOR = 0.1
LAGRANGE_LR_RATIO = 0.01  # the Lagrangian ablation's multiplier rate, relative to the mask rate
SHORT_SEARCH_FRACTION = 1 / 8  # `short` search: one eighth of the training epochs (160 -> 20)
NOISE_EPS = 1e-10  # keeps log u finite; torch.rand never returns 1, so only the floor matters

SEARCH_LENGTHS = ("long", "short")
BALANCERS = ("gradbalance", "lagrangian")


# --------------------------------------------------------------------------------------------
# Objectives: functions of (masked logits, dense-teacher logits, labels) -> scalar to minimise.


def reverse_kl(sparse_logits: torch.Tensor, dense_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``KL(p_sparse ‖ p_dense)``, mean over the batch, softmax temperature 1 (CTS-KL)."""
    log_p_sparse = F.log_softmax(sparse_logits.float(), dim=1)
    log_p_dense = F.log_softmax(dense_logits.float(), dim=1)
    return (log_p_sparse.exp() * (log_p_sparse - log_p_dense)).sum(dim=1).mean()


def forward_kl(sparse_logits: torch.Tensor, dense_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``KL(p_dense ‖ p_sparse)``, mean over the batch."""
    log_p_sparse = F.log_softmax(sparse_logits.float(), dim=1)
    log_p_dense = F.log_softmax(dense_logits.float(), dim=1)
    return (log_p_dense.exp() * (log_p_dense - log_p_sparse)).sum(dim=1).mean()


def cross_entropy(sparse_logits: torch.Tensor, dense_logits: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the masked network on the labels (CTS-CE); needs no teacher."""
    return F.cross_entropy(sparse_logits.float(), labels)


def loss_ratio(sparse_logits: torch.Tensor, dense_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``|CE_sparse / CE_dense − 1|``: keep the masked network's loss where the dense one's is."""
    dense = F.cross_entropy(dense_logits.float(), labels)
    return (F.cross_entropy(sparse_logits.float(), labels) / dense - 1).abs()


# Network objectives (ablations) need more than the two outputs: intermediate features or the
# gradients of the loss with respect to the weights. They get (model, relaxation, soft mask, x, y)
# and run their own forwards; the search's BatchNorm context (batch statistics) is active.


def _standardise(t: torch.Tensor, dim: int | None) -> torch.Tensor:
    if dim is None:
        return (t - t.mean()) / (t.std() + 1e-9)
    return (t - t.mean(dim=dim, keepdim=True)) / (t.std(dim=dim, keepdim=True) + 1e-9)


@contextmanager
def _layer_outputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the output of every prunable layer (conv and linear), flattened per sample."""
    outputs: list[torch.Tensor] = []
    names = {name.rsplit(".", 1)[0] if "." in name else "" for name in prunable_parameters(model)}
    modules = [m for n, m in model.named_modules() if n in names]
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out.reshape(out.shape[0], -1)))
               for m in modules]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def feature_mse(model: nn.Module, relaxation: ConcreteMask, soft: torch.Tensor, x: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
    """Mean over prunable layers of the MSE between per-sample standardised outputs of the masked
    network and of the dense teacher (the authors' ``msefeature``)."""
    with torch.no_grad(), _layer_outputs(model) as dense:
        model(x)
    with _layer_outputs(model) as sparse:
        functional_call(model, relaxation.masked_weights(soft), (x,))
    losses = [F.mse_loss(_standardise(s.float(), 1), _standardise(d.float(), 1)) for s, d in zip(sparse, dense, strict=True)]
    return torch.stack(losses).mean()


def _weight_gradients(model: nn.Module, relaxation: ConcreteMask, soft: torch.Tensor | None, x: torch.Tensor,
                      labels: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """∂CE/∂θ (flat, prunable weights) of the network with weights θ ⊙ m̃ (θ alone when ``soft`` is None)."""
    theta = relaxation.theta.detach().requires_grad_(True)
    weights = unflatten(theta if soft is None else theta * soft, relaxation.shapes)
    loss = F.cross_entropy(functional_call(model, weights, (x,)).float(), labels)
    (grad,) = torch.autograd.grad(loss, theta, create_graph=create_graph)
    return grad


def grad_mse(model: nn.Module, relaxation: ConcreteMask, soft: torch.Tensor, x: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
    """Mean over prunable layers of the MSE between the standardised weight gradients of the masked
    network and of the dense one (the authors' ``gradmatch``; needs double backprop)."""
    dense = _weight_gradients(model, relaxation, None, x, labels, create_graph=False)
    sparse = _weight_gradients(model, relaxation, soft, x, labels, create_graph=True)
    shapes = relaxation.shapes
    losses = [F.mse_loss(_standardise(s, None), _standardise(d, None))
              for s, d in zip(unflatten(sparse, shapes).values(), unflatten(dense, shapes).values(), strict=True)]
    return torch.stack(losses).mean()


def gradient_norm(model: nn.Module, relaxation: ConcreteMask, soft: torch.Tensor, x: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    """``−‖∂CE/∂(all parameters)‖`` of the masked network: keep the weights that keep the gradient
    flowing (the authors' ``gradnorm``, GraSP-like; needs double backprop)."""
    theta = relaxation.theta.detach().requires_grad_(True)
    others = [p for name, p in model.named_parameters() if name not in relaxation.shapes]
    for p in others:
        p.requires_grad_(True)
    try:
        logits = functional_call(model, unflatten(theta * soft, relaxation.shapes), (x,))
        grads = torch.autograd.grad(F.cross_entropy(logits.float(), labels), [theta, *others], create_graph=True)
    finally:
        for p in others:
            p.requires_grad_(False)
    return -torch.sqrt(sum((g * g).sum() for g in grads))


@dataclass(frozen=True)
class Objective:
    """``kind="logits"``: ``fn(sparse_logits, dense_logits, labels)``; ``kind="network"``:
    ``fn(model, relaxation, soft_mask, x, labels)`` for objectives that need features or gradients.

    ``loss_scale`` is the factor the authors' code multiplies the objective by before the backward
    pass (``_loss_scaler_constant`` in TLAB ``search/concrete.py``): 100 for CE, both KLs and the
    feature and gradient matching, 10,000 for ``dloss``, 1 for ``gradnorm``. GradBalance's λ* is a
    ratio of norms, so the scale multiplies the whole gradient handed to Adam; Adam is invariant to
    that except through its ``eps`` (1e-8), which the unscaled logit gradients (medians near 1e-8
    and below) fall under. See ``docs/architecture.md``, "The loss scale".
    """

    fn: Callable[..., torch.Tensor]
    needs_teacher: bool
    kind: str = "logits"
    loss_scale: float = 100.0


OBJECTIVES: dict[str, Objective] = {
    "kl": Objective(reverse_kl, needs_teacher=True),
    "fkl": Objective(forward_kl, needs_teacher=True),
    "ce": Objective(cross_entropy, needs_teacher=False),
    "dloss": Objective(loss_ratio, needs_teacher=True, loss_scale=10_000.0),
    "feature_mse": Objective(feature_mse, needs_teacher=True, kind="network"),
    "grad_mse": Objective(grad_mse, needs_teacher=True, kind="network"),
    "gradnorm": Objective(gradient_norm, needs_teacher=False, kind="network", loss_scale=1.0),
}


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class SearchConfig:
    """How a CTS search runs (``cts`` parameters). Constants of the method are module constants."""

    objective: str = "kl"
    search_length: str = "long"
    epochs: int | None = None
    balance: str = "gradbalance"
    lr: float | None = None
    search_at: str = "rewind"
    loss_scale: float | None = None  # null: the authors' factor for the objective (Objective.loss_scale)
    min_kept_per_layer: int = 0  # ablation: the mask keeps at least this many weights in every layer

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"cts.objective must be one of {sorted(OBJECTIVES)}, got {self.objective!r}")
        if self.search_length not in SEARCH_LENGTHS:
            raise ValueError(f"cts.search_length must be one of {SEARCH_LENGTHS}, got {self.search_length!r}")
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1):
            raise ValueError(f"cts.epochs must be null or a positive integer, got {self.epochs!r}")
        if self.balance not in BALANCERS:
            raise ValueError(f"cts.balance must be one of {BALANCERS}, got {self.balance!r}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not self.lr > 0):
            raise ValueError(f"cts.lr must be null (the training rate) or positive, got {self.lr!r}")
        if self.search_at not in STARTS:
            raise ValueError(f"cts.search_at must be one of {STARTS}, got {self.search_at!r}")
        if self.loss_scale is not None and (isinstance(self.loss_scale, bool)
                                            or not isinstance(self.loss_scale, (int, float))
                                            or not math.isfinite(self.loss_scale) or not self.loss_scale > 0):
            raise ValueError("cts.loss_scale must be null (the authors' factor for the objective) or a "
                             f"positive number, got {self.loss_scale!r}")

        if isinstance(self.min_kept_per_layer, bool) or not isinstance(self.min_kept_per_layer, int) \
                or self.min_kept_per_layer < 0:
            raise ValueError("cts.min_kept_per_layer must be a non-negative integer (0: the method's plain "
                             f"global top-k), got {self.min_kept_per_layer!r}")

    @property
    def effective_loss_scale(self) -> float:
        """The factor the objective is multiplied by before its gradient is taken."""
        return float(self.loss_scale) if self.loss_scale is not None else OBJECTIVES[self.objective].loss_scale

    def search_epochs(self, training_epochs: int) -> int:
        """``long`` = the training length, ``short`` = one eighth of it (rounded up); ``epochs`` overrides."""
        if self.epochs is not None:
            return self.epochs
        if self.search_length == "short":
            return max(1, math.ceil(training_epochs * SHORT_SEARCH_FRACTION))
        return training_epochs

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Sparsity control: turn the objective's gradient into the gradient handed to Adam.
#
# Logits are either one flat row ``[d]`` (one search) or ``[K, d]`` (K searches at K densities on
# the same θ_k, batched): every sum and norm runs over the last dimension, per row, so the rows
# never interact and a batched search is K independent searches.


def _per_row(t: torch.Tensor) -> dict:
    return {"dim": -1, "keepdim": t.dim() > 1}


def _row_sum(t: torch.Tensor) -> torch.Tensor:
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

    def combine(self, logits: torch.Tensor, task_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the gradient for the optimizer and the current expected kept count ``Σσ(s)``."""
        keep_prob = torch.sigmoid(logits)
        expected = _row_sum(keep_prob)
        # g_sp = scale·σ(1 − σ); kept unscaled as `spread` and scaled inside the norms and the sum
        # below, so each step makes six passes over the logits instead of ten.
        scale = self._rows.get("scale", logits)
        spread = torch.addcmul(keep_prob, keep_prob, keep_prob, value=-1.0)
        self.over_budget = expected > self._rows.get("budget", logits, torch.float64)  # ⇔ c > 0
        ratio = _row_norm(task_grad) / _row_norm(scale * spread).clamp_min(1e-12)
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

    def load_state_dict(self, state: dict) -> None:
        self.multiplier = state["multiplier"]


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

    def combine(self, logits: torch.Tensor, task_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep_prob = torch.sigmoid(logits)
        expected = _row_sum(keep_prob)
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

    def load_state_dict(self, state: dict) -> None:
        self.multiplier, self.lr = state["multiplier"], state["lr"]


def make_balancer(name: str, density: float | Sequence[float], num_weights: int,
                  mask_lr: float) -> GradBalance | Lagrangian:
    if name == "gradbalance":
        return GradBalance(density, num_weights)
    if name == "lagrangian":
        return Lagrangian(density, num_weights, mask_lr)
    raise ValueError(f"cts.balance must be one of {BALANCERS}, got {name!r}")


# --------------------------------------------------------------------------------------------
# The relaxation


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def concrete_noise(num: int, source: UniformNoise, device: torch.device,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``L = log u − log(1 − u)`` with ``u ~ U(0, 1)``: standard logistic noise, one value per weight.

    Computed as ``logit(u)`` in place in ``out`` (one kernel; CPU ``log1p`` alone costs more than a
    whole dense training step of LeNet-300-100). ``eps`` clamps ``u`` to ``[1e-10, 1 − 1e-10]``,
    which in float32 only lifts exact zeros: uniform draws never return 1.
    """
    u = torch.empty(num, device=device) if out is None else out
    source.fill_(u)
    return torch.logit(u, eps=NOISE_EPS, out=u)


def soft_mask(logits: torch.Tensor, noise: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Binary Concrete sample ``σ(s + L/τ)`` (the scale and the sum in one kernel)."""
    return torch.sigmoid(torch.add(logits, noise, alpha=1.0 / temperature))


class ConcreteMask:
    """One flat logit buffer over every prunable weight, with per-layer views of the masked weights.

    ``θ_k`` is copied once into a flat frozen buffer, so a step computes ``θ ⊙ m̃`` in one
    elementwise product and hands the network views of it (no per-layer copies).

    With a sequence of densities the logits are ``[K, d]``, one row per density, all over the same
    ``θ_k``. A step draws one noise vector ``[d]`` and shares it by every row: a single search at
    density ``κ_k`` with the same seed draws exactly that vector (the noise stream depends on the
    seed and the epoch only), so row ``k`` is that search.
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], density: float | Sequence[float]):
        self.shapes = {name: w.shape for name, w in weights.items()}
        self.theta = torch.cat([w.detach().reshape(-1) for w in weights.values()])
        if isinstance(density, Sequence):
            start = torch.tensor([logit(k) for k in density], dtype=self.theta.dtype, device=self.theta.device)
            self.logits = start[:, None].repeat(1, self.theta.numel()).requires_grad_(True)
        else:
            self.logits = torch.full_like(self.theta, logit(density), requires_grad=True)
        self._noise = torch.empty_like(self.theta)
        self.stacked = False  # K rows through stacked_forward (set once the search has checked it)

    @property
    def batched(self) -> bool:
        return self.logits.dim() == 2

    def sample(self, source: UniformNoise) -> torch.Tensor:
        """This step's soft mask(s): one fresh noise draw per weight, shared by the batch and the rows."""
        noise = concrete_noise(self.num_weights, source, self.theta.device, out=self._noise)
        return soft_mask(self.logits, noise)

    @property
    def num_weights(self) -> int:
        return self.theta.numel()

    def masked_weights(self, soft: torch.Tensor) -> dict[str, torch.Tensor]:
        return unflatten(self.theta * soft, self.shapes)

    def row_weights(self, masked: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[K, d]`` masked weights as ``{name: [K, *shape]}`` (one copy per layer)."""
        sizes = [math.prod(shape) for shape in self.shapes.values()]
        parts = torch.split(masked, sizes, dim=1)
        return {name: part.reshape(masked.shape[0], *shape)
                for (name, shape), part in zip(self.shapes.items(), parts, strict=True)}

    def scores(self, row: int | None = None) -> dict[str, torch.Tensor]:
        """The learned logits per layer (on the CPU), of one row when batched: rank them for the mask."""
        logits = self.logits.detach() if row is None else self.logits.detach()[row]
        return {n: t.clone() for n, t in unflatten(logits.cpu(), self.shapes).items()}


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Normalise every BatchNorm layer with the current batch's statistics.

    Running statistics are detached for the duration, so they are neither used nor updated; the
    model is in eval mode otherwise (the search trains no weight and no BatchNorm parameter).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.running_mean, m.running_var) for m in norms]
    was_training = model.training
    model.eval()
    for m in norms:
        m.running_mean = None
        m.running_var = None
    try:
        yield
    finally:
        for m, (mean, var) in zip(norms, saved, strict=True):
            m.running_mean = mean
            m.running_var = var
        model.train(was_training)


def _masked_forward(model: nn.Module, relaxation: ConcreteMask, soft: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The masked network's output: ``[B, C]``, or ``[K, B, C]`` for K rows of masks.

    K rows run as one pass, each row normalised with its own batch statistics: stacked in the
    channel dimension (:mod:`.stacked`, the fast path) when the search has checked that layout on
    this model, else vectorised by ``torch.func.vmap`` over ``functional_call``.
    """
    if not relaxation.batched:
        return functional_call(model, relaxation.masked_weights(soft), (x,))
    masked = relaxation.theta * soft
    if relaxation.stacked:
        return stacked_forward(model, relaxation.row_weights(masked), x)
    shapes = relaxation.shapes

    def one(row: torch.Tensor) -> torch.Tensor:
        return functional_call(model, unflatten(row, shapes), (x,))

    with warnings.catch_warnings():  # functorch's note on its slow fallback for pooling: not the user's to act on
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        return torch.vmap(one)(masked)


def _check_stacked(model: nn.Module, relaxation: ConcreteMask, x: torch.Tensor, stage: str) -> bool:
    """Use the stacked forward only where it gives what vmap gives on this model (checked once)."""
    if not stacked_supports(model):
        return False
    with torch.no_grad():
        soft = torch.sigmoid(relaxation.logits.detach())
        relaxation.stacked = False
        reference = _masked_forward(model, relaxation, soft, x)
        relaxation.stacked = True
        fast = _masked_forward(model, relaxation, soft, x)
    close = torch.allclose(fast, reference, rtol=1e-4, atol=1e-5)
    if not close:
        logger.warning("%s: the stacked batched forward differs from vmap on this model (max %.3g); using vmap",
                       stage, (fast - reference).abs().max().item())
    return close


def search_step(
    model: nn.Module,
    relaxation: ConcreteMask,
    objective: Objective,
    balancer: GradBalance | Lagrangian,
    optimizer: torch.optim.Optimizer,
    noise: UniformNoise,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_scale: float = 1.0,
    share: float | None = None,
    world: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the search (inside :func:`batch_statistics`); returns the objective (unscaled)
    and ``Σσ(s)``, per row when batched.

    One noise draw per weight for the whole batch (and every row), the teacher forward once and
    without autograd, the masked forward on views of ``θ ⊙ m̃``, the gradient of
    ``loss_scale × objective`` to the logits only, GradBalance, one Adam step.
    """
    soft = relaxation.sample(noise)
    if objective.kind == "network":
        if relaxation.batched:
            raise ValueError("network objectives (feature_mse, grad_mse, gradnorm) search one density at a time")
        loss = objective.fn(model, relaxation, soft, x, y)
    else:
        dense_logits = None
        if objective.needs_teacher:
            with torch.no_grad():
                dense_logits = model(x)
        sparse_logits = _masked_forward(model, relaxation, soft, x)
        if relaxation.batched:
            loss = torch.vmap(lambda s: objective.fn(s, dense_logits, y))(sparse_logits)
        else:
            loss = objective.fn(sparse_logits, dense_logits, y)
    # Rows are independent, so the gradient of their sum is each row's own gradient.
    (task_grad,) = torch.autograd.grad(loss.sum() * loss_scale, relaxation.logits)
    if world > 1:  # under DDP (core/distributed.py) ``x`` is this rank's slice: to the global batch's
        task_grad = average_over_ranks(task_grad, share, world)
    grad, expected = balancer.combine(relaxation.logits.detach(), task_grad)
    relaxation.logits.grad = grad
    optimizer.step()
    return loss.detach(), expected


def stacked_search_ratio(model: nn.Module, train_split: Split, densities: Sequence[float], config: SearchConfig,
                         recipe: TrainRecipe, *, seed: int, channels_last: bool = False, steps: int = 2) -> float:
    """The time of one batched search step over K densities against K single steps: below 1,
    searching the K densities together saves time on this device; above 1, one at a time does.

    The stacked layout wins where K copies of the activations stay cheap (the digits convnet on a
    CPU: 0.77 of the time) and loses where they do not (ResNet-20 at batch 512 on a CPU: 2.0×), and
    no rule of thumb predicts that across devices and shapes, so it is measured, as cuDNN's
    benchmark mode measures its algorithms. Each side runs one warm-up step and ``steps`` timed
    ones on logits, optimizers, noise and a batch of its own (the split's first samples), so the
    search's own state and random streams are untouched.
    """
    device = train_split.device
    objective = OBJECTIVES[config.objective]
    lr = config.lr if config.lr is not None else recipe.lr
    index = torch.arange(min(recipe.batch_size, len(train_split)))
    x = to_layout(train_split.take(index), channels_last)
    y = train_split.labels[index].to(device)
    weights = prunable_parameters(model)

    def seconds_per_step(density: float | list[float]) -> float:
        relaxation = ConcreteMask(weights, density)
        balancer = make_balancer(config.balance, density, relaxation.num_weights, lr)
        optimizer = torch.optim.Adam([relaxation.logits], lr=lr, fused=True)
        noise = UniformNoise(device, seed, "stacking-probe", 0)
        if relaxation.batched:
            relaxation.stacked = _check_stacked(model, relaxation, x, "stacking probe")
        for i in range(steps + 1):
            if i == 1:  # after the warm-up step
                synchronize(device)
                started = time.perf_counter()
            search_step(model, relaxation, objective, balancer, optimizer, noise, x, y, config.effective_loss_scale)
        synchronize(device)
        return (time.perf_counter() - started) / steps

    with frozen_for_search(model, channels_last), batch_statistics(model):
        return seconds_per_step([float(k) for k in densities]) / (len(densities) * seconds_per_step(densities[0]))


@contextmanager
def frozen_for_search(model: nn.Module, channels_last: bool):
    """The model's weights frozen (only the logits learn) and, with ``channels_last``, in NHWC,
    for the duration of a search or a probe; both restored on the way out, whatever happens."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
        if channels_last:
            model.to(memory_format=torch.contiguous_format)


@dataclass
class SearchResult:
    scores: dict[str, torch.Tensor]
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    budget: float = 0.0
    peak_expected_over_budget: float = 0.0
    final_expected_over_budget: float = 0.0
    resumed_at: int | None = None
    shared_by: int = 1  # how many densities searched together in one batched search

    @property
    def group_seconds(self) -> float:
        """Wall-clock of all search epochs, across resumes (of the whole batch when batched)."""
        return sum(r["seconds"] for r in self.history)

    @property
    def seconds(self) -> float:
        """This ticket's share of the search's wall-clock: the whole of it, or 1/K of a batch of K."""
        return self.group_seconds / self.shared_by


def _layer_diagnostics(relaxation: ConcreteMask, row: int | None) -> dict[str, dict[str, float]]:
    """Per layer: the expected kept count ``Σσ(s)`` and the median ``|gradient|`` handed to Adam."""
    logits = relaxation.logits.detach()
    grad = relaxation.logits.grad
    if row is not None:
        logits, grad = logits[row], grad[row]
    kept = unflatten(torch.sigmoid(logits), relaxation.shapes)
    grads = unflatten(grad.abs(), relaxation.shapes)
    return {name: {"expected_kept": kept[name].sum().item(), "grad_median": grads[name].median().item()}
            for name in relaxation.shapes}


def concrete_search(
    model: nn.Module,
    train_split: Split,
    *,
    density: float | Sequence[float],
    config: SearchConfig,
    recipe: TrainRecipe,
    seed: int,
    stage: str = "search",
    checkpoint: Checkpoint | None = None,
    channels_last: bool = False,
    progress: bool = True,
    diagnostics: bool = False,
) -> SearchResult | list[SearchResult]:
    """Learn mask logits for ``model``'s current weights (``θ_k``), which stay frozen.

    ``density`` is one density, or a sequence of densities searched together as one batched
    search (one :class:`SearchResult` per density, in order). A batched search shares the teacher
    forward, the noise draw and the data order, and vectorises the masked forwards; its rows are
    the single searches at those densities (same seed) up to float rounding. Network objectives
    cannot be vectorised and run one density after another.

    ``model`` and ``train_split`` must be on the same device. The data are the training split with
    evaluation transforms (no augmentation), shuffled, at the training batch size. Returns the
    logits per layer; :func:`cts_pipeline.core.masks.global_topk_mask` turns them into the mask.
    With ``checkpoint``, the search state is saved after every epoch and a matching one resumed;
    data order and noise of epoch ``e`` depend only on ``(seed, e)``, so resuming changes nothing.
    ``channels_last`` runs the convolutions in NHWC (1.8x faster ResNet-20 search steps on CPU).
    ``diagnostics`` adds per-layer expected kept counts and median gradient magnitudes to every
    epoch's record (one sort per layer per epoch).
    """
    batched = isinstance(density, Sequence)
    densities = [float(k) for k in density] if batched else [float(density)]
    if not densities:
        raise ValueError("density: an empty sequence of densities")
    for k in densities:
        if not 0.0 < k < 1.0:
            raise ValueError(f"density must be in (0, 1), got {k!r}")
    objective = OBJECTIVES[config.objective]
    if batched and objective.kind == "network":
        return [concrete_search(model, train_split, density=k, config=config, recipe=recipe, seed=seed,
                                stage=f"{stage} {k:g}", checkpoint=None, channels_last=channels_last,
                                progress=progress, diagnostics=diagnostics) for k in densities]
    device = train_split.device
    epochs = config.search_epochs(recipe.epochs)
    lr = config.lr if config.lr is not None else recipe.lr
    loss_scale = config.effective_loss_scale
    steps_per_epoch = math.ceil(len(train_split) / recipe.batch_size)
    rank, world = rank_and_world()
    total_steps = epochs * steps_per_epoch
    drop_step = round(LR_DROP_AT * total_steps)
    rows = len(densities)

    # The weights stay frozen and, with channels_last, in NHWC only while the search runs: restored
    # however it ends (an error, an interrupt), so the caller's model is as it was.
    with frozen_for_search(model, channels_last):
        relaxation = ConcreteMask(prunable_parameters(model), densities if batched else densities[0])
        balancer = make_balancer(config.balance, densities if batched else densities[0], relaxation.num_weights, lr)
        optimizer = torch.optim.Adam([relaxation.logits], lr=lr, fused=True)  # one kernel for all logits
        budgets = [BUDGET_SLACK * k * relaxation.num_weights for k in densities]
        expected_trace = torch.zeros((total_steps, rows) if batched else (total_steps,), device=device)
        histories: list[list[dict]] = [[] for _ in densities]
        resumed_at = None

        first = 0
        saved = checkpoint.load() if checkpoint is not None else None
        if saved is not None and tuple(saved["logits"].shape) != tuple(relaxation.logits.shape):
            logger.warning("%s: ignoring a checkpoint of another shape %s", stage, tuple(saved["logits"].shape))
            saved = None
        if saved is not None:
            with torch.no_grad():
                relaxation.logits.copy_(saved["logits"])
            optimizer.load_state_dict(saved["optimizer"])
            balancer.load_state_dict(saved["balancer"])
            expected_trace[: saved["expected_trace"].shape[0]] = saved["expected_trace"].to(device)
            histories = [list(h) for h in saved["history"]] if batched else [list(saved["history"])]
            first = resumed_at = int(saved["epochs_done"])
            logger.info("%s: resuming from the checkpoint after epoch %d/%d", stage, first, epochs)

        step = first * steps_per_epoch
        checked_stacked = None
        with batch_statistics(model):
            for epoch in tqdm(range(first, epochs), desc=stage, unit="epoch", disable=not progress or None, leave=False):
                epoch_started = time.perf_counter()
                step_losses = torch.zeros((steps_per_epoch, rows) if batched else steps_per_epoch, device=device)
                under_steps = torch.zeros(rows if batched else (), device=device)
                noise = UniformNoise(device, seed, "concrete-noise", epoch)
                batches = iterate_batches(
                    train_split, recipe.batch_size, shuffle=True,
                    generator=generator(device, seed, "search-order", epoch),
                )
                for i, (x, y) in enumerate(batches):
                    share = None
                    if world > 1:
                        x, y, share = shard(x, y, rank, world, presharded=train_split.streamed)
                    x = to_layout(x, channels_last)
                    if batched and checked_stacked is None:
                        relaxation.stacked = checked_stacked = _check_stacked(model, relaxation, x, stage)
                    if step == drop_step:
                        for group in optimizer.param_groups:
                            group["lr"] *= LR_DROP_FACTOR
                        balancer.drop_lr(LR_DROP_FACTOR)
                    loss, expected = search_step(model, relaxation, objective, balancer, optimizer, noise, x, y,
                                                 loss_scale, share, world)
                    step_losses[i] = loss if world == 1 else loss * (share / world)
                    expected_trace[step] = expected.reshape(-1) if batched else expected
                    under_steps += ~balancer.over_budget.reshape(under_steps.shape)
                    step += 1
                all_sum(step_losses)  # the global batch's objective on every rank
                check_finite(step_losses, stage=stage, epoch=epoch, epochs=epochs)
                seconds = time.perf_counter() - epoch_started
                losses = step_losses.mean(0).reshape(-1).tolist()
                kept_now = expected_trace[step - 1].reshape(-1).tolist()
                multipliers = (balancer.multiplier.reshape(-1).tolist() if balancer.multiplier is not None
                               else [0.0] * rows)
                under = (under_steps / steps_per_epoch).reshape(-1).tolist()
                for r in range(rows):
                    record = {
                        "epoch": epoch + 1,
                        "lr": optimizer.param_groups[0]["lr"],
                        "loss": losses[r],
                        "expected_kept": kept_now[r],
                        "expected_over_budget": kept_now[r] / budgets[r],
                        "multiplier": multipliers[r],
                        "under_budget_fraction": under[r],  # steps with λ* = 0: the moving average only decays
                        "seconds": seconds,  # the whole epoch's wall-clock, shared by the rows when batched
                    }
                    if diagnostics:
                        record["layers"] = _layer_diagnostics(relaxation, r if batched else None)
                    histories[r].append(record)
                    logger.info(
                        "%s epoch %d/%d%s: %s %.5f, expected kept %.0f = %.3f x budget, multiplier %.3g (%.1f s)",
                        stage, epoch + 1, epochs, f" density {densities[r]:g}" if batched else "", config.objective,
                        record["loss"], record["expected_kept"], record["expected_over_budget"], record["multiplier"],
                        seconds, extra={"stage": stage, "epoch": epoch + 1, "epochs": epochs},
                    )
                if checkpoint is not None and epoch + 1 < epochs and rank == 0:  # one writer; every rank resumes
                    checkpoint.save({
                        "epochs_done": epoch + 1,
                        "logits": relaxation.logits.detach(),
                        "optimizer": optimizer.state_dict(),
                        "balancer": balancer.state_dict(),
                        "expected_trace": expected_trace[:step],
                        "history": histories if batched else histories[0],
                    })
    final_expected = _row_sum(torch.sigmoid(relaxation.logits.detach())).reshape(-1).tolist()
    peaks = expected_trace.reshape(total_steps, rows).max(0).values.tolist()
    results = [
        SearchResult(
            scores=relaxation.scores(r if batched else None),
            history=histories[r],
            steps=step,
            budget=budgets[r],
            peak_expected_over_budget=max(peaks[r], final_expected[r]) / budgets[r],
            final_expected_over_budget=final_expected[r] / budgets[r],
            resumed_at=resumed_at,
            shared_by=rows,
        )
        for r in range(rows)
    ]
    if checkpoint is not None:
        checkpoint.finish()
    return results if batched else results[0]

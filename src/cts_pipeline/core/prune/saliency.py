"""Pruning-at-initialisation baselines: one scoring function per method, in one registry.

A scorer maps :class:`ScoringInputs` to :data:`Scores`, one tensor per prunable weight, where a
HIGHER score means KEEP. The mask is always ``masks.global_topk_mask(scores, density)``, taken by
the caller, so every method keeps exactly ``round(density * d)`` weights. Adding a method is one
function and one line in :data:`SCORERS`.

Scorers leave the model exactly as they found it (weights, buffers, ``requires_grad`` flags,
train/eval mode, ``.grad``): weights are substituted through ``torch.func.functional_call`` rather
than written, a train-mode forward updates copies of the BatchNorm running statistics, and every
module's mode is restored one by one (a model may mix train and eval submodules).

The references each method is checked against are named in its docstring. Their score
normalisations (SNIP and GraSP divide by a sum) are left out: a positive factor does not change
the ranking.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from ..data.splits import Split
from ..device.runtime import generator
from ..nets.masks import global_topk_mask, prunable_parameters, unflatten
from ..nets.registry import neutral_statistics

Scores = dict[str, torch.Tensor]

SALIENCY_PER_CLASS = 10  # SNIP and GraSP score on one batch of 10 images of every class
GRASP_TEMPERATURE = 200.0  # GraSP divides the logits by T = 200 (Wang et al. 2020)
SYNFLOW_ITERATIONS = 100  # SynFlow's exponential schedule: density κ^(i/100), i = 1..100
# SynFlow's score for a weight an earlier iteration pruned. Every flow score is >= 0, so this sits
# below all of them: a pruned weight is never revived, as the reference's -inf ensures, and it is
# finite, which global_topk_mask requires.
PRUNED_SCORE = -1.0


@dataclass(frozen=True)
class ScoringInputs:
    """What any scorer may look at."""

    model: nn.Module  # on the device, holding the weights to score (θ_0, or θ_k for that variant)
    data: Split  # the training split, already on the model's device
    density: float  # target density κ; SynFlow needs it for its schedule
    seed: int  # for random choices: the scoring batch, random scores

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density!r}")


# --------------------------------------------------------------------------------------------
# Shared helpers


def class_balanced_batch(
    data: Split, per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` random images of every class, normalised, grouped by class, with their labels.

    Taking the first ``per_class`` of each class in one seeded permutation is what GraSP's
    ``GraSP_fetch_data`` does with a shuffled loader, without its dependence on batch boundaries.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    device = data.labels.device
    order = torch.randperm(len(data), generator=generator(device, seed, "saliency-batch"),
                           device=device)
    shuffled_labels = data.labels[order]
    picked = []
    for label in range(data.info.num_classes):
        of_class = order[shuffled_labels == label][:per_class]
        if len(of_class) < per_class:
            raise ValueError(
                f"dataset {data.info.name!r} has {len(of_class)} images of class {label}, "
                f"fewer than the {per_class} per class the scoring batch needs"
            )
        picked.append(of_class)
    index = torch.cat(picked)
    return data.take(index), data.labels[index].to(data.device)


@contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Put every module in train or eval mode, then give each back its own previous flag."""
    saved = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, flag in saved:
            module.training = flag


def _leaf_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The prunable weights as fresh autograd leaves sharing their storage (never written to)."""
    return {n: p.detach().requires_grad_(True) for n, p in prunable_parameters(model).items()}


def _forward(model: nn.Module, tensors: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` with ``tensors`` in place of the model's own, on copies of its buffers.

    A train-mode BatchNorm updates its running statistics in place; here it updates the copies,
    which are thrown away, so the model's statistics stay what they were.
    """
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return functional_call(model, {**buffers, **tensors}, (x,))


class _TwiceDifferentiable(TorchFunctionMode):
    """Hard-sigmoid and hard-swish (MobileNetV3's activations) written as the clamp they are:
    their fused backward kernels have no derivative of their own, which GraSP's Hessian-gradient
    product needs. Same values; the result is returned, never written in place."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.hardsigmoid:
            return torch.clamp(args[0] + 3.0, 0.0, 6.0) / 6.0
        if func is F.hardswish:
            return args[0] * torch.clamp(args[0] + 3.0, 0.0, 6.0) / 6.0
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# Scorers


def snip(inputs: ScoringInputs) -> Scores:
    """SNIP (Lee et al. 2019): connection sensitivity ``|w ⊙ ∂L/∂w|``.

    ``L`` is the mean cross-entropy on one batch of 10 images per class, forward in train mode
    (BatchNorm uses the batch's statistics), as mil-ad/snip ``snip.py`` and Synaptic-Flow's
    ``SNIP.score`` do on a freshly built (train-mode) network. ``|∂L/∂m|`` at ``m = 1`` for a mask
    ``m`` multiplying the weights, the papers' definition, is this same quantity.
    """
    model = inputs.model
    x, y = class_balanced_batch(inputs.data, SALIENCY_PER_CLASS, inputs.seed)
    weights = _leaf_weights(model)
    with _mode(model, training=True):
        loss = F.cross_entropy(_forward(model, weights, x), y)
    grads = torch.autograd.grad(loss, list(weights.values()))
    return {n: (w.detach() * g).abs() for (n, w), g in zip(weights.items(), grads, strict=True)}


def grasp(inputs: ScoringInputs) -> Scores:
    """GraSP (Wang et al. 2020): keep-score ``θ ⊙ Hg``, logits divided by ``T = 200``.

    ``g = ∂L/∂θ`` is held fixed (no graph) and ``Hg = ∂(gᵀ ∂L/∂θ)/∂θ``, on one batch of 10 images
    per class, forward in train mode (the reference builds a fresh network and leaves ``.eval()``
    commented out). Sign: alecwangcq/GraSP ``pruner/GraSP.py`` computes ``S = -θ ⊙ Hg`` (L140,
    "``-theta_q Hg``") and REMOVES the highest ``S``: it keeps ``S <= `` the
    ``int(d·(1-κ))``-th largest (L148-155). Keeping the lowest ``-θ ⊙ Hg`` is keeping the highest
    ``θ ⊙ Hg``, which is what this returns; Synaptic-Flow's ``GraSP.score`` stores the same
    ``p.grad * p.data`` ("negate to remove top percent") and keeps its highest. The reference's
    re-initialisation of linear layers (``reinit=True``) and its split of the batch into two
    halves are not reproduced: the first scores other weights than those kept, the second only
    rescales ``Hg`` (and changes which images share BatchNorm statistics).
    """
    model = inputs.model
    x, y = class_balanced_batch(inputs.data, SALIENCY_PER_CLASS, inputs.seed)
    weights = _leaf_weights(model)
    params = list(weights.values())
    # Attention by the composite (math) kernel and hard activations as clamps: the fused kernels
    # have no second derivative.
    with _mode(model, training=True), sdpa_kernel(SDPBackend.MATH), _TwiceDifferentiable():
        loss = F.cross_entropy(_forward(model, weights, x) / GRASP_TEMPERATURE, y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    # gᵀ·stopgrad(g): its gradient is H·g, the Hessian-gradient product.
    g_dot_g = sum((g * g.detach()).sum() for g in grads)
    hg = torch.autograd.grad(g_dot_g, params, materialize_grads=True)
    return {n: w.detach() * h for (n, w), h in zip(weights.items(), hg, strict=True)}


def synflow_flow(
    model: nn.Module, mask: Mapping[str, torch.Tensor], image_shape: tuple[int, ...]
) -> Scores:
    """One SynFlow scoring: ``|θ ⊙ ∂R/∂θ|`` with ``R = 1ᵀ f(1; |θ| ⊙ mask)``, in float64.

    As Synaptic-Flow's ``SynFlow.score``: every parameter AND buffer is replaced by its absolute
    value (``linearize`` takes ``abs_()`` of the whole ``state_dict``), the network runs in eval
    mode (``prune_loop`` calls ``model.eval()``), so BatchNorm is the fixed affine map
    ``|γ|(x - |μ|)/sqrt(|σ²| + ε) + |β|`` of its running statistics, and the input is one all-ones
    image. Float64 keeps the product of many layers' weights from overflowing. The model itself is
    never touched: no sign has to be restored.
    """
    prunable = prunable_parameters(model)
    # A model built without running statistics (bn_running_stats: false) gets neutral ones (μ = 0,
    # σ² = 1) for the duration: in eval mode its BatchNorm is then |γ|x/sqrt(1 + ε) + |β|.
    with neutral_statistics(model):
        with torch.no_grad():
            tensors = {n: p.detach().abs().double() for n, p in model.named_parameters()}
            tensors.update({n: b.detach().abs().double() if b.is_floating_point() else b.clone()
                            for n, b in model.named_buffers()})
        weights = {n: (tensors[n] * mask[n]).requires_grad_(True) for n in prunable}
        ones = torch.ones(1, *image_shape, dtype=torch.float64, device=next(iter(prunable.values())).device)
        with _mode(model, training=False):
            flow = functional_call(model, {**tensors, **weights}, (ones,)).sum()
    grads = torch.autograd.grad(flow, list(weights.values()), materialize_grads=True)
    return {n: (w.detach() * g).abs() for (n, w), g in zip(weights.items(), grads, strict=True)}


def synflow(inputs: ScoringInputs, iterations: int = SYNFLOW_ITERATIONS) -> Scores:
    """SynFlow (Tanaka et al. 2020): ``iterations`` rounds of flow scoring and global pruning.

    Round ``i`` scores the network masked by the previous round (:func:`synflow_flow`) and keeps
    the global top ``round(κ^(i/iterations)·d)``, the exponential schedule of Synaptic-Flow's
    ``prune_loop``. The returned scores are the last round's, divided by their maximum (ranking
    unchanged, and finite in the float32 that ``global_topk_mask`` ranks in), with the weights
    pruned in earlier rounds at :data:`PRUNED_SCORE`. Every round's mask is taken with
    ``global_topk_mask`` on exactly such scores, so ``global_topk_mask(returned, κ)`` IS the final
    mask.
    """
    model = inputs.model
    mask = {n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_parameters(model).items()}
    scores: Scores = {}
    for i in range(1, iterations + 1):
        flow = synflow_flow(model, mask, inputs.data.info.image_shape)
        top = max(float(f.max()) for f in flow.values())
        if not math.isfinite(top):
            raise FloatingPointError(f"SynFlow's flow is not finite ({top}) at round {i}, even in "
                                     "float64: the network is too deep for this scoring")
        scale = 1.0 / top if top > 0 else 1.0
        scores = {n: torch.where(mask[n], f * scale, PRUNED_SCORE).float() for n, f in flow.items()}
        mask = global_topk_mask(scores, inputs.density ** (i / iterations))
    return scores


def magnitude(inputs: ScoringInputs) -> Scores:
    """Global magnitude pruning at the given weights: ``|w|``."""
    return {n: p.detach().abs() for n, p in prunable_parameters(inputs.model).items()}


def random(inputs: ScoringInputs) -> Scores:
    """Uniform random scores from the ``random-scores`` stream: a uniformly random mask."""
    prunable = prunable_parameters(inputs.model)
    device = next(iter(prunable.values())).device
    total = sum(p.numel() for p in prunable.values())
    flat = torch.rand(total, generator=generator(device, inputs.seed, "random-scores"),
                      device=device)
    return unflatten(flat, {n: p.shape for n, p in prunable.items()})


SCORERS: dict[str, Callable[[ScoringInputs], Scores]] = {
    "snip": snip,
    "grasp": grasp,
    "synflow": synflow,
    "magnitude": magnitude,
    "random": random,
}


def score(method: str, inputs: ScoringInputs) -> Scores:
    """Scores of pruning method ``method`` (a key of :data:`SCORERS`); higher means keep."""
    if method not in SCORERS:
        known = ", ".join(sorted(SCORERS))
        raise ValueError(f"unknown pruning method {method!r} (pai.methods); known: {known}")
    return SCORERS[method](inputs)

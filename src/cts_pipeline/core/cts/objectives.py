"""The search's objectives: what the masked network is asked to keep of the dense one.

Logit objectives are functions of (masked logits, dense-teacher logits, labels) → a scalar to
minimise. Network objectives (ablations) need more than the two outputs: intermediate features or
the gradients of the loss with respect to the weights. They get (model, relaxation, soft mask, x,
y) and run their own forwards; the search's BatchNorm context (batch statistics) is active.
A new objective is one function and one entry of :data:`OBJECTIVES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from ..nets.masks import prunable_parameters, unflatten

if TYPE_CHECKING:
    from .relaxation import ConcreteMask


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


# Every spelling of a ReLU: the module and F.relu end in torch.relu, users also write x.relu().
_RELUS = frozenset({F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_})


class _ReluOutputs(TorchFunctionMode):
    """Records the output of every ReLU a forward applies, module, functional or tensor method,
    flattened per sample and in the order applied. The project's models call ``F.relu`` as often as ``nn.ReLU``,
    so hooks on modules would miss half of them; a function mode sees both (inside it the mode is
    off, so ``F.relu`` calling ``torch.relu`` is recorded once)."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _RELUS:
            flat = out.reshape(out.shape[0], -1)
            # Without autograd (the teacher) a model may edit a ReLU's output in place later in its
            # forward: keep a copy of what the ReLU gave. (With autograd such an edit fails the
            # model's own backward, so the capture needs no copy there.)
            self.outputs.append(flat if torch.is_grad_enabled() else flat.clone())
        return out


def _activations(forward: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
    """Every ReLU output of ``forward()``, then the softmax of its logits."""
    with _ReluOutputs() as capture:
        logits = forward()
    return [*capture.outputs, torch.softmax(logits.float(), dim=1)]


def activation_mse(model: nn.Module, relaxation: ConcreteMask, soft: torch.Tensor, x: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """The authors' ``msefeature`` as their code runs it (TLAB 68c9740, ``NormalizedMseFeatures``
    in ``search/concrete.py:484``, its captures in ``training/concrete_training.py:117``): every
    post-ReLU activation and softmax(logits), each standardised per sample, MSE, mean over them."""
    with torch.no_grad():
        dense = _activations(lambda: model(x))
    sparse = _activations(lambda: functional_call(model, relaxation.masked_weights(soft), (x,)))
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

    ``batch_mean`` objectives can run a batch as micro-batches (``core.train.memory``) with the same
    gradient; the loss ratio and the network objectives are not means over samples and run whole.

    ``lagrange_lr_factor`` scales the Lagrangian ablation's multiplier rate for this objective: the
    authors divide it by 10 for their feature matching (``search/concrete.py:494``).
    """

    fn: Callable[..., torch.Tensor]
    needs_teacher: bool
    kind: str = "logits"
    loss_scale: float = 100.0
    batch_mean: bool = False  # a mean over the batch's samples: micro-batches weighted by size give it exactly
    lagrange_lr_factor: float = 1.0


OBJECTIVES: dict[str, Objective] = {
    "kl": Objective(reverse_kl, needs_teacher=True, batch_mean=True),
    "fkl": Objective(forward_kl, needs_teacher=True, batch_mean=True),
    "ce": Objective(cross_entropy, needs_teacher=False, batch_mean=True),
    "dloss": Objective(loss_ratio, needs_teacher=True, loss_scale=10_000.0),
    "feature_mse": Objective(feature_mse, needs_teacher=True, kind="network"),
    "grad_mse": Objective(grad_mse, needs_teacher=True, kind="network"),
    "gradnorm": Objective(gradient_norm, needs_teacher=False, kind="network", loss_scale=1.0),
}

# ``cts.feature_capture``: what ``feature_mse`` compares. ``layer_outputs`` (the default, and the
# objective's entry above): every prunable layer's output. ``activations``: the authors' code.
FEATURE_CAPTURES: dict[str, Objective] = {
    "layer_outputs": OBJECTIVES["feature_mse"],
    "activations": Objective(activation_mse, needs_teacher=True, kind="network", lagrange_lr_factor=0.1),
}

"""Effective sparsity: which kept weights lie on some path from the input to the output.

A kept weight that no input reaches, or that reaches no output, computes nothing (Vysogorets &
Kempe, "Connectivity matters: neural network pruning through the lens of effective sparsity",
JMLR 2023): a layer-2 filter whose layer-1 inputs were all pruned, or a unit no later weight reads.
So a mask's nominal kept count can overstate what it keeps, and a mask can disconnect the input
from the output with no layer empty.

Computed on the mask's structure alone, with the network's own forward, as SynFlow does: every
weight set to its mask value (0 or 1), biases and BatchNorm made neutral, max-pooling counted as
averaging (every input of a window is connected, not only the largest), an all-ones input, in
float64. Every value is then non-negative, so nothing cancels: the gradient of the summed output
with respect to a weight is (signal reaching its input) × (paths from its output to the logits),
nonzero exactly when the weight is on an input-output path.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..nets.masks import Mask, check_mask_matches, prunable_parameters


def _as_average_pool(module: nn.MaxPool2d):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, module.kernel_size, module.stride, module.padding, module.ceil_mode)

    return forward


@torch.no_grad()
def _structural_copy(model: nn.Module, mask: Mapping[str, torch.Tensor]) -> nn.Module:
    net = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
    weights = prunable_parameters(net)
    for name, param in net.named_parameters():
        if name in weights:
            param.copy_(mask[name].to(torch.float64))
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.fill_(1.0)  # BatchNorm scales, unprunable weights (VGG's classifier): pass everything on
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.running_mean is None:  # built without running statistics (bn_running_stats: false)
                module.running_mean = torch.zeros(module.num_features, dtype=torch.float64)
                module.running_var = torch.ones(module.num_features, dtype=torch.float64)
            module.running_mean.zero_()
            module.running_var.fill_(1.0 - module.eps)  # x / sqrt(var + eps) = x
        elif isinstance(module, nn.MaxPool2d):
            module.forward = _as_average_pool(module)
    return net


def effective_mask(model: nn.Module, mask: Mapping[str, torch.Tensor], input_shape: tuple[int, ...]) -> Mask:
    """The kept weights of ``mask`` that lie on a path from the input to the output of ``model``.

    ``input_shape`` is one sample's shape, e.g. ``(1, 28, 28)``. ``model`` is not modified.
    """
    check_mask_matches(model, mask)
    net = _structural_copy(model, mask)
    weights = prunable_parameters(net)
    for param in net.parameters():
        param.requires_grad_(param in set(weights.values()))
    out = net(torch.ones(1, *input_shape, dtype=torch.float64))
    grads = torch.autograd.grad(out.sum(), list(weights.values()), allow_unused=True)
    if not torch.isfinite(out).all():
        raise FloatingPointError("path counts overflowed float64; this network is too deep for the check")
    return {name: mask[name].to(torch.bool) & (grad is not None and (grad != 0).cpu())
            for (name, _), grad in zip(weights.items(), grads, strict=True)}


def effective_report(model: nn.Module, mask: Mapping[str, torch.Tensor], input_shape: tuple[int, ...]) -> dict:
    """Nominal and effective kept counts, per layer and overall, and whether the input still
    reaches the output at all."""
    effective = effective_mask(model, mask, input_shape)
    nominal = {n: int(m.sum()) for n, m in mask.items()}
    kept = {n: int(m.sum()) for n, m in effective.items()}
    total = sum(m.numel() for m in mask.values())
    return {
        "layer_effective_kept": kept,
        "effective_kept_weights": sum(kept.values()),
        "effective_density": sum(kept.values()) / total,
        "inactive_kept_weights": sum(nominal.values()) - sum(kept.values()),
        "disconnected": sum(kept.values()) == 0,
    }

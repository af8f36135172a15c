"""One forward pass of a network under K sets of prunable weights: the batched search's student.

``torch.func.vmap`` over ``functional_call`` is the general tool for this, and the search falls
back to it. On CPUs it measured no faster than K separate forwards (convnet on digits, K = 5:
0.99 of the sequential time), because its batching rules for convolutions move the K dimension in
and out of the channel dimension with a copy at every layer. This module keeps the K copies of
every activation side by side in the channel dimension instead, ``[B, K·C, H, W]`` (row ``k``'s
channels at ``k·C … (k+1)·C − 1``), for the whole forward:

- a convolution is one grouped convolution (``groups = K``) over the stacked weights, or, on the
  shared input image, one convolution with ``K·C_out`` filters;
- BatchNorm over ``K·C`` channels normalises every row's channels with that row's own batch
  statistics, exactly as K separate forwards in batch-statistics mode;
- a linear layer is one batched matrix product (``[K, B, F] @ [K, F, O]``), or one product on a
  shared input;
- everything else (ReLU, pooling, residual additions, flattening) acts per channel and needs no
  change: ``flatten`` of ``[B, K·C, H, W]`` lays row ``k`` out contiguously, as the next layer
  expects.

Only these module types are rewritten; :func:`supports` says whether a model's layers are all of
kinds this layout is known to be right for, and the search checks the result against ``vmap`` once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# Leaf modules that act per channel (or per element), so they run unchanged on stacked activations.
_CHANNELWISE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Flatten,
                nn.Dropout)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def supports(model: nn.Module) -> bool:
    """Whether every leaf module is a kind this module rewrites or one that needs no rewrite."""
    for module in model.modules():
        if next(module.children(), None) is not None:
            continue  # a container: its own forward only wires leaves together
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.padding_mode != "zeros":
                return False
        elif not isinstance(module, (nn.Linear, *_NORMS, *_CHANNELWISE)):
            return False
    return True


def _conv(module: nn.Conv2d, weight: torch.Tensor, rows: int):
    bias = None if module.bias is None else module.bias.repeat(rows)
    shared_input_channels = module.in_channels

    def forward(x: torch.Tensor) -> torch.Tensor:
        flat = weight.reshape(rows * module.out_channels, *weight.shape[2:])
        groups = 1 if x.shape[1] == shared_input_channels else rows  # shared image, or stacked rows
        return F.conv2d(x, flat, bias, module.stride, module.padding, module.dilation, groups)

    return forward


def _linear(module: nn.Linear, weight: torch.Tensor, rows: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == module.in_features:  # shared input: one product with K·O outputs
            out = F.linear(x, weight.reshape(rows * module.out_features, module.in_features))
            return out if module.bias is None else out + module.bias.repeat(rows)
        per_row = x.reshape(x.shape[0], rows, module.in_features).transpose(0, 1)  # [K, B, F]
        out = torch.bmm(per_row, weight.transpose(1, 2))  # [K, B, O]
        if module.bias is not None:
            out = out + module.bias
        return out.transpose(0, 1).reshape(x.shape[0], rows * module.out_features)

    return forward


def _norm(module: nn.modules.batchnorm._BatchNorm, rows: int):
    weight = None if module.weight is None else module.weight.repeat(rows)
    bias = None if module.bias is None else module.bias.repeat(rows)

    def forward(x: torch.Tensor) -> torch.Tensor:
        # Batch statistics, per channel of every row; running statistics are neither used nor updated.
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, module.eps)

    return forward


@contextmanager
def _rewired(model: nn.Module, weights: Mapping[str, torch.Tensor], rows: int) -> Iterator[None]:
    patched = []
    try:
        for name, module in model.named_modules():
            key = f"{name}.weight" if name else "weight"
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                weight = weights.get(key)
                if weight is None:  # not prunable (VGG's classifier): the same weight for every row
                    weight = module.weight.unsqueeze(0).expand(rows, *module.weight.shape)
                make = _conv if isinstance(module, nn.Conv2d) else _linear
                module.forward = make(module, weight, rows)
            elif isinstance(module, _NORMS):
                module.forward = _norm(module, rows)
            else:
                continue
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


def stacked_forward(model: nn.Module, weights: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``model``'s logits under each of K weight sets, ``[K, B, classes]``, in one pass.

    ``weights`` maps every prunable weight's name to a ``[K, *shape]`` tensor; other parameters are
    shared. BatchNorm uses each row's batch statistics (the search's mode). ``x`` is shared by all
    rows.
    """
    rows = next(iter(weights.values())).shape[0]
    with _rewired(model, weights, rows):
        out = model(x)
    return out.reshape(out.shape[0], rows, -1).transpose(0, 1)

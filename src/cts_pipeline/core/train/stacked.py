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

from ..device.ghost_batchnorm import batch_norm_by_rank

# Leaf modules that act per channel (or per element), so they run unchanged on stacked activations.
_CHANNELWISE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Flatten,
                nn.Dropout)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def unsupported_layers(model: nn.Module) -> list[str]:
    """The kinds of leaf module this module neither rewrites nor runs unchanged (sorted, each once):
    why a model trains and searches one row at a time."""
    unknown = set()
    for module in model.modules():
        if next(module.children(), None) is not None and not isinstance(module, nn.MultiheadAttention):
            if next(module.parameters(recurse=False), None) is not None:
                unknown.add(f"{type(module).__name__} (parameters of its own)")
            continue  # a container: its own forward only wires leaves together
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                unknown.add("grouped Conv2d")
            elif module.padding_mode != "zeros":
                unknown.add(f"Conv2d with {module.padding_mode} padding")
        elif not isinstance(module, (nn.Linear, *_NORMS, *_CHANNELWISE)):
            unknown.add(type(module).__name__)
    return sorted(unknown)


def supports(model: nn.Module) -> bool:
    """Whether every leaf module is a kind this module rewrites or one that needs no rewrite."""
    return not unsupported_layers(model)


def _row_param(module: nn.Module, name: str, params: Mapping[str, torch.Tensor], key: str, rows: int):
    """This module's parameter ``key`` for K rows: the stacked one (``[K, *shape]``), or the
    module's own shared by every row (``None`` when the module has none)."""
    stacked = params.get(f"{name}.{key}" if name else key)
    if stacked is not None:
        return stacked
    own = getattr(module, key)
    return None if own is None else own.unsqueeze(0).expand(rows, *own.shape)


def _conv(module: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None, rows: int):
    shared_input_channels = module.in_channels

    def forward(x: torch.Tensor) -> torch.Tensor:
        flat = weight.reshape(rows * module.out_channels, *weight.shape[2:])
        groups = 1 if x.shape[1] == shared_input_channels else rows  # shared image, or stacked rows
        flat_bias = None if bias is None else bias.reshape(-1)
        return F.conv2d(x, flat, flat_bias, module.stride, module.padding, module.dilation, groups)

    return forward


def _linear(module: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None, rows: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == module.in_features:  # shared input: one product with K·O outputs
            out = F.linear(x, weight.reshape(rows * module.out_features, module.in_features))
            return out if bias is None else out + bias.reshape(-1)
        per_row = x.reshape(x.shape[0], rows, module.in_features).transpose(0, 1)  # [K, B, F]
        out = torch.bmm(per_row, weight.transpose(1, 2))  # [K, B, O]
        if bias is not None:
            out = out + bias[:, None, :]
        return out.transpose(0, 1).reshape(x.shape[0], rows * module.out_features)

    return forward


def _norm(module: nn.modules.batchnorm._BatchNorm, weight, bias, running: tuple | None, training: bool,
          ranks: int = 1):
    """BatchNorm over K·C channels. ``running`` (flat ``[K·C]`` views of the stacked running
    statistics) are used in evaluation and updated in place in training; without them, every
    call normalises with the batch's statistics and keeps none (the search's mode).

    ``ranks`` P > 1 (training only): each of P virtual ranks' chunks (every P-th sample) is
    normalised with its own statistics, as :mod:`..device.ghost_batchnorm` does for one network: the
    batch ``[B, K·C, H, W]`` viewed as ``[B/P, P·K·C, H, W]``, γ and β repeated P times, and
    ``running`` then ``[P·K·C]`` views whose first K·C entries are the tickets' own (rank 0's)."""
    flat_weight = None if weight is None else weight.reshape(-1)
    flat_bias = None if bias is None else bias.reshape(-1)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if running is None:
            return F.batch_norm(x, None, None, flat_weight, flat_bias, True, 0.0, module.eps)
        return F.batch_norm(x, running[0], running[1], flat_weight, flat_bias, training, module.momentum,
                            module.eps)

    def by_rank(x: torch.Tensor) -> torch.Tensor:
        mean, var = (None, None) if running is None else running
        return batch_norm_by_rank(x, ranks, mean, var, flat_weight, flat_bias,
                                  0.0 if running is None else module.momentum, module.eps)

    return by_rank if ranks > 1 and (training or running is None) else forward


@contextmanager
def rewired(model: nn.Module, params: Mapping[str, torch.Tensor], rows: int,
            buffers: Mapping[str, torch.Tensor] | None = None, training: bool = True,
            ranks: int = 1) -> Iterator[None]:
    """Within the block, ``model(x)`` computes K rows at once in the stacked layout.

    ``params`` maps parameter names to ``[K, *shape]`` tensors; parameters not in it are shared by
    every row. ``buffers`` holds stacked BatchNorm running statistics (``[K, C]``, contiguous),
    used in evaluation (``training=False``) and updated in place in training; without it,
    BatchNorm uses batch statistics only. ``ranks`` P > 1: in training, BatchNorm normalises each
    virtual rank's chunk apart (:func:`_norm`), and ``buffers`` holds ``[P, K, C]`` statistics.
    """
    patched = []
    try:
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                make = _conv if isinstance(module, nn.Conv2d) else _linear
                module.forward = make(module, _row_param(module, name, params, "weight", rows),
                                      _row_param(module, name, params, "bias", rows), rows)
            elif isinstance(module, _NORMS):
                running = None
                if buffers is not None and module.track_running_stats:
                    prefix = f"{name}." if name else ""
                    running = (buffers[prefix + "running_mean"].view(-1), buffers[prefix + "running_var"].view(-1))
                module.forward = _norm(module, _row_param(module, name, params, "weight", rows),
                                       _row_param(module, name, params, "bias", rows), running, training, ranks)
            else:
                continue
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


def unstack(out: torch.Tensor, rows: int) -> torch.Tensor:
    """The model's stacked output ``[B, K·classes]`` as ``[K, B, classes]``."""
    return out.reshape(out.shape[0], rows, -1).transpose(0, 1)


def stacked_forward(model: nn.Module, weights: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``model``'s logits under each of K weight sets, ``[K, B, classes]``, in one pass.

    ``weights`` maps every prunable weight's name to a ``[K, *shape]`` tensor; other parameters are
    shared. BatchNorm uses each row's batch statistics (the search's mode). ``x`` is shared by all
    rows.
    """
    rows = next(iter(weights.values())).shape[0]
    with rewired(model, weights, rows):
        return unstack(model(x), rows)

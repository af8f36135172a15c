"""Prunable parameters, binary masks and their per-layer report.

A mask is a plain ``dict[str, torch.BoolTensor]``: parameter name (as in ``model.named_parameters()``)
to a boolean tensor of that weight's shape, ``True`` where the weight is kept. Nothing else is
needed to apply it anywhere. On disk it travels as the payload of :func:`mask_to_payload`, which
adds the counts a reader wants to check without recomputing them.

Sparsity is the fraction of prunable weights removed, density the fraction kept
(``density = 1 - sparsity``); every function here names which one it takes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from .selection import ATTRIBUTE, selected_names

Mask = dict[str, torch.Tensor]

MASK_FORMAT = "cts-pipeline/mask-v1"


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weights of every convolution and linear layer, in module order; or, for a model given a
    ``model.prunable`` selection (:func:`.selection.select_prunable`), the parameters it picks.

    By default biases and BatchNorm parameters are never prunable. A model can keep whole layers
    dense by listing their module-name prefixes in a ``keep_dense`` attribute (VGG keeps its classifier).
    """
    selection = getattr(model, ATTRIBUTE, None)
    if selection is not None:
        params = dict(model.named_parameters())
        return {name: params[name] for name in selected_names(model, selection)}
    keep_dense = tuple(getattr(model, "keep_dense", ()))
    prunable = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            continue
        if any(module_name == p or module_name.startswith(p + ".") for p in keep_dense):
            continue
        name = f"{module_name}.weight" if module_name else "weight"
        prunable[name] = module.weight
    return prunable


def count_prunable(model: nn.Module) -> int:
    """Number of prunable weights ``d``."""
    return sum(p.numel() for p in prunable_parameters(model).values())


def kept_count(density: float, total: int) -> int:
    """Exactly how many weights a mask at ``density`` keeps out of ``total``: ``round(density * total)``
    (Python's rounding: an exact half goes to the even count).

    Raises ``ValueError`` when that is zero (the network would have no weights left) or when the
    density is outside (0, 1].
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    kept = round(density * total)
    if kept < 1:
        raise ValueError(
            f"density {density:g} keeps round({density:g} x {total}) = 0 of {total} prunable "
            "weights; choose a lower sparsity"
        )
    return kept


def global_topk_mask(scores: Mapping[str, torch.Tensor], density: float, *, min_per_layer: int = 0) -> Mask:
    """Keep the ``round(density * d)`` highest scores over all layers at once (no per-layer quota).

    ``min_per_layer`` (an opt-in ablation, never the default) first reserves each layer's
    ``min(min_per_layer, layer size)`` highest scores, then fills the rest of the same total count
    from the global ranking; the kept count is unchanged. Ties are broken by ``torch.topk`` on the
    concatenated scores, which is deterministic on CPU.
    """
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names])
    if not torch.isfinite(flat).all():
        bad = [n for n in names if not torch.isfinite(scores[n]).all()]
        raise ValueError(f"scores are not finite in {bad}: cannot rank weights")
    k = kept_count(density, flat.numel())
    shapes = {n: scores[n].shape for n in names}
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if min_per_layer:
        if isinstance(min_per_layer, bool) or not isinstance(min_per_layer, int) or min_per_layer < 0:
            raise ValueError(f"min_per_layer must be a non-negative integer, got {min_per_layer!r}")
        floors = {n: min(min_per_layer, math.prod(shape)) for n, shape in shapes.items()}
        if sum(floors.values()) > k:
            raise ValueError(f"a floor of {min_per_layer} weights in each of {len(names)} layers needs "
                             f"{sum(floors.values())} weights, but density {density:g} keeps only {k}")
        offset = 0
        for n, layer in unflatten(flat, shapes).items():
            top = torch.topk(layer.reshape(-1), floors[n], sorted=False).indices
            keep[offset + top] = True
            offset += layer.numel()
        rest = flat.masked_fill(keep, float("-inf"))
        keep[torch.topk(rest, k - int(keep.sum()), sorted=False).indices] = True
    else:
        keep[torch.topk(flat, k, sorted=False).indices] = True
    return unflatten(keep, shapes)


def unflatten(flat: torch.Tensor, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Split a flat tensor into per-layer tensors of the given shapes (views, in order).

    ``torch.split`` rather than slicing: its backward is one concatenation, where each slice's
    backward would build a zero tensor the size of the whole network.
    """
    sizes = [math.prod(shape) for shape in shapes.values()]
    if sum(sizes) != flat.numel():
        raise ValueError(f"flat tensor has {flat.numel()} elements, shapes need {sum(sizes)}")
    parts = torch.split(flat, sizes)
    return {name: part.view(shape) for (name, shape), part in zip(shapes.items(), parts, strict=True)}


@torch.no_grad()
def apply_mask(model: nn.Module, mask: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights of ``model`` in place."""
    params = dict(model.named_parameters())
    for name, keep in mask.items():
        params[name].mul_(keep.to(device=params[name].device, dtype=params[name].dtype))


def check_mask_matches(model: nn.Module, mask: Mapping[str, torch.Tensor]) -> None:
    """Fail with the offending layer when ``mask`` does not fit ``model``'s prunable weights."""
    prunable = prunable_parameters(model)
    if set(mask) != set(prunable):
        missing = sorted(set(prunable) - set(mask))
        extra = sorted(set(mask) - set(prunable))
        raise ValueError(f"mask does not match the model: missing {missing}, unexpected {extra}")
    for name, weight in prunable.items():
        if tuple(mask[name].shape) != tuple(weight.shape):
            raise ValueError(
                f"mask for {name} has shape {tuple(mask[name].shape)}, "
                f"the weight has {tuple(weight.shape)}"
            )


def layer_report(mask: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float | int]]:
    """Per-layer kept and total counts and density, in layer order."""
    report = {}
    for name, keep in mask.items():
        kept, total = int(keep.sum()), keep.numel()
        report[name] = {"kept": kept, "total": total, "density": kept / total}
    return report


def collapsed_layers(mask: Mapping[str, torch.Tensor]) -> list[str]:
    """Layers the mask prunes away entirely (layer collapse: the network is disconnected)."""
    return [name for name, keep in mask.items() if not bool(keep.any())]


THIN_LAYER_KEPT = 8  # fewer kept weights than this in a layer (of more) is near collapse: warn


def thin_layers(mask: Mapping[str, torch.Tensor], fewer_than: int = THIN_LAYER_KEPT) -> dict[str, int]:
    """Layers that keep some weights but fewer than ``fewer_than`` (and fewer than their size):
    the narrow bottlenecks that precede layer collapse at extreme sparsity."""
    counts = {name: int(keep.sum()) for name, keep in mask.items()}
    return {name: kept for name, kept in counts.items()
            if 0 < kept < min(fewer_than, mask[name].numel())}


def mask_to_payload(mask: Mapping[str, torch.Tensor], target_density: float) -> dict:
    """The on-disk form of a mask: plain tensors, ints and floats (``torch.load(weights_only=True)``)."""
    report = layer_report(mask)
    kept = sum(r["kept"] for r in report.values())
    total = sum(r["total"] for r in report.values())
    return {
        "format": MASK_FORMAT,
        "masks": {name: keep.detach().to("cpu", torch.bool) for name, keep in mask.items()},
        "kept": {name: r["kept"] for name, r in report.items()},
        "total": {name: r["total"] for name, r in report.items()},
        "target_density": float(target_density),
        "target_sparsity": 1.0 - float(target_density),
        "kept_weights": kept,
        "prunable_weights": total,
        "density": kept / total,
        "sparsity": 1.0 - kept / total,
    }


def mask_digest(mask: Mapping[str, torch.Tensor]) -> str:
    """A short digest of which weights a mask keeps (layer names, shapes and bits): what a
    branch's metrics and ticket record, so that a mask replaced later is noticed downstream."""
    from ..artifacts.digests import digest

    return digest({name: keep.detach().to("cpu", torch.bool) for name, keep in mask.items()})


def payload_to_mask(payload: Mapping) -> Mask:
    """Read back a mask saved by :func:`mask_to_payload`, checking its stored counts."""
    if payload.get("format") != MASK_FORMAT:
        raise ValueError(f"not a mask payload (format {payload.get('format')!r}, want {MASK_FORMAT!r})")
    mask = {name: keep.to(torch.bool) for name, keep in payload["masks"].items()}
    for name, keep in mask.items():
        if int(keep.sum()) != payload["kept"][name]:
            raise ValueError(f"mask payload is inconsistent: layer {name} keeps {int(keep.sum())}, "
                             f"its header says {payload['kept'][name]}")
    return mask

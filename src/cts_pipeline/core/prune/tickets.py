"""Tickets anyone can use: a mask (and the retrained weights) as safetensors, with a JSON manifest.

A ticket file ``ticket.safetensors`` holds one boolean tensor per prunable layer under
``mask/<parameter name>`` (True = kept) and, when given, the retrained network under
``weights/<state-dict key>``. The manifest (model, dataset, method, target and achieved sparsity,
kept count per layer, seed, rewind epoch, test accuracy, project version) sits beside it as
``ticket.json`` and is also stored in the safetensors header, so either file alone says what it is.
safetensors holds tensors only and never executes code, so a ticket from elsewhere is safe to open.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

MANIFEST_KEY = "cts_pipeline.ticket"
MASK_PREFIX, WEIGHTS_PREFIX = "mask/", "weights/"


def ticket_tensors(mask: Mapping[str, torch.Tensor],
                   weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The flat name -> tensor dict a ticket file stores."""
    tensors = {f"{MASK_PREFIX}{name}": keep.to("cpu", torch.bool).contiguous() for name, keep in mask.items()}
    for name, value in (weights or {}).items():
        tensors[f"{WEIGHTS_PREFIX}{name}"] = value.detach().to("cpu").contiguous()
    return tensors


def ticket_bytes(mask: Mapping[str, torch.Tensor], manifest: Mapping[str, Any],
                 weights: Mapping[str, torch.Tensor] | None = None) -> bytes:
    from safetensors.torch import save

    return save(ticket_tensors(mask, weights), metadata={MANIFEST_KEY: json.dumps(manifest, sort_keys=True)})


def read_ticket(payload: bytes) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """``(mask, weights, manifest)`` from a ticket file's bytes; weights may be empty."""
    from safetensors.torch import load

    tensors = load(payload)
    mask = {k.removeprefix(MASK_PREFIX): v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    weights = {k.removeprefix(WEIGHTS_PREFIX): v for k, v in tensors.items() if k.startswith(WEIGHTS_PREFIX)}
    # The safetensors format: an 8-byte little-endian header size, then the JSON header, whose
    # "__metadata__" holds the string metadata (safetensors' API reads it only from a file).
    size = int.from_bytes(payload[:8], "little")
    metadata = json.loads(payload[8:8 + size]).get("__metadata__") or {}
    manifest = json.loads(metadata.get(MANIFEST_KEY, "{}"))
    if not mask:
        raise ValueError("not a cts-pipeline ticket: the file holds no mask/ tensors")
    return mask, weights, manifest


def prune_with_mask(model: nn.Module, mask: Mapping[str, torch.Tensor]) -> nn.Module:
    """Prune ``model`` in place with ``torch.nn.utils.prune.custom_from_mask``: each masked weight
    becomes ``weight_orig * weight_mask``, so it stays zero through any further training
    (``core.nets.masks.apply_mask`` only zeroes the weights once)."""
    from torch.nn.utils import prune

    from ..nets.masks import check_mask_matches

    check_mask_matches(model, mask)
    for name, keep in mask.items():
        owner, _, attr = name.rpartition(".")
        weight = getattr(model.get_submodule(owner), attr)
        prune.custom_from_mask(model.get_submodule(owner), attr, keep.to(weight.device, weight.dtype))
    return model

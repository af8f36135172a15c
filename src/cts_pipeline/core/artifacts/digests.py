"""A short stable digest of configuration values and tensors: how a checkpoint, a mask and a
run's identity tell one content from another across processes and machines."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch


def digest(*parts: Any) -> str:
    """A short stable hex digest of JSON-able values and tensors (or dicts of tensors)."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        _feed(h, part)
    return h.hexdigest()


def _feed(h, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        h.update(f"tensor{tuple(t.shape)}{t.dtype}".encode())
        flat = t.reshape(-1)
        h.update((flat if t.dtype == torch.bool else flat.view(torch.uint8)).numpy().tobytes())
    elif isinstance(value, Mapping):
        h.update(b"{")
        for k in sorted(value, key=str):
            h.update(str(k).encode())
            _feed(h, value[k])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for v in value:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(json.dumps(value, sort_keys=True, default=str).encode())

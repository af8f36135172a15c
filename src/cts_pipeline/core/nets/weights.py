"""A model's start from a local state dict (``model.weights``) instead of a fresh initialisation.

The file is a safetensors file (``.safetensors``) or anything ``torch.load(weights_only=True)``
reads: a state dict, or a checkpoint holding one under ``state_dict`` or ``model``. Nothing is
downloaded and no pickled code runs. Its contents' digest is part of the run's identity
(:func:`weights_digest`), so a file replaced in place is a new configuration.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of the state dict at ``path``; a ``ValueError`` naming the file otherwise."""
    where = Path(path).expanduser()
    if not where.is_file():
        raise ValueError(f"model.weights {str(path)!r}: no such file")
    try:
        if where.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(where), device="cpu")
        else:
            state = torch.load(where, map_location="cpu", weights_only=True)
    except Exception as exc:  # a file of any other kind: say so in one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"model.weights {str(path)!r} is not a safetensors file or a state dict torch.load "
                         f"reads with weights_only=True: {reason}") from None
    for key in ("state_dict", "model"):  # a training checkpoint around the state dict
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.weights {str(path)!r} holds no state dict (a mapping of names to tensors)")
    return dict(state)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """``model`` with the state dict at ``path`` loaded (every key, every shape), or a one-line
    ``ValueError`` naming what does not fit: the missing and unexpected keys and the first shape
    that differs, each list cut to a few names."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {list(state[k].shape)} (the model's: {list(own[k].shape)})"
                for k in own if k in state and state[k].shape != own[k].shape]

    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    problems = [f"{what} {some(names)}" for what, names in
                (("missing keys", missing), ("unexpected keys", unexpected), ("another shape:", reshaped)) if names]
    if problems:
        raise ValueError(f"model.weights {str(path)!r} does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state)
    return model


def weights_digest(path: str | Path) -> str:
    """A digest of the file's contents (blake2b), remembered per path, size and modification time:
    the catalog key asks for it once per artifact."""
    where = Path(path).expanduser().resolve()
    stat = where.stat()
    return _contents_digest(str(where), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _contents_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()

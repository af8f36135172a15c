"""The one-call API for notebooks and other code, no Kedro involved.

    from cts_pipeline import find_ticket, load_ticket

    ticket = find_ticket(model, images, labels, sparsity=0.9926)   # CTS-KL on your model and data
    ticket.apply(model)                                             # prune it in place
    model, mask = load_ticket("data/07_model_output/.../ticket.safetensors/<version>/ticket.safetensors")
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.cts import SearchConfig, concrete_search
from .core.data import DatasetInfo, Split
from .core.masks import global_topk_mask, layer_report
from .core.tickets import load_ticket_file, prune_with_mask
from .core.training import TrainRecipe


@dataclass
class Ticket:
    """A CTS mask for a model: ``mask[name]`` is True where the weight is kept."""

    mask: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    sparsity: float
    kept_weights: int
    layers: dict[str, dict[str, Any]]  # per layer: kept, total, density
    history: list[dict] = field(default_factory=list)  # per search epoch: objective, kept/budget, λ

    def apply(self, model: nn.Module) -> nn.Module:
        """Prune ``model`` in place (``torch.nn.utils.prune.custom_from_mask``) and return it."""
        return prune_with_mask(model, self.mask)


def _as_tensors(data: Any, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if labels is not None:
        return torch.as_tensor(data), torch.as_tensor(labels)
    if isinstance(data, Iterable):  # a DataLoader or any iterable of (inputs, labels) batches
        xs, ys = zip(*((x, y) for x, y in data), strict=True)
        return torch.cat(xs), torch.cat(ys)
    raise TypeError("find_ticket needs inputs and labels tensors, or a DataLoader of (inputs, labels)")


def find_ticket(
    model: nn.Module,
    data: torch.Tensor | Iterable,
    labels: torch.Tensor | None = None,
    *,
    sparsity: float,
    objective: str = "kl",
    epochs: int = 10,
    batch_size: int = 128,
    lr: float | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Ticket:
    """Concrete Ticket Search on any ``nn.Module`` and data, at one sparsity.

    ``model`` holds the weights to search on (the rewind point ``θ_k``, or the initialisation)
    and is not changed. ``data`` is a tensor of inputs ``[N, C, H, W]`` already normalised as the
    model expects, with ``labels`` ``[N]``, or a DataLoader of such batches (read once into
    memory). The prunable weights are those of every ``Conv2d`` and ``Linear`` layer, as in the
    pipeline. The search runs ``epochs`` passes over the data with the method's constants
    (``docs/architecture.md``); the mask keeps exactly ``round((1 − sparsity)·d)`` weights.
    """
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be in (0, 1), e.g. 0.9926 for 99.26 %, got {sparsity!r}")
    images, targets = _as_tensors(data, labels)
    if images.dim() != 4:
        raise ValueError(f"inputs must be [N, C, H, W], got {list(images.shape)}")
    device = next(model.parameters()).device
    classes = int(targets.max()) + 1
    # Inputs are taken as they are: an identity normalisation (mean 0, std 1, scale 1).
    info = DatasetInfo("user data", tuple(images.shape[1:]), classes, (0.0,) * images.shape[1],
                       (1.0,) * images.shape[1], 1.0, "user")
    split = Split(images=images.to(device, torch.float32), labels=targets.to(device, torch.int64), info=info)
    config = SearchConfig(objective=objective, epochs=epochs, lr=lr)
    recipe = TrainRecipe(epochs=max(epochs, 1), batch_size=batch_size, lr=0.1, milestones=[], rewind_epoch=0)
    density = 1.0 - sparsity
    was_training = model.training
    result = concrete_search(model, split, density=density, config=config, recipe=recipe, seed=seed,
                             stage="find_ticket", progress=progress)
    model.train(was_training)
    mask = global_topk_mask(result.scores, density)
    kept = sum(int(m.sum()) for m in mask.values())
    total = sum(m.numel() for m in mask.values())
    return Ticket(mask=mask, scores=result.scores, sparsity=1 - kept / total, kept_weights=kept,
                  layers=layer_report(mask), history=result.history)


def load_ticket(path: str | Path, *, weights: bool = True) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A ticket file (``ticket.safetensors``, written by every pipeline branch) as a network.

    Builds the model its manifest names, loads the retrained weights (``weights=False``: a fresh
    seeded initialisation instead, to retrain the mask elsewhere) and prunes it with the mask
    through ``torch.nn.utils.prune.custom_from_mask``. Returns ``(model, mask)``.
    """
    from .core.models import build_model
    from .core.runtime import generator

    mask, state, manifest = load_ticket_file(path)
    if "model" not in manifest:
        raise ValueError(f"{path}: the ticket has no manifest naming its model")
    init = generator("cpu", manifest.get("seed", 0), "model-init")
    model = build_model(manifest["model"], image_shape=tuple(manifest["image_shape"]),
                        num_classes=manifest["num_classes"], generator=init, **manifest.get("model_options", {}))
    if weights:
        if not state:
            raise ValueError(f"{path}: the ticket holds no weights; load it with weights=False")
        model.load_state_dict(state)
    return prune_with_mask(model, mask), mask

"""Sanity checks for pruning methods (Frankle et al. 2021, "Pruning neural networks at
initialization: why are we missing the mark?").

Each check perturbs what a method found and retrains: a method that really learned *which*
weights matter should lose accuracy when

- its mask is shuffled within each layer (same per-layer densities, random positions),
- its ranking is inverted (keep the lowest-scored weights instead of the highest),
- its mask is kept but the weights are reinitialised instead of rewound to ``θ_k``.

:func:`passes` turns the accuracies of the perturbed and unperturbed runs into the verdict.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ..device.runtime import generator as stream_generator
from ..nets.masks import Mask, global_topk_mask


def layerwise_shuffle(mask: Mask, generator: torch.Generator) -> Mask:
    """The same number of kept weights in every layer, at positions redrawn uniformly at random.

    Each layer's mask is permuted by its own random permutation, so the count is kept by
    construction; layers are drawn in the mask's order, so one generator state gives one result.
    """
    shuffled = {}
    for name, keep in mask.items():
        order = torch.randperm(keep.numel(), generator=generator, device=generator.device)
        shuffled[name] = keep.reshape(-1)[order.to(keep.device)].view(keep.shape)
    return shuffled


def invert(scores: Mapping[str, torch.Tensor], density: float) -> Mask:
    """Keep the ``round(density · d)`` *lowest* scores over all layers (exact count)."""
    return global_topk_mask({n: -s.detach().float() for n, s in scores.items()}, density)


def reinitialised(make_model: Callable[[torch.Generator], nn.Module], seed: int) -> nn.Module:
    """A fresh random initialisation of the same architecture, from a stream that is not the
    original initialisation's (``"model-init"``), so the weights are new ones, not ``θ_0``.

    Models are built on the CPU (see ``models.build_model``), hence a CPU generator.
    """
    return make_model(stream_generator("cpu", seed, "sanity-reinit"))


def passes(check_accuracies: Sequence[float], reference_accuracies: Sequence[float]) -> dict:
    """Whether the perturbation hurt: the mean accuracy dropped by more than the seeds' spread.

    ``spread`` is the sample standard deviation (ddof=1) of the unperturbed (reference) accuracies
    over seeds; with a single reference seed there is no spread to measure and any drop passes.
    Returns ``accuracy_change`` (perturbed minus reference, in the accuracies' unit), ``spread``
    and ``passes``.
    """
    if not check_accuracies or not reference_accuracies:
        raise ValueError("passes() needs at least one accuracy for the check and the reference")
    check = statistics.fmean(check_accuracies)
    reference = statistics.fmean(reference_accuracies)
    spread = statistics.stdev(reference_accuracies) if len(reference_accuracies) > 1 else 0.0
    return {
        "accuracy_change": check - reference,
        "spread": spread,
        "passes": bool(reference - check > spread),
    }

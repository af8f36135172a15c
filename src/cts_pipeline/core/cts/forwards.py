"""The masked network's forward in a search: batch statistics, and K rows of masks in one pass.

K rows run stacked in the channel dimension (:mod:`..stacked`, the fast path) where that layout
was checked against ``vmap(functional_call)`` on this model, else through vmap.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

from ..masks import unflatten
from ..runtime import full_fp32
from ..stacked import stacked_forward
from ..stacked import supports as stacked_supports
from .relaxation import ConcreteMask

logger = logging.getLogger(__name__)


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Normalise every BatchNorm layer with the current batch's statistics.

    Running statistics are detached for the duration, so they are neither used nor updated; the
    model is in eval mode otherwise (the search trains no weight and no BatchNorm parameter).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.running_mean, m.running_var) for m in norms]
    was_training = model.training
    model.eval()
    for m in norms:
        m.running_mean = None
        m.running_var = None
    try:
        yield
    finally:
        for m, (mean, var) in zip(norms, saved, strict=True):
            m.running_mean = mean
            m.running_var = var
        model.train(was_training)


def masked_forward(model: nn.Module, relaxation: ConcreteMask, soft: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The masked network's output: ``[B, C]``, or ``[K, B, C]`` for K rows of masks.

    K rows run as one pass, each row normalised with its own batch statistics: stacked in the
    channel dimension (:mod:`..stacked`, the fast path) when the search has checked that layout on
    this model, else vectorised by ``torch.func.vmap`` over ``functional_call``.
    """
    if not relaxation.batched:
        return functional_call(model, relaxation.masked_weights(soft), (x,))
    masked = relaxation.theta * soft
    if relaxation.stacked:
        return stacked_forward(model, relaxation.row_weights(masked), x)
    shapes = relaxation.shapes

    def one(row: torch.Tensor) -> torch.Tensor:
        return functional_call(model, unflatten(row, shapes), (x,))

    with warnings.catch_warnings():  # functorch's note on its slow fallback for pooling: not the user's to act on
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        return torch.vmap(one)(masked)


def check_stacked(model: nn.Module, relaxation: ConcreteMask, x: torch.Tensor, stage: str) -> bool:
    """Use the stacked forward only where it gives what vmap gives on this model (checked once).

    Both forwards run in full fp32 (TF32 off): under TF32 the two orders of summation differ by up
    to 4e-3 on VGG-16 with nothing wrong, and every batched search on a GPU would quietly take vmap.
    """
    if not stacked_supports(model):
        return False
    with torch.no_grad(), full_fp32():
        soft = torch.sigmoid(relaxation.logits.detach())
        relaxation.stacked = False
        reference = masked_forward(model, relaxation, soft, x)
        relaxation.stacked = True
        fast = masked_forward(model, relaxation, soft, x)
    close = torch.allclose(fast, reference, rtol=1e-4, atol=1e-5)
    if not close:
        logger.warning("%s: the stacked batched forward differs from vmap on this model (max %.3g); using vmap",
                       stage, (fast - reference).abs().max().item())
    return close

"""The masked network's forward in a search: batch statistics, and K rows of masks in one pass.

K rows run stacked in the channel dimension (:mod:`..train.stacked`, the fast path) where that layout
was checked against ``vmap(functional_call)`` on this model, else through vmap.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

from ..nets.masks import unflatten
from ..train.stacked import stacked_forward
from ..train.stacked import supports as stacked_supports
from .relaxation import ConcreteMask

logger = logging.getLogger(__name__)


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Normalise every BatchNorm layer with the current batch's statistics.

    Running statistics are detached for the duration, so they are neither used nor updated; the
    model is in eval mode otherwise (the search trains no weight and no BatchNorm parameter).

    ``nn.MultiheadAttention``'s inference fast path is off for the duration: in eval mode it runs
    whenever it sees no tensor that requires a gradient, and under ``torch.func.vmap`` it sees none,
    yet it has no derivative.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.running_mean, m.running_var) for m in norms]
    was_training = model.training
    fast_attention = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
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
        torch.backends.mha.set_fastpath_enabled(fast_attention)


def masked_forward(model: nn.Module, relaxation: ConcreteMask, soft: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The masked network's output: ``[B, C]``, or ``[K, B, C]`` for K rows of masks.

    K rows run as one pass, each row normalised with its own batch statistics: stacked in the
    channel dimension (:mod:`..train.stacked`, the fast path) when the search has checked that layout on
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


# The check's samples: enough for BatchNorm's statistics, few enough that a float64 forward of K
# rows costs no memory worth planning for (a ResNet-50 at batch 1024 would).
CHECK_SAMPLES = 32


def check_stacked(model: nn.Module, relaxation: ConcreteMask, x: torch.Tensor, stage: str) -> bool:
    """Use the stacked forward only where it gives what vmap gives on this model (checked once).

    Both forwards run in float64 on the batch's first :data:`CHECK_SAMPLES` samples, where two
    summation orders agree to about 1e-12 and a wrong layout is still off by the outputs' own size.
    In float32 they differ by rounding alone beyond any fixed tolerance: up to 4e-3 on VGG-16 under
    TF32, 2e-5 on ResNet-50 with batch statistics over two images. The model goes back to its own
    dtype afterwards, whatever happens.
    """
    if not stacked_supports(model):
        return False
    dtype = next(model.parameters()).dtype
    double = copy.copy(relaxation)  # the same layer views and flags, float64 tensors
    double.theta = relaxation.theta.detach().double()
    double.logits = relaxation.logits.detach().double()
    sample = x[:CHECK_SAMPLES].double()
    model.to(torch.float64)
    try:
        with torch.no_grad():
            soft = torch.sigmoid(double.logits)
            double.stacked = False
            reference = masked_forward(model, double, soft, sample)
            double.stacked = True
            fast = masked_forward(model, double, soft, sample)
    finally:
        model.to(dtype)
    scale = max(1.0, float(reference.abs().max()))
    close = torch.allclose(fast, reference, rtol=1e-9, atol=1e-10 * scale)
    if not close:
        logger.warning("%s: the stacked batched forward differs from vmap on this model (max %.3g in float64); "
                       "using vmap", stage, (fast - reference).abs().max().item())
    return close

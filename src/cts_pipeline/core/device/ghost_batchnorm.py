"""N virtual ranks' BatchNorm in one forward ("ghost" BatchNorm), so N ranks cost one pass.

Under ``training.virtual_ranks: N`` (:mod:`.virtual_ranks`) a process plays ``P`` ranks, and rank
``c`` of them takes every P-th sample of the process's batch from the ``c``-th. Played one chunk
after another, that is P forwards and P backwards of a 1/P batch, which a GPU pays for in kernel
launches, not arithmetic. BatchNorm is the only layer of these networks that mixes samples, so
one forward over the whole batch computes every rank's output, provided each BatchNorm normalises
each rank's samples with that rank's own statistics:

- an NCHW batch ``[B, C, H, W]`` viewed as ``[B/P, P·C, H, W]`` puts sample ``j·P + c``'s channel
  ``k`` at channel ``c·C + k``: rank ``c``'s samples are channels ``c·C … c·C + C − 1``, so one native
  ``batch_norm`` over ``P·C`` channels gives each rank its own mean and variance (γ and β repeated P
  times, so their gradients sum over the ranks, as the sequential chunks' backward passes do);
- the running statistics then have ``P·C`` entries: the first C are the module's own buffers (a
  view), updated in place by rank 0's samples only, as DDP keeps rank 0's; the others are scratch.

A channels_last batch cannot be viewed this way (a rank's samples and a sample's channels are not
one stride apart): it is copied to NCHW, and the next convolution copies it back. Computing the
statistics on the view ``[B/P, P, C, H, W]`` instead (``var_mean``, then ``addcmul``), which every
layout has, dispatched 2.8x the operations of one rank's step and ran 1.4x slower than the copies on
a CPU (ResNet-20, batch 256). The loss and its weights need nothing special: with equal chunks the
mean over the batch is the mean of the ranks' means (:meth:`..train.loop._TrainingRun._one_pass`).

The equality with the sequential chunks is to float rounding (the reductions run in another
order): ``tests/core/test_one_pass_ranks.py`` checks it in float64 (exact arithmetic) and float32.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# The instance attributes an installed ghost BatchNorm carries (removed with it).
_RANKS, _STATS, _OWN, _EVAL = "_ghost_ranks", "_ghost_stats", "_ghost_own_buffers", "_ghost_in_evaluation"


def batchnorms_of(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


@contextmanager
def ghost_batchnorm(model: nn.Module, ranks: int, in_evaluation: bool = False) -> Iterator[None]:
    """Within the block, every BatchNorm of ``model`` in training mode normalises each of ``ranks``
    interleaved chunks of its batch (every ``ranks``-th sample) with that chunk's statistics, in one
    call; in evaluation mode it is unchanged (a test evaluation inside the training normalises its
    whole batch, as the sequential ranks' does), unless ``in_evaluation``: then a BatchNorm without
    running statistics normalises each chunk apart in evaluation too (the search's teacher, whose
    model is in evaluation mode with batch statistics). The running statistics are restored to
    plain buffers on the way out, holding what rank 0's samples made of them."""
    norms = batchnorms_of(model)
    if any(isinstance(m, nn.SyncBatchNorm) for m in norms):
        raise ValueError("ghost BatchNorm normalises each virtual rank's chunk; SyncBatchNorm normalises the "
                         "global batch: they cannot be combined")
    installed = []
    try:
        for norm in norms:
            _install(norm, ranks, in_evaluation)
            installed.append(norm)
        yield
    finally:
        for norm in reversed(installed):
            _remove(norm)


def _install(norm: _BatchNorm, ranks: int, in_evaluation: bool) -> None:
    own, every = {}, []
    for name in ("running_mean", "running_var"):
        buffer = getattr(norm, name)
        if buffer is None:  # built without running statistics
            every.append(None)
            continue
        stats = buffer.detach().repeat(ranks)  # rank c's copy at [c·C, (c+1)·C); only rank 0's is kept
        own[name] = buffer
        every.append(stats)
        setattr(norm, name, stats[: buffer.numel()])  # the module's buffer for the block: rank 0's view
    setattr(norm, _RANKS, ranks)
    setattr(norm, _EVAL, in_evaluation)
    setattr(norm, _STATS, tuple(every))
    setattr(norm, _OWN, own)
    # An instance attribute, not a hook: a hook could only replace the output after the plain forward
    # had run. A bound method (not a closure) so that a deep copy of the model binds its own copy.
    norm.forward = types.MethodType(_ghost_forward, norm)


def _remove(norm: _BatchNorm) -> None:
    del norm.forward
    for name, buffer in getattr(norm, _OWN).items():
        with torch.no_grad():
            buffer.copy_(getattr(norm, name))  # what rank 0 made of them (or what a resume loaded)
        setattr(norm, name, buffer)
    for attribute in (_RANKS, _STATS, _OWN, _EVAL):
        delattr(norm, attribute)


def _ghost_forward(self: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    # Each rank's batch statistics in training, and, where asked, in evaluation without running
    # statistics (the search's mode, ..cts.forwards.batch_statistics); else the plain forward.
    batch_statistics = self.running_mean is None and self.running_var is None
    if not (self.training or (getattr(self, _EVAL) and batch_statistics)):
        return type(self).forward(self, x)
    self._check_input_dim(x)
    # As _BatchNorm.forward: the count, and the momentum (a cumulative average when it is None).
    factor = 0.0 if self.momentum is None else self.momentum
    tracked = self.training and self.track_running_stats and self.num_batches_tracked is not None
    if tracked:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
    mean, var = getattr(self, _STATS) if self.training and self.track_running_stats else (None, None)
    return batch_norm_by_rank(x, getattr(self, _RANKS), mean, var, self.weight, self.bias, factor, self.eps)


def batch_norm_by_rank(x: torch.Tensor, ranks: int, running_mean: torch.Tensor | None,
                       running_var: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       momentum: float, eps: float) -> torch.Tensor:
    """``x`` normalised in batch-statistics mode, each of ``ranks`` interleaved chunks (every
    ``ranks``-th sample) with its own statistics, in one call: ``x`` viewed as ``[B/P, P·C, ...]``
    (a copy of a channels_last batch), ``weight`` and ``bias`` (``[C]``) repeated P times, the
    running statistics (``[P·C]``, or None) updated at ``momentum``. Also the stacked layout's
    (:func:`..train.stacked._norm`), whose C counts K tickets' channels."""
    batch, channels = x.shape[0], x.shape[1]
    if batch % ranks:
        raise ValueError(f"ghost BatchNorm: a batch of {batch} samples cannot be dealt equally to {ranks} "
                         "virtual ranks")
    grouped = x.reshape(batch // ranks, ranks * channels, *x.shape[2:])
    out = F.batch_norm(grouped, running_mean, running_var, None if weight is None else weight.repeat(ranks),
                       None if bias is None else bias.repeat(ranks), True, momentum, eps)
    return out.view(x.shape)


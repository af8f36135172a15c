"""The training recipe (``training`` parameters): what decides a dense run and every retraining.

Epochs are counted from 0. The rewind point ``k`` is a number of finished epochs: ``θ_k`` is the
network after ``k`` epochs (``k = 0`` is the initialisation). A sparse run restarts at epoch ``k``
with a fresh optimizer and the learning-rate milestones at their absolute positions, so a ticket
retrained from ``θ_k`` sees exactly the schedule the dense run saw from epoch ``k`` on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from ..data.transforms import CROP_PADDINGS

# auto: bf16 autocast on GPUs with native bf16 (Ampere and later; no gradient scaler, so no host
# sync), fp32 elsewhere. fp16 needs a scaler (the authors' code); the search always runs in fp32.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# Where a ticket's weights come from: the rewind point θ_k, or the initialisation θ_0 (the search's
# cts.search_at and the saliency methods' pai.at choose among them).
STARTS = ("rewind", "init")


@dataclass(frozen=True)
class TrainRecipe:
    """The SGD recipe of a dense run, reused unchanged for sparse retraining (``training`` parameters)."""

    epochs: int
    batch_size: int
    lr: float
    rewind_epoch: int = 0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: Sequence[int] = ()
    gamma: float = 0.1
    nesterov: bool = False
    loss_reduction: str = "mean"
    grad_clip_norm: float | None = None
    augment: bool = False
    crop_padding: str = "zeros"  # the random crop's border: zeros (torchvision's default) | reflect (the authors')
    precision: str = "auto"
    eval_batch_size: int = 1000
    eval_every: int = 1
    warmup_epochs: int = 0  # linear warm-up per step over the first epochs (the authors' ImageNet recipe: 5)
    # N-device data parallelism reproduced on fewer devices (core/device/virtual_ranks.py): each batch in N
    # chunks with their own BatchNorm statistics, gradients averaged as DDP averages ranks.
    virtual_ranks: int = 1

    def __post_init__(self) -> None:
        # Types first, strictly (a YAML "false" is a truthy string, 1 is no flag, inf no rate), then ranges.
        for name in ("lr", "momentum", "weight_decay", "gamma"):
            _require(_is_number(getattr(self, name)), f"training.{name}", getattr(self, name), "a finite number")
        _require(self.grad_clip_norm is None or _is_number(self.grad_clip_norm), "training.grad_clip_norm",
                 self.grad_clip_norm, "null or a finite number")
        for name in ("nesterov", "augment"):
            _require(isinstance(getattr(self, name), bool), f"training.{name}", getattr(self, name), "true or false")
        for name in ("loss_reduction", "crop_padding", "precision"):
            _require(isinstance(getattr(self, name), str), f"training.{name}", getattr(self, name), "a string")
        _require(isinstance(self.milestones, (list, tuple)) and all(_is_count(m) for m in self.milestones),
                 "training.milestones", self.milestones, "a list of epoch numbers")
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        _require(_is_count(self.epochs) and self.epochs >= 1, "training.epochs", self.epochs, "a positive integer")
        _require(_is_count(self.batch_size) and self.batch_size >= 1, "training.batch_size", self.batch_size, "a positive integer")
        _require(self.lr > 0, "training.lr", self.lr, "a finite positive number")
        _require(
            _is_count(self.rewind_epoch) and 0 <= self.rewind_epoch < self.epochs,
            "training.rewind_epoch", self.rewind_epoch,
            f"an epoch count in [0, training.epochs = {self.epochs}) (0 means the initialisation)",
        )
        _require(0 <= self.momentum < 1, "training.momentum", self.momentum, "in [0, 1)")
        _require(self.weight_decay >= 0, "training.weight_decay", self.weight_decay, "non-negative")
        _require(
            all(0 < m <= self.epochs for m in self.milestones) and list(self.milestones) == sorted(self.milestones),
            "training.milestones", list(self.milestones), f"increasing epochs in (0, {self.epochs}]",
        )
        _require(0 < self.gamma <= 1, "training.gamma", self.gamma, "in (0, 1]")
        _require(self.loss_reduction in ("mean", "sum"), "training.loss_reduction", self.loss_reduction, "'mean' or 'sum'")
        _require(self.grad_clip_norm is None or self.grad_clip_norm > 0, "training.grad_clip_norm", self.grad_clip_norm, "null or positive")
        _require(self.crop_padding in CROP_PADDINGS, "training.crop_padding", self.crop_padding,
                 f"one of {CROP_PADDINGS}")
        _require(self.precision in PRECISIONS, "training.precision", self.precision, f"one of {PRECISIONS}")
        _require(_is_count(self.eval_every) and self.eval_every >= 1, "training.eval_every", self.eval_every, "a positive integer")
        _require(_is_count(self.eval_batch_size) and self.eval_batch_size >= 1, "training.eval_batch_size",
                 self.eval_batch_size, "a positive integer")
        _require(_is_count(self.virtual_ranks) and self.virtual_ranks >= 1, "training.virtual_ranks",
                 self.virtual_ranks, "a positive integer")
        _require(self.batch_size % self.virtual_ranks == 0, "training.virtual_ranks", self.virtual_ranks,
                 f"a divisor of training.batch_size = {self.batch_size} (each virtual rank takes an equal share)")
        _require(_is_count(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs, "training.warmup_epochs",
                 self.warmup_epochs, f"an epoch count in [0, training.epochs = {self.epochs}]")

    def lr_at(self, epoch: int) -> float:
        """Learning rate of epoch ``epoch`` (0-based): dropped by ``gamma`` at each milestone reached."""
        return self.lr * self.gamma ** sum(1 for m in self.milestones if epoch >= m)

    def warmup_lr(self, epoch: int, step: int, steps_per_epoch: int) -> float | None:
        """The learning rate of ``step`` (0-based) of a warm-up epoch, None after the warm-up: it
        rises linearly per step, the i-th of the warm-up's n steps at ``lr_at(epoch) · i / n``, as in
        the authors' trainer (``apply_warmup``)."""
        if epoch >= self.warmup_epochs:
            return None
        done = epoch * steps_per_epoch + step + 1
        return self.lr_at(epoch) * done / (self.warmup_epochs * steps_per_epoch)

    def as_dict(self) -> dict:
        return {**asdict(self), "milestones": list(self.milestones)}


def _is_number(value) -> bool:
    """An int or a finite float (not a bool, a string, inf or NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")

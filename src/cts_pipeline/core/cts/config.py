"""How a search runs (the ``cts`` parameters), and the length and rate schedule the method fixes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..train.recipe import STARTS
from .balance import BALANCERS
from .objectives import FEATURE_CAPTURES, OBJECTIVES, Objective

LR_DROP_AT = 0.88  # Adam's rate is multiplied by 0.1 once, at 88 % of the search steps
LR_DROP_FACTOR = 0.1
SHORT_SEARCH_FRACTION = 1 / 8  # `short` search: one eighth of the training epochs (160 -> 20)
SEARCH_LENGTHS = ("long", "short")
# How the schedule's fractions become whole steps and epochs:
# - "project": the drop at step round(0.88·total steps), `short` = ⌈E/8⌉ epochs. The method's
#   description, and this project's default (its digits and MNIST tables were made with it).
# - "authors": the integer rules of the authors' code (TLAB 68c9740): `short` = int(E/8) epochs
#   (concrete_training.py:76), and the drop listed at epoch int(0.88·E) but applied by an
#   `(epoch + 1) in reduce_epochs` check after `epoch += 1` (search/concrete.py:315, :323), i.e.
#   at the start of epoch int(0.88·E) − 1 (0-based): after 139 of 160 epochs, 16 of 20; never
#   when int(0.88·E) < 2. The paper presets use it, so their numbers compare with the paper's.
SCHEDULES = ("project", "authors")


@dataclass(frozen=True)
class SearchConfig:
    """How a CTS search runs (``cts`` parameters). Constants of the method are module constants."""

    objective: str = "kl"
    search_length: str = "long"
    epochs: int | None = None
    balance: str = "gradbalance"
    lr: float | None = None
    search_at: str = "rewind"
    loss_scale: float | None = None  # null: the authors' factor for the objective (Objective.loss_scale)
    min_kept_per_layer: int = 0  # ablation: the mask keeps at least this many weights in every layer
    schedule: str = "project"  # SCHEDULES: how 0.88 and 1/8 are rounded to steps and epochs
    feature_capture: str = "layer_outputs"  # FEATURE_CAPTURES: what feature_mse compares

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"cts.objective must be one of {sorted(OBJECTIVES)}, got {self.objective!r}")
        if self.search_length not in SEARCH_LENGTHS:
            raise ValueError(f"cts.search_length must be one of {SEARCH_LENGTHS}, got {self.search_length!r}")
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1):
            raise ValueError(f"cts.epochs must be null or a positive integer, got {self.epochs!r}")
        if self.balance not in BALANCERS:
            raise ValueError(f"cts.balance must be one of {BALANCERS}, got {self.balance!r}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not math.isfinite(self.lr) or not self.lr > 0):
            raise ValueError(f"cts.lr must be null (the training rate) or a finite positive number, got {self.lr!r}")
        if self.search_at not in STARTS:
            raise ValueError(f"cts.search_at must be one of {STARTS}, got {self.search_at!r}")
        if self.loss_scale is not None and (isinstance(self.loss_scale, bool)
                                            or not isinstance(self.loss_scale, (int, float))
                                            or not math.isfinite(self.loss_scale) or not self.loss_scale > 0):
            raise ValueError("cts.loss_scale must be null (the authors' factor for the objective) or a "
                             f"positive number, got {self.loss_scale!r}")

        if self.feature_capture not in FEATURE_CAPTURES:
            raise ValueError(f"cts.feature_capture must be one of {tuple(FEATURE_CAPTURES)}, "
                             f"got {self.feature_capture!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"cts.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if isinstance(self.min_kept_per_layer, bool) or not isinstance(self.min_kept_per_layer, int) \
                or self.min_kept_per_layer < 0:
            raise ValueError("cts.min_kept_per_layer must be a non-negative integer (0: the method's plain "
                             f"global top-k), got {self.min_kept_per_layer!r}")

    @property
    def resolved_objective(self) -> Objective:
        """The objective the search runs: ``objective``, with ``feature_capture`` for feature_mse."""
        if self.objective == "feature_mse":
            return FEATURE_CAPTURES[self.feature_capture]
        return OBJECTIVES[self.objective]

    @property
    def effective_loss_scale(self) -> float:
        """The factor the objective is multiplied by before its gradient is taken."""
        return float(self.loss_scale) if self.loss_scale is not None else self.resolved_objective.loss_scale

    def search_epochs(self, training_epochs: int) -> int:
        """``long`` = the training length, ``short`` = one eighth of it (rounded up, or down with
        the authors' schedule; at least 1); ``epochs`` overrides."""
        if self.epochs is not None:
            return self.epochs
        if self.search_length == "short":
            eighth = training_epochs * SHORT_SEARCH_FRACTION
            return max(1, int(eighth) if self.schedule == "authors" else math.ceil(eighth))
        return training_epochs

    def lr_drop_step(self, epochs: int, steps_per_epoch: int) -> int | None:
        """The step (0-based, counted over the whole search) from which Adam's rate is multiplied by
        0.1: 88 % of the steps, or the authors' epoch boundary (see ``SCHEDULES``); None: never."""
        if self.schedule == "authors":
            listed = int(LR_DROP_AT * epochs)
            return (listed - 1) * steps_per_epoch if listed >= 2 else None
        return round(LR_DROP_AT * epochs * steps_per_epoch)

    def as_dict(self) -> dict:
        return asdict(self)

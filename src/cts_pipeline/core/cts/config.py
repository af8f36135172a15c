"""How a search runs (the ``cts`` parameters), and the length and rate schedule the method fixes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..training import STARTS
from .balance import BALANCERS
from .objectives import OBJECTIVES

LR_DROP_AT = 0.88  # Adam's rate is multiplied by 0.1 once, at 88 % of the search steps
LR_DROP_FACTOR = 0.1
SHORT_SEARCH_FRACTION = 1 / 8  # `short` search: one eighth of the training epochs (160 -> 20)
SEARCH_LENGTHS = ("long", "short")


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
                                    or not self.lr > 0):
            raise ValueError(f"cts.lr must be null (the training rate) or positive, got {self.lr!r}")
        if self.search_at not in STARTS:
            raise ValueError(f"cts.search_at must be one of {STARTS}, got {self.search_at!r}")
        if self.loss_scale is not None and (isinstance(self.loss_scale, bool)
                                            or not isinstance(self.loss_scale, (int, float))
                                            or not math.isfinite(self.loss_scale) or not self.loss_scale > 0):
            raise ValueError("cts.loss_scale must be null (the authors' factor for the objective) or a "
                             f"positive number, got {self.loss_scale!r}")

        if isinstance(self.min_kept_per_layer, bool) or not isinstance(self.min_kept_per_layer, int) \
                or self.min_kept_per_layer < 0:
            raise ValueError("cts.min_kept_per_layer must be a non-negative integer (0: the method's plain "
                             f"global top-k), got {self.min_kept_per_layer!r}")

    @property
    def effective_loss_scale(self) -> float:
        """The factor the objective is multiplied by before its gradient is taken."""
        return float(self.loss_scale) if self.loss_scale is not None else OBJECTIVES[self.objective].loss_scale

    def search_epochs(self, training_epochs: int) -> int:
        """``long`` = the training length, ``short`` = one eighth of it (rounded up); ``epochs`` overrides."""
        if self.epochs is not None:
            return self.epochs
        if self.search_length == "short":
            return max(1, math.ceil(training_epochs * SHORT_SEARCH_FRACTION))
        return training_epochs

    def as_dict(self) -> dict:
        return asdict(self)

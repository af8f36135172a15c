"""The sweep: which (method, seed, sparsity) branches a run has, and what each is called.

Kedro builds pipelines before it loads parameters, yet the grid shapes the DAG (one namespaced
branch per sparsity and seed). So the grid lives in the ``grid`` parameters, the pipeline registry
reads it through :mod:`cts_pipeline.active_config`, and each branch's own coordinates reach its nodes
as the parameter ``params:<namespace>.branch`` (added by :class:`cts_pipeline.context.ProjectContext`). Names are stable: ``cts_kl.seed0.sp99_26`` is CTS-KL,
seed 0, 99.26 % sparsity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

BRANCH_PARAM = "branch"
DENSE = "dense"


def sparsity_label(sparsity: float) -> str:
    """``0.9926`` -> ``sp99_26``: percent with two decimals, a valid namespace part."""
    return "sp" + f"{100 * sparsity:.2f}".replace(".", "_")


@dataclass(frozen=True)
class Branch:
    """One result of the sweep. ``sparsity`` is ``None`` for the dense reference."""

    method: str
    seed: int
    sparsity: float | None = None
    start: str = "rewind"  # the weights a mask is found on and retrained from: θ_k, or θ_0 ("init")

    @property
    def namespace(self) -> str:
        parts = [self.method, f"seed{self.seed}"]
        if self.sparsity is not None:
            parts.append(sparsity_label(self.sparsity))
        return ".".join(parts)

    @property
    def density(self) -> float:
        return 1.0 if self.sparsity is None else 1.0 - self.sparsity

    def as_dict(self) -> dict:
        return {"method": self.method, "seed": self.seed, "sparsity": self.sparsity,
                "density": self.density, "start": self.start, "namespace": self.namespace}


@dataclass(frozen=True)
class GridConfig:
    """``grid`` parameters: target sparsities (fractions in (0, 1)) and seeds."""

    sparsities: Sequence[float]
    seeds: Sequence[int] = (0,)

    def __post_init__(self) -> None:
        if isinstance(self.sparsities, (str, bytes)) or not isinstance(self.sparsities, Sequence) or not self.sparsities:
            raise ValueError(f"grid.sparsities must be a non-empty list of fractions in (0, 1), got {self.sparsities!r}")
        for s in self.sparsities:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise ValueError(f"grid.sparsities: {s!r} is not a number")
            if not 0.0 < s < 1.0:
                hint = f" (sparsity is a fraction: {s:g} % is {s / 100:g})" if 1.0 < s < 100.0 else ""
                raise ValueError(f"grid.sparsities: {s!r} is outside (0, 1){hint}")
        labels = [sparsity_label(s) for s in self.sparsities]
        clashes = sorted({lab for lab in labels if labels.count(lab) > 1})
        if clashes:
            raise ValueError(f"grid.sparsities: several values round to the same branch {clashes}; "
                             "sparsities must differ at 0.01 % resolution")
        if isinstance(self.seeds, (str, bytes)) or not isinstance(self.seeds, Sequence) or not self.seeds:
            raise ValueError(f"grid.seeds must be a non-empty list of non-negative integers, got {self.seeds!r}")
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise ValueError(f"grid.seeds: {seed!r} is not a non-negative integer")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"grid.seeds has duplicates: {list(self.seeds)}")
        object.__setattr__(self, "sparsities", tuple(float(s) for s in self.sparsities))
        object.__setattr__(self, "seeds", tuple(self.seeds))

    @classmethod
    def from_params(cls, params: Mapping) -> GridConfig:
        raw = params.get("grid")
        if isinstance(raw, GridConfig):
            return raw
        if not isinstance(raw, Mapping):
            raise ValueError("parameters must define grid: {sparsities: [...], seeds: [...]}")
        unknown = set(raw) - {"sparsities", "seeds"}
        if unknown:
            raise ValueError(f"grid has unknown keys {sorted(unknown)}; it takes sparsities and seeds")
        return cls(**raw)


def cts_method_name(cts: Mapping) -> str:
    """``cts_<objective>``, plus every non-default choice, so variants never share a branch."""
    name = f"cts_{cts.get('objective', 'kl')}"
    if cts.get("search_length", "long") != "long" or cts.get("epochs") is not None:
        name += f"_{cts['epochs']}ep" if cts.get("epochs") is not None else f"_{cts['search_length']}"
    if cts.get("balance", "gradbalance") != "gradbalance":
        name += f"_{cts['balance']}"
    if cts.get("search_at", "rewind") != "rewind":
        name += f"_at_{cts['search_at']}"
    return name


def dense_branches(grid: GridConfig) -> list[Branch]:
    return [Branch(DENSE, seed) for seed in grid.seeds]


def method_branches(method: str, grid: GridConfig, start: str = "rewind") -> list[Branch]:
    return [Branch(method, seed, sparsity, start) for seed in grid.seeds for sparsity in grid.sparsities]


def branches_for(params: Mapping) -> list[Branch]:
    """Every branch the registered pipelines contain, from the raw or validated parameters."""
    grid = GridConfig.from_params(params)
    cts = params.get("cts") or {}
    cts = cts.as_dict() if hasattr(cts, "as_dict") else cts
    return dense_branches(grid) + method_branches(cts_method_name(cts), grid, cts.get("search_at", "rewind"))

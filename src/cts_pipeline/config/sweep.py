"""The sweep: which branches a run has, what each is called, and what each one runs.

Kedro builds pipelines before it loads parameters, yet the sweep shapes the DAG (one namespaced
branch per method, seed and sparsity). So the sweep lives in the parameters (``grid``, ``cts``,
``methods``, ``pai``, ``sanity``), :func:`plan` turns them into branches, the pipeline registry
builds one branch pipeline per :class:`Branch`, and each branch's own settings reach its nodes as
the parameter ``params:<namespace>.branch`` (added by :class:`cts_pipeline.framework.context.ProjectContext`).

Names are stable: ``cts_kl.seed0.sp99_26`` is CTS-KL, seed 0, 99.26 % sparsity; ``snip``, ``ltr``,
``cts_kl_short`` (an ablation), ``cts_kl_shuffled`` (a sanity check of ``cts_kl``) likewise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator

from ..core.prune.ltr import level_density, level_for_sparsity
from ..core.prune.saliency import SCORERS
from ..core.train.recipe import STARTS
from .identity import cts_method_name
from .typed import Flag, Section, plain, read_section

BRANCH_PARAM = "branch"
MAX_LEVEL = 60  # 0.8**60 keeps 1.5e-6 of the weights: beyond any network's last weight
DENSE = "dense"
LTR = "ltr"
PAI_METHODS = tuple(SCORERS)  # a scorer added to core.prune.saliency is a method of the sweep
CHECKS = {"shuffle": "shuffled", "invert": "inverted", "reinit": "reinit"}  # check -> name suffix


def sparsity_label(sparsity: float) -> str:
    """``0.9926`` -> ``sp99_26``, ``0.05`` -> ``sp05_00``: percent with two decimals, zero-padded so
    that names sort in sparsity order (kedro-viz lists namespaces by name); a valid namespace part.
    From 99.9 % on, four decimals (``1 − 0.8^42`` -> ``sp99_9915``), where the authors' grid puts
    levels 0.003 % apart; such names still sort after every two-decimal one."""
    decimals = 4 if sparsity >= 0.999 else 2
    return "sp" + f"{100 * sparsity:0{3 + decimals}.{decimals}f}".replace(".", "_")


@dataclass(frozen=True)
class Branch:
    """One unit of the sweep; ``sparsity`` is ``None`` for per-seed work (dense training, LTR levels).

    ``family`` says which pipeline builds it (dense, cts, ltr, pai, sanity) and ``settings`` holds
    what that family needs: the full CTS configuration of a CTS variant, the scoring method of a
    PaI branch, the check and the checked method of a sanity branch.
    """

    method: str
    seed: int
    sparsity: float | None = None
    start: str = "rewind"  # the weights a mask is found on and retrained from: θ_k, or θ_0 ("init")
    family: str = DENSE
    settings: Mapping[str, Any] = field(default_factory=dict, hash=False)
    level: int | None = None  # from grid.levels: the density is exactly 0.8**level

    @property
    def namespace(self) -> str:
        return branch_namespace(self.method, self.seed, self.sparsity)

    @property
    def density(self) -> float:
        if self.level is not None:
            return level_density(self.level)  # not 1 - (1 - 0.8**L): the same count as LTR's level L
        return 1.0 if self.sparsity is None else 1.0 - self.sparsity

    def as_dict(self) -> dict:
        return {"method": self.method, "seed": self.seed, "sparsity": self.sparsity,
                "density": self.density, "level": self.level, "start": self.start, "family": self.family,
                "settings": dict(self.settings), "namespace": self.namespace}


def search_group_namespace(branch: Branch) -> str:
    """``cts_kl.seed0``: the batched search shared by a seed's sparsities of one CTS configuration."""
    return branch_namespace(branch.method, branch.seed)


def seeds_group_namespace(branch: Branch) -> str:
    """``cts_kl.seeds``: one method's tickets of every seed retrained as rows of one stacked network
    (``runtime.stack_seeds``)."""
    return f"{branch.method}.seeds"


def group_namespace(group: Sequence[Branch]) -> str:
    """The namespace of a node shared by ``group``: its seed's, or (several seeds) the method's seeds'."""
    return search_group_namespace(group[0]) if len({b.seed for b in group}) == 1 else seeds_group_namespace(group[0])


def branch_namespace(method: str, seed: int, sparsity: float | None = None) -> str:
    parts = [method, f"seed{seed}"]
    if sparsity is not None:
        parts.append(sparsity_label(sparsity))
    return ".".join(parts)


def _fractions(name: str, values: Any, *, allow_empty: bool = False) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or (not values and not allow_empty):
        raise ValueError(f"{name} must be a {'' if allow_empty else 'non-empty '}list of fractions in (0, 1), "
                         f"got {values!r}")
    for s in values:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"{name}: {s!r} is not a number")
        if not 0.0 < s < 1.0:
            hint = f" (sparsity is a fraction: {s:g} % is {s / 100:g})" if 1.0 < s < 100.0 else ""
            raise ValueError(f"{name}: {s!r} is outside (0, 1){hint}")
    labels = [sparsity_label(s) for s in values]
    clashes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if clashes:
        raise ValueError(f"{name}: several values round to the same branch {clashes}; "
                         "sparsities must differ at 0.01 % resolution (0.0001 % from 99.9 % on)")
    return tuple(float(s) for s in values)


def _names(name: str, values: Any, allowed: Sequence[str] | None = None) -> tuple[str, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list, got {values!r}")
    for v in values:
        if not isinstance(v, str) or (allowed is not None and v not in allowed):
            raise ValueError(f"{name}: unknown {v!r}; known: {', '.join(allowed or [])}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {list(values)}")
    return tuple(values)


class GridConfig(Section):
    """``grid`` parameters: target sparsities (fractions in (0, 1)) or iterative-pruning levels, and seeds.

    ``levels: [18, 22]`` means density ``0.8**L`` exactly, for every method, so CTS, PaI and LTR keep
    the same count at the same level; it takes precedence over ``sparsities``, which then become
    ``1 − 0.8**L`` (``sparsities`` stays for arbitrary values).
    """

    label: ClassVar[str] = "grid."
    levels: tuple[int, ...] | None = None  # before sparsities, which are derived from them
    sparsities: tuple[float, ...] = Field((), validate_default=True)
    seeds: tuple[int, ...] = (0,)

    @field_validator("levels", mode="before")
    @classmethod
    def _levels(cls, levels: Any) -> tuple[int, ...] | None:
        if isinstance(levels, str):  # "2..42/2": a range, inclusive, for --params (which splits lists at commas)
            levels = _level_range(levels)
        if levels is None:
            return None
        if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels:
            raise ValueError(f"grid.levels must be null or a non-empty list of positive integers, got {levels!r}")
        for level in levels:
            if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= MAX_LEVEL:
                raise ValueError(f"grid.levels: {level!r} is not an integer in [1, {MAX_LEVEL}] "
                                 f"(level L keeps 0.8^L of the weights)")
        if len(set(levels)) != len(levels) or list(levels) != sorted(levels):
            raise ValueError(f"grid.levels must increase without repeats, got {list(levels)}")
        return tuple(levels)

    @field_validator("sparsities", mode="before")
    @classmethod
    def _sparsities(cls, sparsities: Any, info: ValidationInfo) -> tuple[float, ...]:
        if "levels" not in info.data:  # the levels were refused, and said so
            return ()
        levels = info.data["levels"]
        if levels is not None:
            sparsities = [1.0 - level_density(level) for level in levels]
        return _fractions("grid.sparsities", sparsities)

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, seeds: Any) -> tuple[int, ...]:
        if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
            raise ValueError(f"grid.seeds must be a non-empty list of non-negative integers, got {seeds!r}")
        for seed in seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise ValueError(f"grid.seeds: {seed!r} is not a non-negative integer")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"grid.seeds has duplicates: {list(seeds)}")
        return tuple(seeds)


def _level_range(text: str) -> list[int]:
    """``"FIRST..LAST"`` or ``"FIRST..LAST/STEP"`` as the levels FIRST, FIRST + STEP, … up to LAST."""
    import re

    match = re.fullmatch(r"\s*(\d+)\s*\.\.\s*(\d+)\s*(?:/\s*(\d+))?\s*", text)
    if match is None or int(match[3] or 1) < 1 or int(match[1]) > int(match[2]):
        raise ValueError(f"grid.levels must be a list of levels or a range FIRST..LAST[/STEP] such as 2..42/2, "
                         f"got {text!r}")
    return list(range(int(match[1]), int(match[2]) + 1, int(match[3] or 1)))


class MethodsConfig(Section):
    """``methods`` parameters: what the comparison runs besides the main CTS configuration."""

    label: ClassVar[str] = "methods."
    cts_variants: tuple[dict[str, Any], ...] = ()  # CTS ablations: each overrides keys of `cts`
    ltr: Flag = True
    pai: tuple[str, ...] = PAI_METHODS

    @field_validator("cts_variants", mode="before")
    @classmethod
    def _variants(cls, variants: Any) -> tuple[dict[str, Any], ...]:
        if isinstance(variants, (str, bytes, Mapping)) or not isinstance(variants, Sequence) \
                or not all(isinstance(v, Mapping) for v in variants):
            raise ValueError("methods.cts_variants must be a list of mappings that override `cts`, e.g. "
                             f"[{{search_length: short}}], got {variants!r}")
        return tuple(dict(v) for v in variants)

    @field_validator("pai", mode="before")
    @classmethod
    def _pai(cls, methods: Any) -> tuple[str, ...]:
        return _names("methods.pai", methods, PAI_METHODS)


class PaiConfig(Section):
    """``pai`` parameters: where pruning-at-initialisation methods score the weights."""

    label: ClassVar[str] = "pai."
    at: Literal[STARTS] = "init"


class SanityConfig(Section):
    """``sanity`` parameters: which methods and sparsities the sanity checks perturb."""

    label: ClassVar[str] = "sanity."
    methods: tuple[str, ...] = ("cts",)  # "cts" is the main CTS method; PaI names without "_at_..." resolve
    sparsities: tuple[float, ...] = (0.9926,)
    checks: tuple[str, ...] = tuple(CHECKS)

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, methods: Any) -> tuple[str, ...]:
        return _names("sanity.methods", methods)

    @field_validator("sparsities", mode="before")
    @classmethod
    def _sparsities(cls, sparsities: Any) -> tuple[float, ...]:
        return _fractions("sanity.sparsities", sparsities, allow_empty=True)

    @field_validator("checks", mode="before")
    @classmethod
    def _checks(cls, checks: Any) -> tuple[str, ...]:
        return _names("sanity.checks", checks, tuple(CHECKS))


def _section(cls, params: Mapping, key: str, required: bool = False):
    raw = params.get(key)
    if raw is None and not required:
        return cls()
    return read_section(cls, raw, key)


@dataclass
class Plan:
    """Every branch of every pipeline, by family, in a stable order."""

    grid: GridConfig
    dense: list[Branch]
    cts: list[Branch]  # the main CTS configuration (`cts`), the `cts` pipeline
    cts_variants: list[Branch]  # ablations (`methods.cts_variants`)
    ltr_runs: list[Branch]  # one iterative pruning run per seed
    ltr: list[Branch]
    pai: list[Branch]
    sanity: list[Branch]
    problems: list[str] = field(default_factory=list)  # sanity settings that cannot run (see check())

    def check(self, pipelines: Sequence[str] | None) -> None:
        """Raise for sanity settings that cannot run, when the run includes the sanity checks."""
        if self.problems and (not pipelines or {"sanity", "__default__"} & set(pipelines)):
            raise ValueError("; ".join(self.problems))

    def all(self) -> list[Branch]:
        return [*self.dense, *self.cts, *self.cts_variants, *self.ltr_runs, *self.ltr, *self.pai, *self.sanity]

    def by_method(self) -> dict[str, list[Branch]]:
        out: dict[str, list[Branch]] = {}
        for b in [*self.cts, *self.cts_variants, *self.ltr, *self.pai]:
            out.setdefault(b.method, []).append(b)
        return out


def plan(params: Mapping) -> Plan:
    """All branches of the sweep from the (raw or validated) parameters; errors name the parameter."""
    grid = _section(GridConfig, params, "grid", required=True)
    methods = _section(MethodsConfig, params, "methods")
    pai_cfg = _section(PaiConfig, params, "pai")
    sanity_cfg = _section(SanityConfig, params, "sanity")
    seeds, sparsities = grid.seeds, grid.sparsities

    levels = grid.levels or (None,) * len(sparsities)

    def sweep(method: str, family: str, start: str, settings: Mapping) -> list[Branch]:
        return [Branch(method, seed, s, start, family, dict(settings), level)
                for seed in seeds for s, level in zip(sparsities, levels, strict=True)]

    base_cts = plain(params.get("cts"))
    cts = sweep(cts_method_name(base_cts), "cts", base_cts.get("search_at", "rewind"), base_cts)
    variants: list[Branch] = []
    seen = {cts[0].method}
    for override in methods.cts_variants:
        merged = {**base_cts, **override}
        name = cts_method_name(merged)
        if name in seen:
            raise ValueError(f"methods.cts_variants: {dict(override)} gives the branch name {name!r} twice "
                             "(it does not change the search, or repeats another variant)")
        seen.add(name)
        variants += sweep(name, "cts", merged.get("search_at", "rewind"), merged)

    ltr_runs, ltr = [], []
    if methods.ltr:
        ltr_levels = dict(zip(sparsities, grid.levels, strict=True)) if grid.levels \
            else {s: level_for_sparsity(s) for s in sparsities}
        ltr_runs = [Branch(LTR, seed, None, "rewind", "ltr_run",
                           {"max_level": max(ltr_levels.values()), "levels": sorted(set(ltr_levels.values()))})
                    for seed in seeds]
        ltr = [Branch(LTR, seed, s, "rewind", LTR, {"level": ltr_levels[s]}, ltr_levels[s] if grid.levels else None)
               for seed in seeds for s in sparsities]

    suffix = "" if pai_cfg.at == "init" else f"_at_{pai_cfg.at}"
    pai = [b for m in methods.pai for b in sweep(m + suffix, "pai", pai_cfg.at, {"method": m, "at": pai_cfg.at})]

    planned = {b.method: b for b in [*cts, *variants, *ltr, *pai]}
    aliases = {"cts": cts[0].method, **{b.settings["method"]: b.method for b in pai}}
    problems, checked = [], []
    for name in sanity_cfg.methods:
        resolved = name if name in planned else aliases.get(name)
        if resolved is None:
            problems.append(f"sanity.methods: {name!r} is not among the planned methods "
                            f"({', '.join(['cts', *sorted(planned)])})")
        else:
            checked.append(resolved)
    grid_labels = {sparsity_label(g) for g in sparsities}
    outside = [s for s in sanity_cfg.sparsities if sparsity_label(s) not in grid_labels]
    if outside:
        problems.append(f"sanity.sparsities: {outside} are not in grid.sparsities {list(sparsities)}")
    sanity = []
    for method in [] if outside else checked:
        base = planned[method]
        for check in sanity_cfg.checks:
            if check == "invert" and base.family == LTR:
                continue  # LTR's mask comes from weights of the previous level, not from a score to invert
            for seed in seeds:
                for s in sanity_cfg.sparsities:
                    sparsity, level = next((g, L) for g, L in zip(sparsities, levels, strict=True)
                                           if sparsity_label(g) == sparsity_label(s))
                    # Reinitialisation retrains the mask from a fresh initialisation over the whole
                    # schedule, whether it was found at θ_0 or at θ_k (Frankle et al. 2021).
                    start = "init" if check == "reinit" else base.start
                    sanity.append(Branch(f"{method}_{CHECKS[check]}", seed, sparsity, start, "sanity",
                                         {"check": check, "of": method, "of_family": base.family}, level))
    return Plan(grid, [Branch(DENSE, seed) for seed in seeds], cts, variants, ltr_runs, ltr, pai, sanity, problems)


def branches_for(params: Mapping) -> list[Branch]:
    """Every branch the registered pipelines contain, from the raw or validated parameters."""
    return plan(params).all()

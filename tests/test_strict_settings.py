"""Every setting of every section refuses a value of the wrong type in one line naming it.

A YAML or ``--params`` value of the wrong type must never be coerced into something else: the
string ``"false"`` is truthy (``training.nesterov: "false"`` trained with Nesterov), ``1`` is not
``true``, ``12.5`` is not a batch size, and ``inf`` or NaN is no learning rate or mean. The walk
reads each field's type from its section (pydantic's annotations, or the field types of ``core``'s
dataclasses), so a field added later is walked too.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest

from cts_pipeline.config.sections import OPTIONAL_SECTIONS, SECTIONS, DaskSettings, TrackingSettings
from cts_pipeline.config.typed import ConfigError, Section, read_section
from cts_pipeline.core.cts import SearchConfig
from cts_pipeline.core.train.recipe import TrainRecipe

# The least each section needs to be valid; every other field keeps its default.
MINIMAL = {
    "data": {"name": "digits"},
    "model": {"name": "convnet"},
    "training": {"epochs": 2, "batch_size": 8, "lr": 0.1},
    "grid": {"sparsities": [0.9]},
}
SETTINGS_FILES = {"mlflow.yml": TrackingSettings, "dask.yml": DaskSettings}
# Fields whose own validator reads strings on purpose (a range, an interval), so a string is no
# wrong type there.
TEXT_ALLOWED = {("grid", "levels"), ("runtime", "checkpoint_every")}

INF, NAN = math.inf, math.nan


def _kinds(annotation: Any) -> list[Any]:
    """The kinds of value a field takes: bool, int, float, str, a Literal's values, a nested
    section, a sequence of one of those (as ("seq", kind)), or a mapping."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _kinds(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [k for a in get_args(annotation) if a is not type(None) for k in _kinds(a)]
    if origin is Literal:
        return [("literal", get_args(annotation))]
    if origin in (tuple, list, collections.abc.Sequence):
        return [("seq", _kinds(get_args(annotation)[0])[0])]
    if origin is dict:
        return [dict]
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return [Section]
    strict_bases = {"StrictBool": bool, "StrictInt": int, "StrictFloat": float}
    return [strict_bases.get(getattr(annotation, "__name__", ""), annotation)]


def _wrong_values(kinds: list[Any]) -> list[Any]:
    """Values that no kind of the field takes as they are."""
    takes = set(kinds)
    candidates = []
    if bool in takes:
        candidates += ["false", 1, 0.0]
    if int in takes:
        candidates += [True, 12.5, "1000"]
    if float in takes:
        candidates += [True, "0.1", INF, NAN]
    if str in takes:
        candidates += [1, True]
    for kind in kinds:
        if isinstance(kind, tuple) and kind[0] == "literal":
            candidates += [v for v in (1, 0, 1.0, "true", 2) if not any(v == c and type(v) is type(c)
                                                                      for c in kind[1])]
        if isinstance(kind, tuple) and kind[0] == "seq":
            candidates += {bool: [["yes"]], int: [[1.5], [True]], float: [[NAN], ["a"], [True]],
                           str: [[1]], dict: [[1]]}.get(kind[1], [[object()]])
    if dict in takes:
        candidates += ["x", [1]]
    if Section in takes:
        candidates += ["x"]
    return [v for v in candidates if not any(_accepts(kind, v) for kind in kinds)]


def _accepts(kind: Any, value: Any) -> bool:
    """Whether ``kind`` takes ``value`` as it is (a float field takes a finite int, a str | int
    field takes text and integers)."""
    if kind is float:
        return type(value) in (int, float) and math.isfinite(value)
    if kind in (bool, int, str):
        return type(value) is kind
    return False


def _fields() -> list[tuple[str, type, str, Any]]:
    cases = []
    sections = {**SECTIONS, **OPTIONAL_SECTIONS, **SETTINGS_FILES}
    for title, cls in sections.items():
        if dataclasses.is_dataclass(cls):
            fields = typing.get_type_hints(cls)  # (resolves `from __future__ import annotations` strings)
        else:
            fields = {name: f.annotation for name, f in cls.model_fields.items()}
        for name, annotation in fields.items():
            for value in _wrong_values(_kinds(annotation)):
                if (title, name) in TEXT_ALLOWED and isinstance(value, str):
                    continue
                cases.append(pytest.param(title, cls, name, value, id=f"{title}.{name}={value!r}"))
    return cases


@pytest.mark.parametrize(("title", "cls", "field", "value"), _fields())
def test_a_wrong_typed_value_is_refused_in_one_line_naming_its_setting(title, cls, field, value):
    raw = {**MINIMAL.get(title, {}), field: value}
    with pytest.raises((ConfigError, ValueError)) as refused:
        read_section(cls, raw, title)
    problems = getattr(refused.value, "problems", [str(refused.value)])
    assert len(problems) == 1, problems
    named = f"{title}: " if title.endswith(".yml") else f"{title}."
    assert f"{named}{field}" in problems[0], problems[0]
    assert "\n" not in problems[0]


def test_the_walk_covers_every_field_of_every_section():
    walked = {(values.values[0], values.values[2]) for values in _fields()}
    for title, cls in {**SECTIONS, **OPTIONAL_SECTIONS, **SETTINGS_FILES}.items():
        names = ([f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls)
                 else list(cls.model_fields))
        assert {(title, n) for n in names} <= walked, f"{title}: a field has no wrong value to try"


def test_the_reviews_cases_read_as_they_were_meant():
    """The values the review found coerced: each is refused, and its right spelling is taken."""
    recipe = dict(MINIMAL["training"])
    with pytest.raises(ValueError, match=r"training.nesterov must be true or false, got 'false'"):
        TrainRecipe(**recipe, nesterov="false")
    assert TrainRecipe(**recipe, nesterov=False).nesterov is False
    with pytest.raises(ValueError, match=r"training.lr must be a finite number, got inf"):
        TrainRecipe(**{**recipe, "lr": INF})
    with pytest.raises(ValueError, match=r"cts.lr"):
        SearchConfig(lr=INF)

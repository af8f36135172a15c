"""How a settings mapping becomes a typed section, and back: the one way in and the one way out.

Every section of the parameters and of the settings files is a pydantic model (:class:`Section`:
unknown keys refused, values frozen, constrained fields), except ``training`` and ``cts``, which
are ``core``'s own dataclasses (``TrainRecipe``, ``SearchConfig``: ``core`` never imports
pydantic). :func:`read_section` builds either kind from a mapping and :func:`plain` turns either
back into plain values. Pydantic's errors are rewritten into the user's words, one line each,
naming the setting as it is written in the YAML (``runtime.tf32 must be true or false, got 'yes'``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
)


class ConfigError(ValueError):
    """The configuration cannot run; the message names every offending parameter, and
    ``problems`` holds them one line each."""

    def __init__(self, message: str, problems: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]

    @classmethod
    def listing(cls, problems: Sequence[str]) -> ConfigError:
        return cls("; ".join(problems), problems)


@dataclasses.dataclass(frozen=True)
class Expects:
    """What a field takes, in a YAML writer's words: the message a wrong value gets. Pydantic
    keeps this marker in a field's metadata and otherwise ignores it."""

    words: str


Flag = Annotated[StrictBool, Expects("true or false")]
PositiveInt = Annotated[StrictInt, Field(ge=1), Expects("a positive integer")]
NonNegativeInt = Annotated[StrictInt, Field(ge=0), Expects("a non-negative integer")]
# (StrictFloat takes an int too, but never a bool or a string; allow_inf_nan=False refuses inf and NaN.)
PositiveNumber = Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False), Expects("a positive number")]
Fraction = Annotated[StrictFloat, Field(gt=0, lt=1, allow_inf_nan=False), Expects("a fraction in (0, 1)")]
FiniteNumber = Annotated[StrictFloat, Field(allow_inf_nan=False), Expects("a finite number")]
# auto, true or false: a Literal of booleans would take 1, 0 and 1.0 for them (pydantic compares by ==).
AutoFlag = Annotated[Literal["auto"] | StrictBool, Expects("auto, true or false")]
NonEmptyText = Annotated[str, Field(strict=True, min_length=1), Expects("a non-empty string")]


def registered(registry: Mapping[str, Any], what: str) -> Any:
    """The type of a name that must be a key of ``registry``: ``unknown dataset 'svhn'; known: …``."""
    def known(name: str) -> str:
        if name not in registry:
            raise ValueError(f"unknown {what} {name!r}; known: {', '.join(sorted(registry))}")
        return name

    return Annotated[str, Field(strict=True), AfterValidator(known), Expects(f"a registered {what} name")]


class Section(BaseModel):
    """A typed settings section. ``label`` prefixes each setting's name in messages: ``runtime.``
    for a parameter section, ``dask.yml: `` for a settings file.

    Built directly (``RuntimeConfig(tf32=True)``) or from a mapping (:func:`read_section`), a bad
    value raises :class:`ConfigError` with one line per problem instead of pydantic's report.
    Pydantic validates through a model's own ``__init__`` when it has one, also for a section
    nested in another, so the outer section's error holds the inner one's lines
    (:func:`problems_of` unpacks them).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    label: ClassVar[str] = ""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError.listing(problems_of(type(self), exc)) from None

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def replace(self, **changes: Any):
        """A copy with ``changes``, validated as a new section is (pydantic's ``model_copy`` is not)."""
        return type(self)(**{**self.as_dict(), **changes})


def title_of(cls: type) -> str:
    """The section's name without the separator: ``runtime``, ``dask.yml``."""
    return getattr(cls, "label", "").rstrip(". :")


def read_section(cls: type, raw: Any, title: str | None = None):
    """``cls`` from ``raw``, a mapping from the parameters or a settings file; raises
    :class:`ConfigError` with every problem, each naming its setting."""
    section, problems = section_or_problems(cls, raw, title)
    if problems:
        raise ConfigError.listing(problems)
    return section


def section_or_problems(cls: type, raw: Any, title: str | None = None) -> tuple[Any, list[str]]:
    """(the section, []) or (None, one line per problem): the form that collects every section's
    problems for one report."""
    title = title or title_of(cls)
    if isinstance(raw, cls):
        return raw, []
    if not isinstance(raw, Mapping):
        return None, [f"{title}: expected a mapping of settings, got {raw!r}"]
    if issubclass(cls, Section):
        try:
            return cls.model_validate(dict(raw)), []
        except ValidationError as exc:
            return None, problems_of(cls, exc)
    known = [f.name for f in dataclasses.fields(cls)]  # core's dataclasses, which check their own values
    unknown = [_unknown(title, key, known) for key in raw if key not in known]
    if unknown:
        return None, unknown
    try:
        return cls(**raw), []
    except TypeError as exc:  # a missing key
        return None, [f"{title}: {exc}".replace(f"{cls.__name__}.__init__()", "it")]
    except ValueError as exc:
        return None, [str(exc)]


def is_section(value: Any) -> bool:
    """Whether ``value`` is a typed section (a pydantic one, one of core's dataclasses, anything
    with ``as_dict``) rather than a plain value or mapping."""
    return hasattr(value, "as_dict") or dataclasses.is_dataclass(value)


def plain(section: Any) -> dict[str, Any]:
    """A section (pydantic or dataclass), a mapping or None as plain values: for digests, MLflow
    and reports."""
    if section is None:
        return {}
    if hasattr(section, "as_dict"):
        return section.as_dict()
    if dataclasses.is_dataclass(section):
        return dataclasses.asdict(section)
    return dict(section)


# Names other tools give the same settings; difflib cannot see that "learning_rate" means "lr".
SYNONYMS = {"learning_rate": "lr", "num_epochs": "epochs", "n_epochs": "epochs", "wd": "weight_decay",
            "bs": "batch_size", "lr_milestones": "milestones", "clip_grad_norm": "grad_clip_norm",
            "warmup": "warmup_epochs", "sparsity": "sparsities", "level": "levels", "seed": "seeds"}


def closest(name: str, options: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the nearest of ``options`` to a misspelt ``name``, else ``''``."""
    if SYNONYMS.get(str(name)) in options:
        return f" (did you mean {SYNONYMS[str(name)]!r}?)"
    match = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _unknown(title: str, key: Any, known: Sequence[str]) -> str:
    return f"{title}: unknown key {key!r}{closest(key, known)}; allowed: {', '.join(known)}"


def problems_of(cls: type[Section], error: ValidationError) -> list[str]:
    """Pydantic's errors as one line each, in the YAML writer's words."""
    lines = []
    for e in error.errors():
        raised = (e.get("ctx") or {}).get("error")
        for line in raised.problems if isinstance(raised, ConfigError) else [_problem(cls, e)]:
            if line not in lines:  # a union reports each of its members: the field is named once
                lines.append(line)
    return lines


def _field_path(cls: type[Section], loc: Sequence[Any]) -> list[Any]:
    """``loc`` up to the field it names: a union's member tag (``bool``, ``literal['auto']``) after
    the field is pydantic's, not a setting."""
    path, owner = [], cls
    for part in loc:
        if isinstance(part, int):
            path.append(part)
            continue
        if owner is None or part not in owner.model_fields:
            break
        path.append(part)
        owner = _nested(owner.model_fields[part].annotation)
    return path


def _problem(cls: type[Section], error: Mapping[str, Any]) -> str:
    located = _field_path(cls, error["loc"]) if error["type"] != "extra_forbidden" else list(error["loc"])
    loc = [str(part) for part in located if not isinstance(part, int)]  # a list's item: its list
    item = "".join(f"[{part}]" for part in located[len(loc):] if isinstance(part, int))
    if error["type"] == "extra_forbidden":
        owner = _owner(cls, loc[:-1])
        title = ".".join([title_of(cls), *loc[:-1]])
        return _unknown(title, loc[-1], list(owner.model_fields))
    name = cls.label + ".".join(loc) + item
    if error["type"] == "value_error":  # our own validators: their message, named once
        message = str(error["ctx"]["error"])
        if not loc or message.startswith(name):
            return message
        return f"{name} {message}, got {error['input']!r}" if message.startswith("must ") else f"{name}: {message}"
    if error["type"] == "missing":
        return f"{name}: missing (required)"
    field = _field(cls, loc)
    expected = _expected(field.annotation, field.metadata) if field is not None and not item else None
    if expected:
        return f"{name} must be {expected}, got {error['input']!r}"
    return f"{name}: {error['msg'][0].lower()}{error['msg'][1:]}, got {error['input']!r}"


def _owner(cls: type[Section], path: Sequence[str]) -> type[Section]:
    """The nested section that ``path`` (field names from ``cls``) leads to."""
    for part in path:
        cls = _nested(cls.model_fields[part].annotation) or cls
    return cls


def _field(cls: type[Section], loc: Sequence[str]):
    """The field a location names, through nested sections; a list's field for an item in it."""
    field, owner = None, cls
    for part in loc:
        if owner is None or part not in owner.model_fields:
            return field
        field = owner.model_fields[part]
        owner = _nested(field.annotation)
    return field


def _nested(annotation: Any) -> type[Section] | None:
    return next((a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(a, Section)),
                None)


def _expected(annotation: Any, metadata: Sequence[Any] = ()) -> str | None:
    """A field's accepted values in words, from its :class:`Expects` marker, its ``Literal``
    choices, or its ``None`` option (``null or a positive integer``)."""
    for marker in reversed(metadata):  # the outermost marker: the field's own words
        if isinstance(marker, Expects):
            return marker.words
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *extra = get_args(annotation)
        return _expected(base, extra)
    if origin is Literal:
        return _either([_yaml(v) for v in get_args(annotation)])
    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        words = [_expected(a) for a in options if a is not type(None)]
        if None in words:
            return None
        return _either(["null", *words] if type(None) in options else words)
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return "a mapping of its settings"
    return None


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _either(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"

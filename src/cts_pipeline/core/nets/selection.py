"""Which of a model's parameters the methods may prune: ``model.prunable``.

The default is every convolution's and linear layer's ``weight`` (less the layers a model keeps
dense through its ``keep_dense`` attribute). A selection replaces it with a list of entries, each of
which picks:

- a module type (``Conv2d``, ``Linear``, ``MultiheadAttention``, or the class name of one of the
  model's own modules): the weight matrices of every module of that type and of the modules inside
  it, i.e. parameters named ``weight`` or ``*_weight`` with two or more dimensions
  (``in_proj_weight`` included, a norm's 1-D scale not); ``torch.nn`` types match subclasses too
  (``Linear`` picks attention's ``out_proj``);
- a module name or glob pattern (``layer1``, ``features.0``, ``layer*.conv1``): the same, for those
  modules (``layer1``: every weight matrix inside it);
- a parameter name or glob pattern (``*.self_attn.in_proj_weight``): those parameters.

A selection lives on the model it was made for (the ``prunable_selection`` attribute, set by
:func:`select_prunable`), so everything that asks :func:`.masks.prunable_parameters` (every method,
the sanity checks, the connectivity report, the stacked paths) sees the same weights. Patterns are
``fnmatch``'s: ``*`` also crosses dots.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

ATTRIBUTE = "prunable_selection"


def _weight_matrices(module: nn.Module) -> list[str]:
    """A module's own weight matrices: ``weight`` / ``*_weight`` parameters of two or more dimensions
    (not a norm's 1-D scale)."""
    return [name for name, p in module.named_parameters(recurse=False)
            if (name == "weight" or name.endswith("_weight")) and p.dim() >= 2]


def _module_type(entry: str) -> type | None:
    candidate = getattr(nn, entry, None)
    return candidate if isinstance(candidate, type) and issubclass(candidate, nn.Module) else None


def _picks(entry: str, model: nn.Module) -> list[str]:
    """The parameter names one entry picks (possibly repeated), in module order."""
    kind = _module_type(entry)
    picked = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        by_type = isinstance(module, kind) if kind is not None else type(module).__name__ == entry
        if by_type or (module_name and fnmatchcase(module_name, entry)):
            picked += [f"{prefix}{inner}.{name}" if inner else prefix + name
                       for inner, sub in module.named_modules() for name in _weight_matrices(sub)]
        else:
            picked += [prefix + name for name, _ in module.named_parameters(recurse=False)
                       if fnmatchcase(prefix + name, entry)]
    return picked


def selected_names(model: nn.Module, selection: Sequence[str]) -> list[str]:
    """Every parameter ``selection`` picks, in the model's parameter order. Raises ``ValueError``,
    naming it, for an entry that picks nothing (a typo would otherwise prune less than asked)."""
    chosen: set[str] = set()
    for entry in selection:
        picked = _picks(entry, model)
        if not picked:
            layers = [n for n, m in model.named_modules() if n and _weight_matrices(m)]
            raise ValueError(f"model.prunable entry {entry!r} matches no module type, module or parameter of the model "
                             f"(its layers with weights: {', '.join(layers[:8])}{', …' if len(layers) > 8 else ''})")
        chosen.update(picked)
    return [name for name, _ in model.named_parameters() if name in chosen]


def describe(selection: Sequence[str] | None) -> str:
    """A selection as the tables and MLflow show it."""
    return "Conv and Linear weights (default)" if selection is None else ", ".join(selection)


def select_prunable(model: nn.Module, selection: Sequence[str] | None) -> nn.Module:
    """``model`` with ``selection`` as its prunable weights (None: the default), checked now."""
    if selection is None:
        return model
    selection = tuple(selection)
    if not selected_names(model, selection):
        raise ValueError(f"model.prunable {list(selection)} selects no parameter of the model")
    setattr(model, ATTRIBUTE, selection)
    return model

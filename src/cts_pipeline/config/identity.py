"""A run's identity, decided here and only here: what makes two results the same result.

Three things name a result, and each is derived from what decides it, so that a changed setting
never reuses a stale artifact and an unchanged one never recomputes:

- **The catalog key** (``${config_key:<scope>}`` in every artifact's path): a digest of the
  parameter sections a stage depends on (:data:`KEY_SCOPES`) and of :data:`RESULTS_REVISION`.
- **The branch name**: a CTS configuration's method name spells out every non-default choice
  (:func:`cts_method_name`), so ablations never share a branch.
- **The checkpoint tag**: a digest of everything that decides one loop's result
  (:func:`checkpoint_tag`), so a loop resumes only from its own checkpoint.

The digest itself is ``core.artifacts.digests.digest`` (plain PyTorch, usable without Kedro).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.artifacts.digests import digest
from .typed import is_section, plain

# What artifacts depend on beyond their dataset name. A branch's name already spells out every
# choice that shapes it (cts_kl_short_at_init, snip_at_rewind, cts_kl_shuffled, seed, sparsity), so
# branches are keyed on the recipe they share; a report depends on everything. `runtime` never
# changes a result; data.root and data.download only say where the (canonical) files are.
KEY_SCOPES = {
    "runs": ("data", "model", "training"),
    "report": ("data", "model", "training", "cts", "methods", "pai", "grid", "sanity", "report"),
}

# Bumped whenever the code changes what a configuration computes (a new default inside the method),
# so that artifacts made by older code are never served to a run of this one.
# 2: CTS multiplies its objective by the authors' loss scale (cts.loss_scale: null).
RESULTS_REVISION = 2


def catalog_key(params: Mapping[str, Any], scope: str) -> str:
    """The digest of the parameter sections that artifacts of ``scope`` depend on."""
    if scope not in KEY_SCOPES:
        raise ValueError(f"config_key scope must be one of {sorted(KEY_SCOPES)}, got {scope!r}")
    sections = {name: params.get(name) for name in KEY_SCOPES[scope]}
    if isinstance(sections.get("data"), dict):
        sections["data"] = {k: v for k, v in sections["data"].items() if k not in ("root", "download")}
    if isinstance(sections.get("model"), dict):
        sections["model"] = _model_identity(sections["model"])
    return digest(RESULTS_REVISION, sections)


def _model_identity(model: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model`` section as results depend on it: the start weights' contents, not only their
    path; ``prunable`` and ``weights`` left out where null, so that keys and checkpoint tags made
    before they existed stay valid."""
    values = {k: v for k, v in model.items() if not (k in ("prunable", "weights") and v is None)}
    if values.get("weights"):
        from ..core.nets.weights import weights_digest

        try:
            values["weights_digest"] = weights_digest(values["weights"])
        except OSError:  # no such file: the run's checks say so, in one line
            pass
    return values


def cts_method_name(cts: Mapping) -> str:
    """``cts_<objective>``, plus every non-default choice, so variants never share a branch."""
    name = f"cts_{cts.get('objective', 'kl')}"
    if cts.get("epochs") is not None:
        name += f"_{cts['epochs']}ep"
    elif cts.get("search_length", "long") != "long":
        name += f"_{cts['search_length']}"
    if cts.get("balance", "gradbalance") != "gradbalance":
        name += f"_{cts['balance']}"
    if cts.get("lr") is not None:
        name += f"_lr{cts['lr']:g}".replace(".", "p")
    if cts.get("loss_scale") is not None:
        name += f"_ls{cts['loss_scale']:g}".replace(".", "p").replace("+", "")
    if cts.get("min_kept_per_layer"):
        name += f"_floor{cts['min_kept_per_layer']}"
    if cts.get("search_at", "rewind") != "rewind":
        name += f"_at_{cts['search_at']}"
    if cts.get("schedule", "project") != "project":
        name += f"_{cts['schedule']}_schedule"
    if cts.get("objective") == "feature_mse" and cts.get("feature_capture", "layer_outputs") != "layer_outputs":
        name += f"_{cts['feature_capture']}"  # (the option changes nothing for other objectives)
    return name


def checkpoint_tag(stage: str, *decided_by: Any) -> str:
    """The tag of one loop's checkpoint: a digest of its stage and of everything that decides its
    result (typed sections or dicts, start weights, masks, the data's fingerprint)."""
    parts = [_section_identity(k) if is_section(k) else k for k in decided_by]
    return digest(stage, *parts)


def _section_identity(section: Any) -> Any:
    """A typed section's plain values; the ``model`` section's as :func:`_model_identity` makes them
    (told by its label, ``model.``, as catalog_key tells it by its key)."""
    values = plain(section)
    return _model_identity(values) if getattr(section, "label", None) == "model." else values

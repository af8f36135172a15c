"""The project's Kedro context: it carries the sweep's branches into the pipelines and parameters.

Kedro builds pipelines before it loads parameters, yet the grid shapes the DAG. Every way of
opening the project (``kedro run``, ``kedro viz`` with or without ``--include-hooks``, a notebook)
creates a context from the chosen environment and ``--params``, so the context is where that
configuration is handed to the pipeline registry, and where each branch gets its coordinates as
the parameter ``params:<namespace>.branch`` (e.g. ``params:cts_kl.seed0.sp99_26.branch``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from attrs import define
from kedro.framework.context import KedroContext

from ..config import active as active_config
from ..config.sweep import BRANCH_PARAM, branches_for
from ..terminal import console
from . import viz_stats
from .provenance import preset_name

PIPELINE_REGISTRY = "cts_pipeline.pipeline_registry"


@define(slots=False)
class ProjectContext(KedroContext):
    def __attrs_post_init__(self) -> None:
        from kedro.framework.project import pipelines

        console.install()  # a quiet console: warnings and one line per finished branch
        active_config.remember(self.config_loader)
        # kedro-viz reads the last run's statistics from one place: show this preset's instead.
        viz_stats.show(Path(self.project_path), preset_name(self.config_loader, self.env))
        # Pipelines are cached per process; this context may carry another environment or other
        # --params (another grid), so they are rebuilt from it on next access.
        pipelines.configure(PIPELINE_REGISTRY)

    @property
    def params(self) -> dict[str, Any]:
        return with_branch_parameters(super().params)

    def _get_validated_params(self) -> dict[str, Any]:
        """Our sections' checks before Kedro's: Kedro instantiates each typed node parameter and
        stops at the first that fails, with pydantic's report inside its own; ``typed_sections``
        names every bad setting at once, each in one line, with "did you mean"."""
        from ..config.sections import typed_sections

        if self._validated_params_cache is None:  # the parameters the catalog reads too, read once
            typed_sections(active_config.parameters(self.config_loader))
        return super()._get_validated_params()


def with_branch_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` plus ``<namespace>.branch`` for every branch (a new dict; the input is untouched)."""
    out = dict(params)
    for branch in branches_for(params):
        *path, leaf = branch.namespace.split(".")
        level = out
        for i, key in enumerate(path):
            existing = level.get(key)
            if existing is not None and not isinstance(existing, dict):
                raise ValueError(f"parameter {'.'.join(path[:i + 1])!r} clashes with the branch "
                                 f"namespace {branch.namespace!r}; rename the parameter")
            level[key] = dict(existing or {})
            level = level[key]
        level[leaf] = {**(level.get(leaf) or {}), BRANCH_PARAM: branch}
    return out

"""The run's identity as a dataset the report reads: its results rows name their run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from ..provenance import DEFAULT_ENV, preset_name, run_identity

RUN_IDENTITY = "run_identity"  # a free input of the report nodes, filled in when a run starts


class RunIdentityHook:
    """Hands the report nodes ``run_identity`` (run, preset, commit). A hook, since only the
    session knows its id; it goes into the catalog as an in-memory free input, which travels with
    the catalog to every runner's workers like a parameter."""

    def __init__(self) -> None:
        self.preset = DEFAULT_ENV

    @hook_impl
    def after_context_created(self, context) -> None:
        self.preset = preset_name(context.config_loader, context.env)

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if RUN_IDENTITY in pipeline.inputs():
            project = Path(run_params.get("project_path") or Path.cwd())
            catalog[RUN_IDENTITY] = run_identity(run_params, project, self.preset)

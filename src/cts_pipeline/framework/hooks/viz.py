"""kedro-viz's statistics of each run kept under its preset (``framework/viz_stats.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from .. import viz_stats
from ..provenance import DEFAULT_ENV, preset_name


class VizStatsHook:
    """After kedro-viz's hooks have written the run's files (``trylast``), keep a copy under the
    run's preset, also when the run failed part-way (its events say which nodes ran)."""

    def __init__(self) -> None:
        self.preset = DEFAULT_ENV
        self.project_path = Path.cwd()
        self.run = ""

    @hook_impl
    def after_context_created(self, context) -> None:
        self.preset = preset_name(context.config_loader, context.env)
        self.project_path = Path(context.project_path)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:
        self.run = str(run_params.get("run_id") or "")

    @hook_impl(trylast=True)
    def after_pipeline_run(self) -> None:
        viz_stats.keep(self.project_path, self.preset, self.run)

    @hook_impl(trylast=True)
    def on_pipeline_error(self) -> None:
        viz_stats.keep(self.project_path, self.preset, self.run)

"""Project hooks: checks at run start, MLflow tracking, and the results table at the end."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl

from .config import typed_sections, validate_run
from .tracking import RunTracker, TrackingSettings

logger = logging.getLogger(__name__)

class RunValidationHook:
    """Check the whole configuration once, before the first node and before tracking starts."""

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        validate_run(catalog.load("parameters"), run_params.get("pipeline_names"))


class MlflowHook:
    """A parent MLflow run per pipeline run; a child run per result; the report as artifacts."""

    def __init__(self) -> None:
        self.settings = TrackingSettings()
        self.project_path = Path.cwd()
        self.tracker: RunTracker | None = None

    @hook_impl
    def after_context_created(self, context) -> None:
        self.project_path = Path(context.project_path)
        try:
            raw = context.config_loader["mlflow"]
        except (KeyError, MissingConfigException):
            raw = {}
        self.settings = TrackingSettings(**raw)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if not self.settings.enabled:
            return
        names = ",".join(run_params.get("pipeline_names") or ["__default__"])
        env = run_params.get("env") or "local"
        tags = {
            "kedro.pipelines": names,
            "kedro.env": env,
            "kedro.session_id": str(run_params.get("run_id")),
            "kedro.namespaces": ",".join(run_params.get("namespaces") or []),
            "kedro.only_missing_outputs": str(run_params.get("only_missing_outputs", False)),
        }
        self.tracker = RunTracker.start(
            self.settings, self.project_path, run_name=f"{names} [{env}] {run_params.get('run_id')}",
            params=typed_sections(catalog.load("parameters")), tags=tags,
        )

    @hook_impl
    def after_node_run(self, node, outputs: dict[str, Any]) -> None:
        if self.tracker is None:
            return
        if "metrics" in node.tags:
            for value in outputs.values():
                if isinstance(value, dict) and "method" in value:
                    self.tracker.log_result(value)
        if "report" in node.tags:
            self.tracker.log_report(outputs)

    @hook_impl
    def after_pipeline_run(self) -> None:
        if self.tracker is not None:
            self.tracker.finish("FINISHED")
            self.tracker = None

    @hook_impl
    def on_pipeline_error(self, error: Exception) -> None:
        if self.tracker is not None:
            self.tracker.finish("FAILED", error)
            self.tracker = None


class ResultsPrinterHook:
    """Print each report's summary when the run ends (a log line would be wrapped and lost)."""

    def __init__(self) -> None:
        self.tables: dict[str, Any] = {}

    @hook_impl
    def after_node_run(self, node, outputs: dict[str, Any]) -> None:
        if "report" in node.tags:
            self.tables.update({k: v for k, v in outputs.items()
                                if k.endswith("_results_table") or k == "sanity_table"})

    @hook_impl
    def after_pipeline_run(self) -> None:
        from rich.console import Console
        from rich.table import Table

        from .pipelines.reporting.nodes import summary_rows

        console = Console(width=max(Console().width, 140))
        for name, table in self.tables.items():
            if name == "sanity_table":
                header = list(table.columns)
                rows = [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in r] for r in table.itertuples(index=False)]
                title = "sanity checks (a method passes when the check costs accuracy beyond the seed spread)"
            else:
                header, rows = summary_rows(table)
                title = f"{name.removesuffix('_results_table')}: last-epoch test accuracy, mean ± std over seeds"
            out = Table(title=title, title_justify="left")
            for i, column in enumerate(header):
                out.add_column(column, justify="left" if i in (0, len(header) - 1) else "right")
            for row in rows:
                out.add_row(*row)
            console.print(out)
            if "hardware" in table:
                console.print(f"hardware: {'; '.join(sorted(table['hardware'].unique()))}")
        self.tables.clear()

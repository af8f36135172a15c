"""Project hooks: checks at run start, MLflow tracking, and the results table at the end.

Tracking and the results table read what the nodes produced from the catalog, in the driver
process, after it was saved (``tracking.py`` says why). So they work the same under the
SequentialRunner, the ThreadRunner, Kedro's ParallelRunner (whose workers run node hooks in
their own processes) and :class:`cts_pipeline.runners.DaskRunner`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl

from .config import typed_sections, validate_run
from .core.checkpoints import defer_removal, keep_deferred, remove_deferred
from .tracking import RunTracker, TrackingSettings, TrackingUnavailable, first_line, source_tags

logger = logging.getLogger(__name__)

RESULT_TABLE_SUFFIX = "_results_table"


def is_result(dataset_name: str, node) -> bool:
    """A branch's (or the dense run's) metrics: what becomes a child run."""
    return "metrics" in node.tags and dataset_name.endswith(".metrics")


def load_fresh(catalog, name: str) -> Any:
    """``name`` as saved by whichever process ran its node: a versioned dataset caches the version
    it last resolved, which is stale when another process saved a newer one."""
    catalog.release(name)
    return catalog.load(name)


# Whether the current run has started a node: an error before that is the configuration's
# (the CLI exits with 2), after it the run's (exit 1).
run_state = {"nodes_started": False}


class RunValidationHook:
    """Check the whole configuration once, before the first node and before tracking starts."""

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        run_state["nodes_started"] = False
        validate_run(catalog.load("parameters"), run_params.get("pipeline_names"))

    @hook_impl
    def before_node_run(self) -> None:
        run_state["nodes_started"] = True


class CheckpointHook:
    """A node's per-epoch checkpoints are removed only once all its outputs are saved: a failed
    save (a full disk, a dead store) then costs nothing, since the rerun resumes from them."""

    def __init__(self) -> None:
        self.unsaved: dict[Any, set[str]] = {}

    @hook_impl
    def before_node_run(self, node) -> None:
        defer_removal()
        self.unsaved[node] = set(node.outputs)

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, node) -> None:
        left = self.unsaved.get(node)
        if left is not None:
            left.discard(dataset_name)
            if not left:
                del self.unsaved[node]
                remove_deferred()

    @hook_impl
    def after_node_run(self, node, outputs: dict[str, Any]) -> None:
        if node.outputs and outputs:
            return  # their saves come next
        self.unsaved.pop(node, None)
        if not node.outputs:
            remove_deferred()
        else:  # a runner that ran the node elsewhere (DaskRunner) cleans up there
            keep_deferred()

    @hook_impl
    def on_node_error(self, node) -> None:
        self.unsaved.pop(node, None)
        keep_deferred()


class MlflowHook:
    """A parent MLflow run per pipeline run, a child run per result, the report as artifacts."""

    def __init__(self) -> None:
        self.settings = TrackingSettings()
        self.project_path = Path.cwd()
        self.tracker: RunTracker | None = None
        self.driver_pid: int | None = None
        self.rerun_hint = "kedro run --only-missing-outputs"

    @hook_impl
    def after_context_created(self, context) -> None:
        self.project_path = Path(context.project_path)
        try:
            raw = context.config_loader["mlflow"]
        except (KeyError, MissingConfigException):
            raw = {}
        self.settings = TrackingSettings.from_config(raw)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if not self.settings.enabled:
            return
        names = ",".join(run_params.get("pipeline_names") or ["__default__"])
        env = run_params.get("env") or "local"
        self.rerun_hint = f"kedro run --pipelines={names} --env={env} --only-missing-outputs"
        tags = {
            "kedro.pipelines": names,
            "kedro.env": env,
            "kedro.session_id": str(run_params.get("run_id")),
            "kedro.namespaces": ",".join(run_params.get("namespaces") or []),
            "kedro.only_missing_outputs": str(run_params.get("only_missing_outputs", False)),
            **source_tags(self.project_path, f"kedro run --pipelines={names} --env={env}"),
            "kedro.runner": re.sub(r"^<?([\w.]+).*", r"\1", str(run_params.get("runner"))).rsplit(".", 1)[-1],
        }
        try:
            self.tracker = RunTracker.start(
                self.settings, self.project_path, run_name=f"{names} [{env}] {run_params.get('run_id')}",
                params=typed_sections(catalog.load("parameters")), tags=tags,
            )
        except TrackingUnavailable as exc:
            where = "conf/<env>/mlflow.yml"
            if self.settings.on_unavailable == "fail":
                raise TrackingUnavailable(f"MLflow: {exc}. Start it, or run untracked (enabled: false in "
                                          f"{where}), or go on without it (on_unavailable: warn)") from None
            logger.warning("MLflow: %s; running without tracking (enabled: false in %s silences this; "
                           "log the results later with `%s`)", exc, where, self.rerun_hint)
            return
        self.driver_pid = os.getpid()

    def _tracking(self) -> bool:
        # A forked worker inherits this object, tracker included: only the driver may write.
        return self.tracker is not None and os.getpid() == self.driver_pid

    def _safely(self, what: str, call, *args) -> None:
        """Run one MLflow call; a fault turns tracking off for the rest of the run, never the run."""
        try:
            call(*args)
        except Exception as exc:
            logger.warning("MLflow: could not log %s (%s); tracking is off for the rest of this run. "
                           "Every result is in the catalog: log them later with `%s`",
                           what, first_line(exc), self.rerun_hint)
            self.tracker = None

    def _log(self, name: str, node, data: Any) -> None:
        if not self._tracking():
            return
        if is_result(name, node):
            self._safely(name, self.tracker.log_result, name, data)
        elif "report" in node.tags:
            self._safely(name, self.tracker.log_report, name, data)

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        self._log(dataset_name, node, data)

    @hook_impl
    def after_node_run(self, node, catalog, outputs: dict[str, Any]) -> None:
        # A runner that executes nodes elsewhere (DaskRunner) calls this in the driver once the
        # node's outputs are saved, with no outputs in hand: they are read from the catalog.
        if outputs or not self._tracking():
            return
        for name in node.outputs:
            if is_result(name, node) or "report" in node.tags:
                self._log(name, node, load_fresh(catalog, name))

    def _log_from_catalog(self, pipeline, catalog) -> None:
        """Every result of ``pipeline`` in the catalog that this run has not logged: results made
        in worker processes, or in earlier runs that ``--only-missing-outputs`` skipped."""
        for node in pipeline.nodes:
            for name in node.outputs:
                if self._tracking() and is_result(name, node) and name not in self.tracker.children \
                        and catalog.exists(name):
                    self._log(name, node, load_fresh(catalog, name))

    @hook_impl
    def after_pipeline_run(self, pipeline, catalog) -> None:
        self._log_from_catalog(pipeline, catalog)
        if self._tracking():
            self._log_reports(pipeline, catalog)
            self._safely("the run's end", self.tracker.finish, "FINISHED")
        self.tracker = None

    @hook_impl
    def on_pipeline_error(self, error: Exception, pipeline, catalog) -> None:
        self._log_from_catalog(pipeline, catalog)
        if self._tracking():
            self._safely("the run's failure", self.tracker.finish, "FAILED", error)
        self.tracker = None

    def _log_reports(self, pipeline, catalog) -> None:
        for node in pipeline.nodes:
            for name in node.outputs if "report" in node.tags else ():
                if self._tracking() and name not in self.tracker.reports and catalog.exists(name):
                    self._log(name, node, load_fresh(catalog, name))


class StaleReportHook:
    """``--only-missing-outputs`` skips a node whose outputs exist, so a report whose files exist
    is skipped even when a branch it summarises was just recomputed. Such a report is rebuilt at
    the end of the run, before it is printed and logged.

    A dataset this run wrote has the run's save version (the session id), whichever process saved
    it, so the check works under every runner.
    """

    @hook_impl(tryfirst=True)
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        from kedro.pipeline import Pipeline
        from kedro.runner import SequentialRunner

        if not run_params.get("only_missing_outputs"):
            return
        version = run_params.get("run_id")
        for node in pipeline.nodes:
            if "report" not in node.tags or self._written_by_this_run(catalog, node.outputs, version):
                continue
            changed = [name for name in node.inputs if self._written_by_this_run(catalog, [name], version)]
            if changed:
                logger.info("%s: rebuilt, its inputs changed in this run (%s)", node.name, ", ".join(changed[:3]))
                SequentialRunner().run(Pipeline([node]), catalog)

    @staticmethod
    def _written_by_this_run(catalog, names, version) -> bool:
        for name in names:
            dataset = catalog.get(name, fallback_to_runtime_pattern=True)
            if hasattr(dataset, "resolve_load_version") and getattr(dataset, "_version", None) is not None:
                catalog.release(name)
                try:
                    if dataset.resolve_load_version() == version:
                        return True
                except Exception:  # no version on disk yet
                    continue
        return False


class ResultsPrinterHook:
    """Print each report's summary when the run ends (a log line would be wrapped and lost).

    The tables are read from the catalog, so the summary appears under every runner, and also
    when ``--only-missing-outputs`` had nothing left to compute.
    """

    @hook_impl
    def after_pipeline_run(self, pipeline, catalog) -> None:
        tables = {}
        for node in pipeline.nodes:
            if "report" in node.tags:
                for name in node.outputs:
                    if (name.endswith(RESULT_TABLE_SUFFIX) or name == "sanity_table") and catalog.exists(name):
                        tables[name] = load_fresh(catalog, name)
        if tables:
            print_tables(tables)


def print_tables(tables: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from .pipelines.reporting.nodes import summary_rows

    console = Console(width=max(Console().width, 140))
    for name, table in tables.items():
        if name == "sanity_table":
            header = list(table.columns)
            rows = [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in r] for r in table.itertuples(index=False)]
            title = "sanity checks (a method passes when the check costs accuracy beyond the seed spread)"
        else:
            header, rows = summary_rows(table)
            title = f"{name.removesuffix(RESULT_TABLE_SUFFIX)}: last-epoch test accuracy, mean ± std over seeds"
        out = Table(title=title, title_justify="left")
        for i, column in enumerate(header):
            out.add_column(column, justify="left" if i in (0, len(header) - 1) else "right")
        for row in rows:
            out.add_row(*row)
        console.print(out)
        if "hardware" in table:
            console.print(f"hardware: {'; '.join(sorted(table['hardware'].unique()))}")

"""MLflow tracking: one parent run per `kedro run`, one child run per branch, logged from the catalog."""

from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl

from ...config.sections import TrackingSettings, typed_sections
from ...config.sweep import plan
from ...config.typed import read_section
from ...core.artifacts.digests import digest
from ...errors import TrackingUnavailable, first_line
from ..provenance import DEFAULT_ENV, preset_name
from ..tracking import RunTracker, check_reachable, parent_run_params, source_tags
from .catalog import artifact_path, is_result, load_fresh

logger = logging.getLogger(__name__)


IN_PROCESS_RUNNERS = ("SequentialRunner", "ThreadRunner")



def parent_run_name(pipelines: str, preset: str, when: float | None = None) -> str:
    """``cts 12-03 22:56:13 default``: the pipeline, then the time (what tells runs apart
    within the width MLflow's name column shows), then the preset; the session id is a tag."""
    return f"{pipelines} {time.strftime('%m-%d %H:%M:%S', time.localtime(when))} {preset}"


class MlflowHook:
    """A parent MLflow run per pipeline run, a child run per result, the report as artifacts."""

    def __init__(self) -> None:
        self.settings = TrackingSettings()
        self.project_path = Path.cwd()
        self.tracker: RunTracker | None = None
        self.writer: ThreadPoolExecutor | None = None  # the one thread that writes to MLflow
        self.driver_pid: int | None = None
        self.rerun_hint = "kedro run --only-missing-outputs"
        self.catalog = None
        self.preset = DEFAULT_ENV

    @hook_impl
    def after_context_created(self, context) -> None:
        self.project_path = Path(context.project_path)
        self.preset = preset_name(context.config_loader, context.env)
        try:
            raw = context.config_loader["mlflow"]
        except (KeyError, MissingConfigException):
            raw = {}
        self.settings = read_section(TrackingSettings, raw)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self.catalog = catalog
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
        raw = catalog.load("parameters")
        sections = typed_sections(raw)
        # On the parent and every child: which preset (Kedro env) and which configuration made it,
        # so "group by sparsity" never sets a smoke ticket beside a default one.
        identity = {"preset": self.preset, "config": digest(raw)}
        start = partial(RunTracker.start, self.settings, self.project_path,
                        run_name=parent_run_name(names, self.preset), params=parent_run_params(sections), tags=tags,
                        started_at=time.time(), child_tags=identity,
                        sparsities=sorted({b.sparsity for b in plan(sections).all() if b.sparsity is not None}))
        try:
            check_reachable(self.settings.resolved_uri(self.project_path))  # seconds at most
            if tags["kedro.runner"] in IN_PROCESS_RUNNERS:
                # One writer thread: importing MLflow and opening its store (seconds) overlap the
                # first nodes, and each call after it leaves the nodes' critical path. In order,
                # so a child run exists before its ticket is logged. (Not before a runner that
                # forks: a fork during an import or a write can deadlock the child.)
                self.writer = ThreadPoolExecutor(1, thread_name_prefix="mlflow")
                self.writer.submit(self._start, start)
            else:
                self.tracker = start()
        except TrackingUnavailable as exc:
            where = "conf/<env>/mlflow.yml"
            if self.settings.on_unavailable == "fail":
                raise TrackingUnavailable(f"MLflow: {exc}. Start it, or run untracked (enabled: false in "
                                          f"{where}), or go on without it (on_unavailable: warn)") from None
            logger.warning("MLflow: %s; running without tracking (enabled: false in %s silences this; "
                           "log the results later with `%s`)", exc, where, self.rerun_hint)
            return
        self.driver_pid = os.getpid()

    def _start(self, start) -> None:
        try:
            self.tracker = start()
        except Exception as exc:
            logger.warning("MLflow: %s; running without tracking (log the results later with `%s`)",
                           first_line(exc), self.rerun_hint)

    def _tracking(self) -> bool:
        # A forked worker inherits this object, tracker included: only the driver may write.
        # While the writer thread opens the run, calls queue behind it.
        return os.getpid() == self.driver_pid and (self.tracker is not None or self.writer is not None)

    def _drain(self) -> None:
        """Wait for every queued MLflow call (the run's end reads what they recorded)."""
        if self.writer is not None:
            self.writer.submit(lambda: None).result()

    def _safely(self, what: str, method: str, *args) -> None:
        """One RunTracker call, on the writer thread when there is one (a method name, since the
        tracker may still be opening); a fault turns tracking off for the rest of the run, never
        the run."""
        if self.writer is not None:
            self.writer.submit(self._call, what, method, args)
        else:
            self._call(what, method, args)

    def _call(self, what: str, method: str, args: tuple) -> None:
        if self.tracker is None:
            return
        try:
            getattr(self.tracker, method)(*args)
        except Exception as exc:
            logger.warning("MLflow: could not log %s (%s); tracking is off for the rest of this run. "
                           "Every result is in the catalog: log them later with `%s`",
                           what, first_line(exc), self.rerun_hint)
            if self.tracker is not None:
                self.tracker.stop_monitor()
            self.tracker = None

    def _log(self, name: str, node, data: Any) -> None:
        if not self._tracking():
            return
        if is_result(name, node):
            self._safely(name, "log_result", name, data)
        elif "report" in node.tags:
            if hasattr(data, "savefig") and self.catalog is not None:
                data = load_fresh(self.catalog, name)  # the saved PNG: MLflow would draw the figure again
            self._safely(name, "log_report", name, data)

    def _log_ticket(self, catalog, metrics_name: str) -> None:
        ticket = metrics_name.removesuffix(".metrics") + ".ticket"
        if self._tracking() and catalog is not None and ticket in catalog:
            catalog.release(ticket)  # the version this run saved, whichever process saved it
            if catalog.exists(ticket):
                self._safely(ticket, "log_ticket", metrics_name, artifact_path(catalog, ticket))

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        self._log(dataset_name, node, data)
        if dataset_name.endswith(".ticket"):  # saved after its branch's metrics (same node)
            self._log_ticket(self.catalog, dataset_name.removesuffix(".ticket") + ".metrics")

    @hook_impl
    def after_node_run(self, node, catalog, outputs: dict[str, Any]) -> None:
        # A runner that executes nodes elsewhere (DaskRunner) calls this in the driver once the
        # node's outputs are saved, with no outputs in hand: they are read from the catalog.
        if outputs or not self._tracking():
            return
        for name in node.outputs:
            if is_result(name, node) or "report" in node.tags:
                self._log(name, node, load_fresh(catalog, name))
            if is_result(name, node):
                self._log_ticket(catalog, name)

    def _log_from_catalog(self, pipeline, catalog) -> None:
        """Every result of ``pipeline`` in the catalog that this run has not logged: results made
        in worker processes, or in earlier runs that ``--only-missing-outputs`` skipped."""
        for node in pipeline.nodes:
            for name in node.outputs:
                if self.tracker is not None and is_result(name, node) and name not in self.tracker.children \
                        and catalog.exists(name):
                    self._log(name, node, load_fresh(catalog, name))
                    self._log_ticket(catalog, name)

    @hook_impl
    def after_pipeline_run(self, pipeline, catalog) -> None:
        self._drain()
        self._log_from_catalog(pipeline, catalog)
        if self._tracking():
            self._log_reports(pipeline, catalog)
            self._safely("the run's end", "finish", "FINISHED")
        self._close()

    @hook_impl
    def on_pipeline_error(self, error: Exception, pipeline, catalog) -> None:
        self._drain()
        self._log_from_catalog(pipeline, catalog)
        if self._tracking():
            self._safely("the run's failure", "finish", "FAILED", error)
        self._close()

    def on_interrupt(self) -> None:
        """Ctrl-C or SIGTERM (``cli.interrupted_hooks``): end the parent run as KILLED, with its
        end time, instead of leaving it RUNNING forever."""
        if self._tracking():
            self._safely("the run's interruption", "finish", "KILLED")
        self._close()

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.shutdown(wait=True)
            self.writer = None
        self.tracker = None

    def _log_reports(self, pipeline, catalog) -> None:
        for node in pipeline.nodes:
            for name in node.outputs if "report" in node.tags else ():
                if self.tracker is not None and name not in self.tracker.reports and catalog.exists(name):
                    self._log(name, node, load_fresh(catalog, name))

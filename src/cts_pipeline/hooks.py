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
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl

from .config import ConfigError, typed_sections, validate_run
from .core.checkpoints import defer_removal, keep_deferred, remove_deferred
from .datasets._records import NO_RECORD, RecordedArtifact, check_file
from .errors import first_line, mark_failed_node
from .pipelines.common import ArtifactMismatch
from .tracking import (
    RunTracker,
    TrackingSettings,
    TrackingUnavailable,
    check_reachable,
    source_tags,
)

logger = logging.getLogger(__name__)

RESULT_TABLE_SUFFIX = "_results_table"
IN_PROCESS_RUNNERS = ("SequentialRunner", "ThreadRunner")


def is_result(dataset_name: str, node) -> bool:
    """A branch's (or the dense run's) metrics: what becomes a child run."""
    return "metrics" in node.tags and dataset_name.endswith(".metrics")


def load_fresh(catalog, name: str) -> Any:
    """``name`` as saved by whichever process ran its node: a versioned dataset caches the version
    it last resolved, which is stale when another process saved a newer one."""
    catalog.release(name)
    return catalog.load(name)


class RunValidationHook:
    """Check the whole configuration once, before the first node and before tracking starts; mark
    an error a node raises as the node's (``errors.exit_code``: exit 1, not 2), in the process
    that ran it."""

    def __init__(self) -> None:
        self.running: list[str] = []  # the nodes started and not yet ended, in this process
        self.data_root = "data"  # globals.yml's data_root

    @hook_impl
    def after_context_created(self, context) -> None:
        try:
            self.data_root = str(context.config_loader["globals"].get("data_root", "data"))
        except (KeyError, MissingConfigException):
            self.data_root = "data"

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self.running = []
        validate_run(catalog.load("parameters"), run_params.get("pipeline_names"))
        check_writable(self.data_root)

    @hook_impl
    def before_node_run(self, node) -> None:
        self.running.append(node.name)

    @hook_impl
    def after_node_run(self, node) -> None:
        if node.name in self.running:
            self.running.remove(node.name)

    @hook_impl(tryfirst=True)
    def on_node_error(self, error: Exception, node) -> None:
        mark_failed_node(error, node.name)
        self.after_node_run(node)

    def on_interrupt(self) -> list[str]:
        return list(self.running)


def check_writable(data_root: str) -> None:
    """Refuse, before any compute, a local data folder that cannot take the run's artifacts (a
    file in its place, no permission, a read-only mount): otherwise the first save fails after
    the first training. fsspec URLs (``s3://…``) are left to their store."""
    import tempfile

    if "://" in data_root:
        return
    folder = Path(data_root)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"the data folder {folder.resolve()} (globals.yml data_root) cannot be written: "
                          f"{exc.strerror or exc}; make it writable or point data_root elsewhere") from None


def artifact_path(catalog, name: str) -> str:
    """Where ``name``'s data were read from: the version folder's file for a versioned dataset."""
    dataset = catalog.get(name, fallback_to_runtime_pattern=True)
    for where in ("_get_load_path", "_get_save_path"):
        try:
            return str(getattr(dataset, where)())
        except Exception:
            continue
    return str(getattr(dataset, "_filepath", name))


class ArtifactPathHook:
    """Name the file behind an artifact a node refused (``common.ArtifactMismatch``)."""

    @hook_impl
    def on_node_error(self, error: Exception, catalog) -> None:
        if isinstance(error, ArtifactMismatch):
            error.add_note(f"file: {artifact_path(catalog, error.dataset)}")


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
        self.writer: ThreadPoolExecutor | None = None  # the one thread that writes to MLflow
        self.driver_pid: int | None = None
        self.rerun_hint = "kedro run --only-missing-outputs"
        self.catalog = None

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
        start = partial(RunTracker.start, self.settings, self.project_path,
                        run_name=f"{names} [{env}] {run_params.get('run_id')}",
                        params=typed_sections(catalog.load("parameters")), tags=tags)
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


class FreshnessHook:
    """Make ``--only-missing-outputs`` safe: recompute what it would otherwise trust blindly.

    Kedro's filter reruns a node only when an output is missing. Before it runs, this hook flags
    as stale (so, missing) the outputs of every node
    - whose stored file no longer matches its record (truncated or replaced, ``datasets/_records.py``),
      or has none;
    - one of whose inputs is recomputed in this run (a branch's evaluation after its retraining,
      a report after any branch it summarises);
    - one of whose inputs was written after its outputs (by a partial run, ``--nodes``).
    - whose outputs disagree with what they were computed from, whatever the records say (a file
      replaced together with its record matches it): prepared data built from other raw files; a
      mask whose digest, kept count or target density is not what its branch's metrics record or
      its branch wants (the mask is recomputed, and everything after it); metrics that disagree
      with their ticket.
    Flags travel with the catalog, so this holds under every runner.
    """

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if not run_params.get("only_missing_outputs"):
            return
        producer = {name: node for node in pipeline.nodes for name in node.outputs}
        disagreeing = self._disagreeing(pipeline, catalog, producer)
        rerun: set[Any] = set()
        written: dict[str, float] = {}
        for node in pipeline.nodes:  # in topological order
            stored = {name: catalog.get(name) for name in node.outputs if name in catalog}
            stored = {name: ds for name, ds in stored.items() if isinstance(ds, RecordedArtifact)}
            if not stored:
                continue
            if not all(catalog.exists(name) for name in stored):
                rerun.add(node)  # Kedro reruns it; what depends on it must follow
                continue
            damaged = self._damaged(stored, written) or disagreeing.get(node)
            reason = damaged or self._outdated(node, stored, producer, rerun, written)
            if reason:
                rerun.add(node)
                for dataset in stored.values():
                    dataset.mark_stale()
                # A damaged file is news to the user; following a recomputed input is routine.
                (logger.warning if damaged else logger.info)("%s: recomputed, %s", node.name, reason)

    @staticmethod
    def _disagreeing(pipeline, catalog, producer: dict) -> dict[Any, str]:
        """The nodes whose stored outputs contradict their inputs, each with the reason."""
        from .core.data import raw_files_digest
        from .core.masks import kept_count, mask_digest, payload_to_mask

        found: dict[Any, str] = {}
        prepared = producer.get("train_data")
        if prepared is not None and catalog.exists("train_data"):
            data = typed_sections(catalog.load("parameters"))["data"]
            recorded = load_fresh(catalog, "train_data").get("raw_digest")
            if recorded is not None and recorded != raw_files_digest(data.name, data.root):
                found[prepared] = (f"the raw files of dataset {data.name!r} under {data.root} changed since the data "
                                   "were prepared: everything computed from them is recomputed")
        masks: dict[str, tuple[dict, dict]] = {}  # stored masks that agree with their branch
        for name in (n for n in producer if n.endswith(".mask") and catalog.exists(n)):
            where = artifact_path(catalog, name)
            try:
                payload = load_fresh(catalog, name)
                keep = payload_to_mask(payload)
            except Exception as exc:  # unreadable, or inconsistent in itself: its producer redoes it
                found[producer[name]] = f"{where} cannot be read as a mask ({first_line(exc)})"
                continue
            branch_param = f"params:{name.removesuffix('.mask')}.branch"
            branch = catalog.load(branch_param) if branch_param in catalog else None
            kept, total = payload["kept_weights"], payload["prunable_weights"]
            if branch is not None and branch.family != "ltr" and kept != kept_count(branch.density, total):
                found[producer[name]] = (f"{where} keeps {kept} of {total} weights, but its branch wants "
                                         f"{kept_count(branch.density, total)} (density {branch.density:.6g}): "
                                         "the mask is recomputed with everything after it")
            else:
                masks[name] = (payload, keep)
        for node in pipeline.nodes:
            metrics = next((n for n in node.outputs if n.endswith(".metrics")), None)
            mask = next((n for n in node.inputs if n in masks), None)
            if metrics is None or mask is None or not catalog.exists(metrics):
                continue
            payload, keep = masks[mask]
            recorded = load_fresh(catalog, metrics)
            if recorded.get("mask_digest") not in (None, mask_digest(keep)) \
                    or recorded.get("kept_weights") != payload["kept_weights"]:
                found[producer[mask]] = (f"{artifact_path(catalog, mask)} is not the mask {metrics} was computed "
                                         f"from (it keeps {payload['kept_weights']} weights, the metrics say "
                                         f"{recorded.get('kept_weights')}): the mask is recomputed with everything "
                                         "after it")
                continue
            ticket = metrics.removesuffix(".metrics") + ".ticket"
            manifest = load_fresh(catalog, ticket)["manifest"] if catalog.exists(ticket) else None
            if manifest is not None and any(manifest.get(k) != recorded.get(k)
                                            for k in ("test_accuracy", "kept_weights", "mask_digest")):
                found[node] = f"{artifact_path(catalog, metrics)} disagrees with its ticket: evaluated again"
        return found

    @staticmethod
    def _damaged(stored: dict, written: dict[str, float]) -> str | None:
        """The first stored output that does not match its record; else each one's write time."""
        for name, dataset in stored.items():
            path = dataset.load_path()
            record, problem = check_file(dataset._fs, path)
            if problem:
                return f"{path}: {problem}" if problem == NO_RECORD \
                    else f"{path} does not match what was written: {problem}"
            written[name] = record.get("written_at", 0.0)
        return None

    @staticmethod
    def _outdated(node, stored: dict, producer: dict, rerun: set, written: dict[str, float]) -> str | None:
        recomputed = [name for name in node.inputs if producer.get(name) in rerun]
        if recomputed:
            return f"its input {recomputed[0]} is recomputed in this run"
        oldest_output = min(written[name] for name in stored)
        newer = [name for name in node.inputs if written.get(name, 0.0) > oldest_output]
        if newer:
            return f"its input {newer[0]} was written after its outputs"
        return None


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

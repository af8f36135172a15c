"""MLflow: one parent run per ``kedro run``, one child run per (method, seed, sparsity) result.

Written once for every runner and every fault:

* **Only the driver writes.** The process that started the run (where ``before_pipeline_run``
  ran) is the only MLflow writer, so an sqlite store never sees two writers. Worker processes
  (Kedro's ParallelRunner, Dask workers) write their results to the catalog only.
* **From the catalog, after the save.** A child run is made from a branch's ``metrics`` artifact
  once it is saved, so a tracking fault can never cost a result. The branch's real start and end
  times come from the artifact (``started_at``, ``finished_at``), so MLflow's Duration column is
  the branch's wall-clock under any runner, however late the run is logged.
* **Tracking never stops compute.** An unreachable store is found within seconds at the start,
  and ``mlflow.yml``'s ``on_unavailable`` says whether to run untracked (``warn``) or stop
  (``fail``). A fault during the run turns tracking off with one warning. What was not logged is
  logged later from the catalog: ``kedro run --pipelines=<same> --only-missing-outputs`` computes
  nothing new and logs the whole sweep (every branch found in the catalog) under a new parent.

Uses the MLflow client with explicit run ids (no global "active run"), so logging works from any
thread. The store defaults to ``sqlite:///<project>/mlflow.db`` (``$MLFLOW_TRACKING_URI``
overrides); open it with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config.typed import is_section, plain
from ..errors import TrackingUnavailable, first_line
from ..terminal.console import show_unwrapped
from .provenance import git_state

if TYPE_CHECKING:
    from ..config.sections import TrackingSettings

logger = logging.getLogger(__name__)

# MLflow retries a failing HTTP call for minutes by default (7 retries, exponential back-off);
# a dead server would then stall every branch. A few short retries are enough for a blip.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 # MLflow's own INFO lines ("Creating initial MLflow database tables…") on a fresh
                 # store, printed by its own handler over the live display; its warnings still show.
                 "MLFLOW_LOGGING_LEVEL": "WARNING"}
REACHABLE_TIMEOUT_S = 5

# What a child run records as parameters (the coordinates of a result); everything numeric in
# the result's metrics becomes an MLflow metric.
CHILD_PARAMS = (
    "method", "family", "objective", "model", "dataset", "sparsity", "density", "seed", "rewind_epoch",
    "search_length", "search_epochs", "start", "start_epoch", "checked_method", "namespace", "hardware",
    "search_path", "search_micro_batches", "search_ranks_as_rows", "retrain_path", "search_shared_by", "retrain_shared_by", "dense_path", "dense_shared_by", "test_images",
    "prunable",
)
CHILD_METRICS = (
    "test_accuracy", "test_loss", "achieved_sparsity", "achieved_density", "kept_weights",
    "prunable_weights", "dense_test_accuracy", "parameters", "effective_kept_weights", "inactive_kept_weights",
    "prunable_layers",
)


def parent_run_params(sections: Mapping[str, Any]) -> dict[str, str]:
    """The run's typed sections as the parent run's parameters (flat ``section.key`` strings), with
    every setting whose ``null`` means "derived" or "off" logged as what it resolves to, and from
    what (``cts.epochs: 30 (long: training.epochs = 30)``, ``data.std: (0.3081,) (the dataset's)``,
    ``training.grad_clip_norm: off``), so a reader of the MLflow table never sees a bare ``None``."""
    out = dict(sections)
    cts, training = sections.get("cts"), sections.get("training")
    if cts is not None and training is not None:
        resolved = dict(cts.as_dict())
        if cts.epochs is None:
            resolved["epochs"] = f"{cts.search_epochs(training.epochs)} ({cts.search_length}: training.epochs = {training.epochs})"
        if cts.lr is None:
            resolved["lr"] = f"{training.lr:g} (training.lr)"
        if cts.loss_scale is None:
            resolved["loss_scale"] = f"{cts.effective_loss_scale:g} (the authors' factor for {cts.objective})"
        out["cts"] = resolved
    flat = flatten(out)
    for name, value in flat.items():
        if value == "None":
            flat[name] = _what_none_means(name, sections)
    return flat


def _what_none_means(name: str, sections: Mapping[str, Any]) -> str:
    """What a ``null`` setting stands for in a run, for the parameters people read."""
    import torch

    data = sections.get("data")
    if name in ("data.mean", "data.std") and data is not None and data.own:
        return ("found in the training images" if data.name == "image_folder"
                else "none (catalog inputs reach the model as they are)")
    if name in ("data.mean", "data.std") and data is not None:
        from ..core.data.registry import get_dataset_info

        statistic = getattr(get_dataset_info(data.name), name.split(".")[1])
        return f"{tuple(round(v, 4) for v in statistic)} (the dataset's)"
    meanings = {
        "data.train_subset": "all", "data.test_subset": "all", "training.grad_clip_norm": "off",
        "grid.levels": "none (grid.sparsities)", "runtime.checkpoint_dir": "none (no checkpoints)",
        "runtime.distributed": "off (one process)",
        "runtime.num_threads": f"{torch.get_num_threads()} (torch's default)",
        "model.prunable": "Conv and Linear weights (default)", "model.weights": "none (a fresh initialisation)",
        "data.image_size": "the most common size (image_folder)", "data.train": "none (data.name is not catalog)",
        "data.test": "none (data.name is not catalog)",
    }
    if name == "runtime.data_workers":
        from ..pipelines.common import default_data_workers

        runtime = sections.get("runtime")
        processes = runtime.distributed.nproc if runtime is not None and runtime.distributed else 1
        return f"{default_data_workers(processes)} (the CPUs less one per process)"
    return meanings.get(name, "default")


def rounded(value: Any) -> str:
    """A parameter or tag as a person reads it: floats to 6 significant digits (the metrics keep
    the exact values)."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested parameters (dicts or dataclasses) as ``section.key`` -> string, for MLflow params."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if is_section(value):
            value = plain(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def check_reachable(uri: str) -> None:
    """Raise :class:`TrackingUnavailable` within seconds when ``uri`` cannot take a run."""
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=REACHABLE_TIMEOUT_S):
                pass
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingUnavailable(f"the MLflow server {uri} does not answer ({reason})") from exc
    elif uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))  # sqlite:////abs/path keeps its leading slash
        target = path if path.exists() else path.parent
        if not os.access(target, os.W_OK):
            raise TrackingUnavailable(f"the MLflow store {path} is read-only")
        if path.exists():
            import sqlite3

            try:
                with sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=REACHABLE_TIMEOUT_S) as db:
                    db.execute("PRAGMA quick_check").fetchone()
            except sqlite3.DatabaseError as exc:
                raise TrackingUnavailable(f"the MLflow store {path} is not a usable sqlite database ({exc})") from exc


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000)


class RunTracker:
    """The parent run of one pipeline run and the child runs logged under it."""

    def __init__(self, client, experiment_id: str, parent_run_id: str, started_at: float,
                 sparsities: Sequence[float] = (), parent_params: Mapping[str, str] | None = None,
                 child_tags: Mapping[str, str] | None = None):
        self.client = client
        self.sparsities = list(sparsities)  # the sweep's, ascending: the children's tie-break
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.started_at = started_at
        self.children: dict[str, str] = {}  # dataset name of the metrics -> child run id
        self.reports: set[str] = set()
        self.tickets: set[str] = set()
        self.monitor = None  # MLflow's system-metrics sampler for the parent run
        # What a child's derived (null) setting resolved to: the parent's parameter of that name.
        self.parent_params = dict(parent_params or {})
        self.child_tags = dict(child_tags or {})  # on every child too: the preset, the configuration

    @classmethod
    def start(cls, settings: TrackingSettings, project_path: Path, run_name: str,
              params: Mapping[str, str], tags: Mapping[str, str], started_at: float | None = None,
              sparsities: Sequence[float] = (), child_tags: Mapping[str, str] | None = None) -> RunTracker:
        """The parent run, opened now; ``started_at`` is when the ``kedro run`` began (the run is
        opened in a writer thread while the first nodes already run, and a branch that started
        before it was opened still belongs to it)."""
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        uri = settings.resolved_uri(project_path)
        check_reachable(uri)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        try:
            experiment = client.get_experiment_by_name(settings.experiment_name)
            if experiment is None:
                artifacts = None
                if uri.startswith("sqlite:"):
                    artifacts = (Path(project_path) / "mlartifacts").resolve().as_uri()
                experiment_id = client.create_experiment(settings.experiment_name, artifact_location=artifacts)
            else:
                experiment_id = experiment.experiment_id
            # MLflow's own record of what kind of experiment this is. (MLflow 3.17's UI still opens
            # on its GenAI overview unless the URL says ?workflowType=machine_learning: see ui_link.)
            client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
            started_at = time.time() if started_at is None else started_at
            run = client.create_run(experiment_id, run_name=run_name, tags={**tags, **(child_tags or {})},
                                    start_time=_ms(started_at))
        except Exception as exc:
            raise TrackingUnavailable(f"the MLflow store {uri} refused the run ({first_line(exc)})") from exc
        tracker = cls(client, experiment_id, run.info.run_id, started_at, sparsities, params, child_tags)
        tracker._log_params(run.info.run_id, params)
        if settings.system_metrics:
            tracker._start_monitor(uri)
        logger.info("MLflow: run %s in experiment %r at %s", run.info.run_id, settings.experiment_name, uri)
        show_unwrapped(f"MLflow: {ui_link(uri, experiment_id, run.info.run_id)}")
        return tracker

    def _start_monitor(self, uri: str) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start and stop lines
            self.monitor = SystemMetricsMonitor(self.parent_run_id, tracking_uri=uri)
            self.monitor.start()
        except Exception as exc:  # psutil missing, an unusual platform: the run goes on without them
            logger.warning("MLflow: no system metrics (%s); system_metrics: false in mlflow.yml silences this",
                           first_line(exc))
            self.monitor = None

    def stop_monitor(self) -> None:
        if self.monitor is not None:
            monitor, self.monitor = self.monitor, None
            try:
                monitor.finish()
            except Exception:  # its store failed first; nothing left to stop
                pass

    def log_result(self, dataset_name: str, metrics: Mapping[str, Any]) -> str:
        """One child run for a finished (method, seed, sparsity) result, with its real times."""
        from mlflow.entities import Metric

        if dataset_name in self.children:
            return self.children[dataset_name]
        namespace = metrics.get("namespace") or f"{metrics['method']}.seed{metrics['seed']}"
        # method, sparsity and seed as tags too: the UI's "group by" and compare view take tags.
        tags = {**self.child_tags, "mlflow.parentRunId": self.parent_run_id, "method": str(metrics["method"]),
                "sparsity": f"{float(metrics.get('sparsity') or 0.0):.4f}", "seed": str(metrics.get("seed")),
                "namespace": namespace}
        if metrics.get("collapsed_layers"):
            tags["layer_collapse"] = ",".join(metrics["collapsed_layers"])
        if metrics.get("disconnected"):
            tags["disconnected"] = "true"
        if metrics.get("diverged"):
            tags["diverged"] = str(metrics["diverged"])
        tags.update(shared_time_tags(metrics))
        finished = metrics.get("finished_at")
        if finished is not None and finished < self.started_at:
            tags["computed_in_an_earlier_run"] = "true"  # found in the catalog, not recomputed
        run_id = self.client.create_run(self.experiment_id, run_name=child_run_name(metrics), tags=tags,
                                        start_time=self._child_start_ms(metrics)).info.run_id
        params = {k: rounded(metrics[k]) for k in CHILD_PARAMS if metrics.get(k) is not None}
        family = metrics.get("family", "setting")
        params.update({f"{family}.{k}": rounded(v) if v is not None else self.parent_params.get(f"{family}.{k}", "default")
                       for k, v in (metrics.get("settings") or {}).items()})
        self._log_params(run_id, params)
        values = {k: float(metrics[k]) for k in CHILD_METRICS if metrics.get(k) is not None}
        if metrics.get("method") != "dense":
            values["accuracy_drop"] = float(metrics["dense_test_accuracy"] - metrics["test_accuracy"])
            values["collapsed_layers"] = float(len(metrics.get("collapsed_layers", [])))
        values.update({f"seconds_{k}": float(v) for k, v in metrics.get("seconds", {}).items()})
        stamp = _ms(finished) or _ms(time.time())
        batch = [Metric(k, v, stamp, 0) for k, v in values.items()]
        history = metrics.get("retrain_history") or metrics.get("history") or []
        for record in history:
            for key in ("train_loss", "train_accuracy", "test_accuracy"):
                if key in record:
                    batch.append(Metric(f"epoch/{key}", float(record[key]), stamp, int(record["epoch"])))
        for record in metrics.get("search_history") or []:  # the search's trajectory
            for key, name in (("loss", "search/objective"), ("expected_over_budget", "search/expected_over_budget"),
                              ("multiplier", "search/multiplier")):
                if key in record:
                    batch.append(Metric(name, float(record[key]), stamp, int(record["epoch"])))
        for start in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[start:start + 1000])
        self.client.log_text(run_id, json.dumps(metrics, indent=2, default=str), "metrics.json")
        if metrics.get("layer_kept"):
            self._log_layers(run_id, metrics)
        self.client.set_terminated(run_id, "FINISHED", end_time=stamp)
        self.children[dataset_name] = run_id
        return run_id

    def _log_layers(self, run_id: str, metrics: Mapping[str, Any]) -> None:
        """Per-layer density as one table and one figure (a bar per layer): as metrics, each layer
        would be its own one-bar chart in the run's Model metrics."""
        from ..pipelines.reporting.nodes import ticket_layer_plot

        self.client.log_text(run_id, layer_table(metrics), "layer_density.csv")
        kept, effective = metrics["layer_kept"], metrics.get("layer_effective_kept") or {}
        density = metrics.get("layer_density") or {}
        self.client.log_table(run_id, {"layer": list(kept), "kept": [int(v) for v in kept.values()],
                                       "effective_kept": [effective.get(n) for n in kept],
                                       "density": [density.get(n) for n in kept]}, "layer_density.json")
        self.client.log_figure(run_id, ticket_layer_plot(metrics), "layer_density.png")

    def log_ticket(self, metrics_name: str, ticket_path: str) -> None:
        """The branch's ticket (mask and weights, safetensors) and its manifest on its child run."""
        run_id = self.children.get(metrics_name)
        if run_id is None or metrics_name in self.tickets:
            return
        self.client.log_artifact(run_id, ticket_path, "ticket")
        manifest = Path(ticket_path).with_suffix(".json")
        if manifest.exists():
            self.client.log_artifact(run_id, str(manifest), "ticket")
        self.tickets.add(metrics_name)

    def _child_start_ms(self, metrics: Mapping[str, Any]) -> int | None:
        """The child's start in ms, plus the rank of its sparsity in the sweep, in ms: the tickets of
        one batched search start together, and MLflow lists children by start time, so this puts
        them in sparsity order in the default view (the durations shift by a few ms at most)."""
        start = _ms(self._child_start(metrics))
        sparsity = metrics.get("sparsity")
        if start is None or sparsity is None:
            return start
        rank = next((i for i, s in enumerate(self.sparsities) if abs(s - float(sparsity)) < 1e-9), 0)
        return start + rank

    def _child_start(self, metrics: Mapping[str, Any]) -> float | None:
        """The branch's first stage that ran in this run, or its very first when all of it was
        computed earlier; a mask reused from an earlier run does not stretch the duration."""
        stages = [metrics.get(k) for k in ("started_at", "retrain_started_at")]
        stages = [t for t in stages if t is not None]
        if not stages:
            return None
        if metrics.get("finished_at", self.started_at) < self.started_at:
            return stages[0]
        in_this_run = [t for t in stages if t >= self.started_at]
        return in_this_run[0] if in_this_run else self.started_at

    def log_report(self, name: str, value: Any) -> None:
        """A report table or figure as an artifact of the parent run; a results table also gives
        the parent its summary metrics, so the experiment's chart view is not empty."""
        from mlflow.entities import Metric

        if name in self.reports:
            return
        if hasattr(value, "to_csv"):
            self.client.log_text(self.parent_run_id, value.to_csv(index=False), f"{name}.csv")
            if name.endswith("_results_table") and {"method", "target_sparsity_pct", "test_accuracy"} <= set(value):
                means = value.groupby(["method", "target_sparsity_pct"])["test_accuracy"].mean().round(4)
                stamp = _ms(time.time())
                batch = [Metric(metric_name(f"test_accuracy/{method}/sp{pct:05.2f}".replace(".", "_")), float(acc),
                                stamp, 0) for (method, pct), acc in means.items()]
                # One accuracy-versus-sparsity line per method in the parent's charts: the step is
                # the sparsity in hundredths of a percent (9926 for 99.26 %), MLflow's x-axis.
                batch += [Metric(metric_name(f"accuracy_vs_sparsity/{method}"), float(acc), stamp,
                                 int(round(100 * pct))) for (method, pct), acc in means.items()]
                self.client.log_batch(self.parent_run_id, metrics=batch)
        elif hasattr(value, "savefig"):
            self.client.log_figure(self.parent_run_id, value, f"{name}.png")
        elif isinstance(value, bytes):  # a saved PNG read back from the catalog
            import tempfile

            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / f"{name}.png"
                path.write_bytes(value)
                self.client.log_artifact(self.parent_run_id, str(path))
        self.reports.add(name)

    def finish(self, status: str, error: BaseException | None = None) -> None:
        self.stop_monitor()
        if error is not None:
            self.client.set_tag(self.parent_run_id, "error", f"{type(error).__name__}: {error}"[:5000])
        self.client.set_terminated(self.parent_run_id, status)

    def _log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])


def shared_time_tags(metrics: Mapping[str, Any]) -> dict[str, str]:
    """Where a ticket's times are shares: which batched search or stacked retraining it shared,
    with how many tickets and the group's whole wall-clock. MLflow's Duration of such a child spans
    the group's time; its ``seconds_*`` metrics are its 1/K shares, and this tag says so."""
    seconds = metrics.get("seconds") or {}
    tags = {}
    for stage, count, whole, group, share in (
            ("search", "search_shared_by", "find_mask_group", "search_group_id", "find_mask"),
            ("retraining", "retrain_shared_by", "retrain_group", "retrain_group_id", "retrain")):
        k = int(metrics.get(count) or 1)
        if k > 1:
            # What matters first, since the run page cuts a tag at about 30 characters.
            tags[f"shared_{stage}"] = (f"1/{k} of {seconds.get(whole, 0.0):.1f} s: seconds_{share} = "
                                       f"{seconds.get(share, 0.0):.1f} s is this ticket's share of the group "
                                       f"{metrics.get(group) or '?'}")
    return tags


def layer_table(metrics: Mapping[str, Any]) -> str:
    """Per-layer kept, effective and total counts and density, as CSV (the ticket's layer report)."""
    density = metrics.get("layer_density", {})
    effective = metrics.get("layer_effective_kept") or {}
    rows = ["layer,kept,effective_kept,density"]
    for name, kept in metrics["layer_kept"].items():
        rows.append(f"{name},{kept},{effective.get(name, '')},{density.get(name, '')}")
    return "\n".join(rows) + "\n"


def metric_name(name: str) -> str:
    """``name`` with what MLflow refuses in metric names (``+`` in ``cts_kl_lr1e+06``) as ``_``."""
    return re.sub(r"[^\w\-. :/]", "_", name)


def ui_link(uri: str, experiment_id: str, run_id: str) -> str:
    """Where to see the run: the page of the runs table (the model-training view, not the GenAI
    overview that MLflow 3 opens by default)."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{page}"


def source_tags(project_path: Path, command: str) -> dict[str, str]:
    """MLflow's source tags: the command and, in a git checkout, the commit (and whether the tree
    had uncommitted changes)."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": command}
    state = git_state(project_path)
    if state is not None:
        tags["mlflow.source.git.commit"] = state[0]
        tags["git.dirty"] = str(state[1]).lower()
    return tags


def child_run_name(metrics: Mapping[str, Any]) -> str:
    """What tells children apart first, since the runs table cuts names at about 20 characters:
    ``99.26% cts_kl s0``, ``05.00% snip s1``, ``dense s0``. The sparsity is zero-padded, so sorting
    the runs table by name lists a sweep's children in sparsity order."""
    if metrics.get("method") == "dense" or metrics.get("sparsity") is None:
        return f"{metrics['method']} s{metrics['seed']}"
    return f"{100 * float(metrics['sparsity']):05.2f}% {metrics['method']} s{metrics['seed']}"

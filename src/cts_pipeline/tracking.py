"""MLflow: one parent run per ``kedro run``, one child run per (method, seed, sparsity) result.

Uses the MLflow client with explicit run ids (no global "active run"), so logging from hooks works
under any runner thread. The tracking store defaults to ``sqlite:///<project>/mlflow.db``
(``$MLFLOW_TRACKING_URI`` overrides); open it with
``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# What a child run records as parameters (the coordinates of a result); everything numeric in
# the result's metrics becomes an MLflow metric.
CHILD_PARAMS = (
    "method", "family", "objective", "model", "dataset", "sparsity", "density", "seed", "rewind_epoch",
    "search_length", "search_epochs", "start", "start_epoch", "checked_method", "namespace", "hardware",
)
CHILD_METRICS = (
    "test_accuracy", "test_loss", "achieved_sparsity", "achieved_density", "kept_weights",
    "prunable_weights", "dense_test_accuracy", "parameters", "effective_kept_weights", "inactive_kept_weights",
)


@dataclass(frozen=True)
class TrackingSettings:
    """``mlflow`` configuration (``conf/base/mlflow.yml``)."""

    enabled: bool = True
    experiment_name: str = "cts-pipeline"
    tracking_uri: str | None = None

    def resolved_uri(self, project_path: Path) -> str:
        return (self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{(Path(project_path) / 'mlflow.db').as_posix()}")


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested parameters (dicts or dataclasses) as ``section.key`` -> string, for MLflow params."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if hasattr(value, "as_dict"):
            value = value.as_dict()
        elif hasattr(value, "__dataclass_fields__"):
            from dataclasses import asdict
            value = asdict(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


class RunTracker:
    """The parent run of one pipeline run and the child runs logged under it."""

    def __init__(self, client, experiment_id: str, parent_run_id: str):
        self.client = client
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.children: dict[str, str] = {}

    @classmethod
    def start(cls, settings: TrackingSettings, project_path: Path, run_name: str,
              params: Mapping[str, Any], tags: Mapping[str, str]) -> RunTracker:
        from mlflow.tracking import MlflowClient

        uri = settings.resolved_uri(project_path)
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(settings.experiment_name)
        if experiment is None:
            artifacts = None
            if uri.startswith("sqlite:"):
                artifacts = (Path(project_path) / "mlartifacts").resolve().as_uri()
            experiment_id = client.create_experiment(settings.experiment_name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
        tracker = cls(client, experiment_id, run.info.run_id)
        tracker._log_params(run.info.run_id, flatten(params))
        logger.info("MLflow: run %s in experiment %r at %s", run.info.run_id, settings.experiment_name, uri)
        return tracker

    def log_result(self, metrics: Mapping[str, Any]) -> str:
        """One child run for a finished (method, seed, sparsity) result."""
        from mlflow.entities import Metric

        name = metrics.get("namespace") or f"{metrics['method']}.seed{metrics['seed']}"
        tags = {"mlflow.parentRunId": self.parent_run_id, "method": str(metrics["method"])}
        if metrics.get("collapsed_layers"):
            tags["layer_collapse"] = ",".join(metrics["collapsed_layers"])
        if metrics.get("disconnected"):
            tags["disconnected"] = "true"
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        params = {k: str(metrics[k]) for k in CHILD_PARAMS if metrics.get(k) is not None}
        self._log_params(run_id, params)
        values = {k: float(metrics[k]) for k in CHILD_METRICS if metrics.get(k) is not None}
        if metrics.get("method") != "dense":
            values["accuracy_drop"] = float(metrics["dense_test_accuracy"] - metrics["test_accuracy"])
            values["collapsed_layers"] = float(len(metrics.get("collapsed_layers", [])))
        values.update({f"seconds_{k}": float(v) for k, v in metrics.get("seconds", {}).items()})
        values.update({f"layer_density/{k}": float(v) for k, v in metrics.get("layer_density", {}).items()})
        batch = [Metric(k, v, _now_ms(), 0) for k, v in values.items()]
        history = metrics.get("retrain_history") or metrics.get("history") or []
        for record in history:
            for key in ("train_loss", "train_accuracy", "test_accuracy"):
                if key in record:
                    batch.append(Metric(f"epoch/{key}", float(record[key]), _now_ms(), int(record["epoch"])))
        for start in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[start:start + 1000])
        self.client.log_text(run_id, json.dumps(metrics, indent=2, default=str), "metrics.json")
        self.client.set_terminated(run_id, "FINISHED")
        self.children[name] = run_id
        return run_id

    def log_report(self, outputs: Mapping[str, Any]) -> None:
        """Report tables and figures as artifacts of the parent run."""
        for name, value in outputs.items():
            if hasattr(value, "to_csv"):
                self.client.log_text(self.parent_run_id, value.to_csv(index=False), f"{name}.csv")
            elif hasattr(value, "savefig"):
                self.client.log_figure(self.parent_run_id, value, f"{name}.png")

    def finish(self, status: str, error: BaseException | None = None) -> None:
        if error is not None:
            self.client.set_tag(self.parent_run_id, "error", f"{type(error).__name__}: {error}"[:5000])
        self.client.set_terminated(self.parent_run_id, status)

    def _log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)

"""Tracking never costs compute: an unreachable, refusing or dying MLflow store leaves every result
in the catalog, and what was not logged is logged later from it."""

from __future__ import annotations

import os
import time

import pytest
from mlflow.tracking import MlflowClient

from cts_pipeline.config.sections import TrackingSettings
from cts_pipeline.config.typed import read_section
from cts_pipeline.errors import TrackingUnavailable
from cts_pipeline.framework.tracking import RunTracker, check_reachable

from .conftest import latest, run_pipeline

DEAD_SERVER = "http://127.0.0.1:9"  # the discard port: nothing listens there


def test_an_unreachable_server_is_found_within_seconds():
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=r"the MLflow server http://127.0.0.1:9 does not answer"):
        check_reachable(DEAD_SERVER)
    assert time.monotonic() - started < 10


def test_an_unreachable_server_runs_untracked_with_one_warning(project, monkeypatch, logged):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD_SERVER)
    run_pipeline(project)
    assert latest(project, "data/08_reporting/smoke/report-*/cts_results.csv").exists()
    warnings = [r.getMessage() for r in logged if r.name.startswith("cts_pipeline.framework.hooks")]
    assert len(warnings) == 1 and "running without tracking" in warnings[0] and "enabled: false" in warnings[0]


def test_on_unavailable_fail_stops_before_any_compute(project, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD_SERVER)
    (project / "conf" / "smoke" / "mlflow.yml").write_text("on_unavailable: fail\n")
    with pytest.raises(TrackingUnavailable, match=r"^MLflow: the MLflow server .* does not answer .*enabled: false"):
        run_pipeline(project)
    assert not list(project.glob("data/06_models/**/*.pt")), "nothing may be computed"


def test_mlflow_dying_mid_run_costs_nothing_and_is_logged_later(project, monkeypatch, logged):
    calls = []

    def dies(self, name, metrics):
        calls.append(name)
        raise ConnectionError("the tracking server went away")

    with monkeypatch.context() as patch:
        patch.setattr(RunTracker, "log_result", dies)
        run_pipeline(project)
    assert calls == ["dense.seed0.metrics"], "tracking is switched off after the first fault"
    assert latest(project, "data/08_reporting/smoke/report-*/cts_results.csv").exists()
    warning = next(r.getMessage() for r in logged if r.name.startswith("cts_pipeline.framework.hooks"))
    assert "tracking is off for the rest of this run" in warning
    assert "kedro run --pipelines=cts --env=smoke --only-missing-outputs" in warning

    # The documented "log again" step: nothing is recomputed, the whole sweep is logged.
    written = sorted(project.glob("data/**/*.pt"))
    run_pipeline(project, only_missing_outputs=True)
    assert sorted(project.glob("data/**/*.pt")) == written
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("cts-pipeline").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.info.run_name for r in children) == ["50.00% cts_kl s0", "90.00% cts_kl s0", "dense s0"]
    assert {r.data.tags["computed_in_an_earlier_run"] for r in children} == {"true"}


def test_a_read_only_store_is_refused_at_the_start(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "mlflow.db").write_bytes(b"")
    (store / "mlflow.db").chmod(0o444)
    store.chmod(0o555)
    try:
        if os.geteuid() == 0:
            pytest.skip("root ignores file permissions")
        with pytest.raises(TrackingUnavailable, match=r"mlflow.db is read-only"):
            check_reachable(f"sqlite:///{store / 'mlflow.db'}")
    finally:
        store.chmod(0o755)


def test_a_corrupt_store_is_named(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(TrackingUnavailable, match=r"mlflow.db is not a usable sqlite database"):
        check_reachable(f"sqlite:///{db}")


def test_mlflow_settings_refuse_unknown_keys():
    with pytest.raises(ValueError, match=r"mlflow.yml: unknown key 'enable' \(did you mean 'enabled'\?\)"):
        read_section(TrackingSettings, {"enable": False})
    with pytest.raises(ValueError, match=r"mlflow.yml: on_unavailable must be warn or fail, got 'ignore'"):
        read_section(TrackingSettings, {"on_unavailable": "ignore"})


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (skipped where it does not start within 60 s)."""
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--default-artifact-root", str(tmp_path / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.skip("mlflow server did not start")
    yield uri, server
    if server.poll() is None:
        os.killpg(server.pid, 9)


def test_the_tracking_server_dying_mid_run_costs_nothing(project, monkeypatch, mlflow_server, logged):
    """Kill a real server once the dense training is done: the run finishes, every result is saved."""
    uri, server = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    log_result = RunTracker.log_result

    def kill_first(self, name, metrics):
        if server.poll() is None:
            os.killpg(server.pid, 9)
            server.wait()
        return log_result(self, name, metrics)

    started = time.monotonic()
    with monkeypatch.context() as patch:
        patch.setattr(RunTracker, "log_result", kill_first)
        run_pipeline(project)
    assert latest(project, "data/08_reporting/smoke/report-*/cts_results.csv").exists()
    assert latest(project, "data/07_model_output/smoke/cts_kl-*/seed0/sp90_00/ticket.safetensors").exists()
    warnings = [r.getMessage() for r in logged if r.name.startswith("cts_pipeline.framework.hooks")]
    assert len(warnings) == 1 and "tracking is off for the rest of this run" in warnings[0]
    assert time.monotonic() - started < 120, "a dead server must not stall the run for minutes"

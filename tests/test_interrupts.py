"""Ctrl-C and SIGTERM sent to a real ``kedro run``: a clean stop in one line, the MLflow run ended
as KILLED, and the checkpoints kept so that the same command resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from mlflow.tracking import MlflowClient

from .conftest import latest, run_pipeline

# The dense training alone, long enough (seconds) to be stopped halfway.
COMMAND = ["-m", "kedro", "run", "--pipelines=cts", "--env=smoke", "--params=training.epochs=15",
           "--to-outputs=dense.seed0.metrics"]
CHECKPOINTS = "data/06_models/checkpoints/dense.seed0"


def start(project):
    return subprocess.Popen([sys.executable, *COMMAND],
                            cwd=project, env={**os.environ, "CTS_FAST_EXIT": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop_once_checkpointed(process, project, signum) -> tuple[str, str]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(project.glob(f"{CHECKPOINTS}/*.pt")):
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signum)
    return process.communicate(timeout=120)


def test_a_stopped_run_ends_cleanly_and_the_same_command_resumes(project):
    signum = signal.SIGINT
    process = start(project)
    out, err = stop_once_checkpointed(process, project, signum)
    assert process.returncode == 128 + signum, out + err
    stopped = [line for line in err.splitlines() if line.startswith("Stopped by")]
    assert stopped == [f"Stopped by {signal.Signals(signum).name} during dense.seed0.train_dense: finished "
                       "outputs and the per-epoch checkpoints are kept; run the same command to resume (add "
                       "--only-missing-outputs to skip finished branches)"], err
    assert "Aborted!" not in out + err and "Traceback" not in out + err
    assert any(project.glob(f"{CHECKPOINTS}/*.pt")), "the checkpoints stay for the rerun"
    client = MlflowClient()
    [parent] = client.search_runs([client.get_experiment_by_name("cts-pipeline").experiment_id])
    assert parent.info.status == "KILLED" and parent.info.end_time is not None

    # The same command picks up where the run stopped (run in this process: a second interpreter
    # start would only cost time).
    run_pipeline(project, params={"training": {"epochs": 15}}, to_outputs=["dense.seed0.metrics"])
    dense = json.loads(latest(project, "data/08_reporting/smoke/dense-*/seed0/metrics.json").read_text())
    assert dense["resumed_after_epoch"] >= 1


def test_sigterm_stops_the_run_as_ctrl_c_does(monkeypatch):
    """A scheduler's or a container's stop takes the same path as Ctrl-C (the test above), and
    exits with 128 + SIGTERM."""
    from click.testing import CliRunner

    from cts_pipeline import cli

    def terminated(**_kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler interrupts this
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(cli.kedro_run, "callback", terminated)
    monkeypatch.setattr(cli, "interrupted_hooks", lambda: ["dense.seed0.train_dense"])
    before = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(cli.run, [])
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    assert "Stopped by SIGTERM during dense.seed0.train_dense" in result.output
    assert signal.getsignal(signal.SIGTERM) is before, "the run's handler lasts only as long as the run"

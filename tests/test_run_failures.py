"""Bad input fails at run start, before any training, with one message naming the parameter."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cts_pipeline.core.train.loop import NonFiniteLossError

from .conftest import run_pipeline


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"grid": {"sparsities": [0.5, 1.5]}}, "grid.sparsities"),
        ({"grid": {"sparsities": [99.26]}}, "0.9926"),
        ({"data": {"name": "svhn"}}, "data.name"),
        ({"model": {"name": "alexnet"}}, "model.name"),
        ({"model": {"name": "vgg16"}}, "vgg16"),
        ({"cts": {"objective": "hinge"}}, "cts.objective"),
        ({"training": {"rewind_epoch": -1}}, "training.rewind_epoch"),
        ({"training": {"rewind_epoch": 3}}, "training.rewind_epoch"),
        ({"data": {"name": "mnist", "root": "nowhere"}}, "data.download"),
        ({"runtime": {"device": "tpu"}}, "runtime.device"),
    ],
)
def test_bad_configuration_fails_before_training(project, params, named):
    with pytest.raises(Exception) as failure:
        run_pipeline(project, params=params)
    assert named in str(failure.value)
    assert not (project / "data" / "06_models").exists(), "nothing may be trained or written"
    client = MlflowClient()
    experiment = client.get_experiment_by_name("cts-pipeline")
    assert experiment is None or not client.search_runs([experiment.experiment_id]), \
        "a configuration error must not leave an MLflow run behind"


def test_missing_mnist_names_the_files(project):
    with pytest.raises(Exception) as failure:
        run_pipeline(project, params={"data": {"name": "mnist", "root": "data/01_raw"}})
    message = str(failure.value)
    assert "train-images-idx3-ubyte" in message and str(project / "data" / "01_raw") in message


def test_non_finite_loss_stops_the_run_naming_stage_and_step(project):
    with pytest.raises(NonFiniteLossError, match=r"dense.seed0 dense: the loss became .* at epoch 1/3, step \d+"):
        run_pipeline(project, params={"training": {"lr": 1.0e12}})
    assert not list((project / "data").rglob("theta_rewind.pt/*/theta_rewind.pt"))
    client = MlflowClient()
    parent = client.search_runs([client.get_experiment_by_name("cts-pipeline").experiment_id])[0]
    assert parent.info.status == "FAILED" and "NonFiniteLossError" in parent.data.tags["error"]


def test_cli_reports_a_bad_sparsity_in_one_line(project):
    done = subprocess.run(
        [sys.executable, "-m", "kedro", "run", "--pipelines=cts", "--env=smoke",
         "--params", "grid.sparsities=[1.2]"],
        cwd=project, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "grid.sparsities: 1.2 is outside (0, 1)" in done.stdout + done.stderr
    assert "as logging configuration" not in done.stdout + done.stderr, "no notice opens the command"


def test_a_failing_parallel_runner_run_leaves_no_process_behind(project):
    """The fast exit (``cli._skip_teardown``) used to skip multiprocessing's exit handler, so a
    failing ParallelRunner run left its manager process orphaned for good (about 400 MB)."""
    marker = f"CTS_RUN_MARK={uuid.uuid4().hex}"
    env = {**os.environ, "CTS_RUN_MARK": marker.split("=", 1)[1]}
    env.pop("CTS_FAST_EXIT", None)  # the fast exit is what this checks

    def left_behind() -> list[str]:
        found = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if marker.encode() in environ.read_bytes():
                    found.append(environ.parent.name)
            except OSError:  # gone meanwhile, or not ours to read
                pass
        return found

    try:
        done = subprocess.run(
            [sys.executable, "-m", "kedro", "run", "--pipelines=cts", "--env=smoke", "--runner=ParallelRunner",
             "--params", "training.lr=1000000000000.0"],
            cwd=project, capture_output=True, text=True, timeout=150, env=env,
        )
    except subprocess.TimeoutExpired:  # an orphan holding the run's output pipes open keeps this waiting
        done = None
    assert done is not None or left_behind(), "the run did not end"
    if done is not None:
        assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
        assert "NonFiniteLossError" in done.stdout + done.stderr
    deadline = time.monotonic() + 10  # a child that is ending may take a moment to be reaped
    while left_behind() and time.monotonic() < deadline:
        time.sleep(0.5)
    remaining = left_behind()
    for pid in remaining:  # never leave them running past the test
        os.kill(int(pid), 9)
    assert not remaining, f"processes of the failed run still alive: {remaining}"

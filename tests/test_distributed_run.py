"""`runtime.distributed: {nproc: 2}`: the smoke sweep's dense training, search and retraining each
run over two gloo processes, and the run's artifacts, reports and checkpoint clean-up are those of
a run in one process. (That two processes compute what one does is tested in
tests/core/test_distributed.py, on a model without BatchNorm.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

from .conftest import latest, run_pipeline
from .equivalence import assert_equivalent_masks


def test_the_sweep_runs_over_two_processes(project, logged, tmp_path):
    run_pipeline(project, params={"runtime": {"distributed": {"nproc": 2}, "num_threads": 2}})
    lines = [r.getMessage() for r in logged if r.name == "cts_pipeline.progress"]
    assert any(line.startswith("dense.seed0: ") for line in lines), "rank 0's lines reach the driver's log"
    assert any(r.name.startswith("cts_pipeline.core") and "epoch" in r.getMessage() for r in logged)
    table = pd.read_csv(latest(project, "data/08_reporting/smoke/report-*/cts_results.csv"))
    assert list(table["target_sparsity_pct"]) == [0.0, 50.0, 90.0]
    assert (table["test_accuracy"] > 0).all()
    mask = torch.load(latest(project, "data/07_model_output/smoke/cts_kl-*/seed0/sp90_00/mask.pt"), weights_only=True)
    assert mask["kept_weights"] == 369
    dense = json.loads(latest(project, "data/08_reporting/smoke/dense-*/seed0/metrics.json").read_text())
    assert [r["epoch"] for r in dense["history"]] == [1, 2, 3]
    assert not list((project / "data" / "06_models" / "checkpoints").glob("**/*.pt")), \
        "the ranks' checkpoints go once the driver has saved the outputs"

    # The same sweep under torchrun (cts_pipeline.torchrun): rank 0 runs Kedro and leads, rank 1
    # follows into every training; the same two ranks compute the same masks and weights.
    launched = tmp_path / "torchrun"
    shutil.copytree(project, launched, ignore=shutil.ignore_patterns("data", "mlflow.db", "mlruns", "*.log"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{(launched / 'mlflow.db').as_posix()}"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "kedro", "run", "--pipelines=cts", "--env=smoke", "--params=runtime.num_threads=1"],
                          cwd=launched, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for artifact in ("07_model_output/smoke/cts_kl-*/seed0/sp90_00/mask.pt", "07_model_output/smoke/cts_kl-*/seed0/sp50_00/mask.pt"):
        ours = torch.load(latest(project, f"data/{artifact}"), weights_only=True)["masks"]
        theirs = torch.load(latest(launched, f"data/{artifact}"), weights_only=True)["masks"]
        # Other processes with other thread counts (2 against 1) sum in other orders; under AVX2
        # kernels that moved near-threshold weights of the 50 % mask (bit equality holds only
        # within one process): the same kept count, and the masks overlapping.
        assert_equivalent_masks(ours, theirs, what=artifact)
    under_torchrun = json.loads(latest(launched, "data/08_reporting/smoke/dense-*/seed0/metrics.json").read_text())
    for one, two in zip(dense["history"], under_torchrun["history"], strict=True):
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
        assert two["test_accuracy"] == pytest.approx(one["test_accuracy"])
    assert not list((launched / "data" / "06_models" / "checkpoints").glob("**/*.pt"))
    assert len(list(launched.glob("data/08_reporting/smoke/report-*/cts_results.csv/*/"))) == 1, "one writer"


def test_another_runner_under_torchrun_is_refused_in_one_line(project):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    done = subprocess.run([sys.executable, "-m", "kedro", "run", "--env=smoke", "--runner=ThreadRunner"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Error: --runner=ThreadRunner under torchrun" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("value", [{"nproc": 0}, {"nprocs": 2}, 2])
def test_a_bad_distributed_setting_is_named(value):
    from cts_pipeline.config.sections import RuntimeConfig

    with pytest.raises(ValueError, match="runtime.distributed"):
        RuntimeConfig(distributed=value)


def test_a_node_failing_inside_its_collectives_leaves_the_followers_to_torchrun(monkeypatch):
    """Rank 0's error inside a led node is marked; release then does not broadcast the end (the
    followers are inside that node's collectives, and torchrun stops them). Any other end does."""
    from cts_pipeline.errors import causes
    from cts_pipeline.pipelines import torchrun

    announced = []
    monkeypatch.setattr(torchrun, "_join", lambda device: None)
    monkeypatch.setattr("cts_pipeline.core.device.distributed.broadcast_object", announced.append)
    inside = RuntimeError("NCCL timeout")
    torchrun.raised_in_collectives(inside)
    try:
        raise ValueError("the node failed") from inside
    except ValueError as wrapped:
        torchrun.release(torch.device("cpu"), causes(wrapped))
    assert announced == []
    torchrun.release(torch.device("cpu"), causes(RuntimeError("a report node failed")))
    torchrun.release(torch.device("cpu"))
    assert announced == [None, None]

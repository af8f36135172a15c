"""`runtime.distributed: {nproc: 2}`: the smoke sweep's dense training, search and retraining each
run over two gloo processes, and the run's artifacts, reports and checkpoint clean-up are those of
a run in one process. (That two processes compute what one does is tested in
tests/core/test_distributed.py, on a model without BatchNorm.)"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from .conftest import latest, run_pipeline


def test_the_sweep_runs_over_two_processes(project, logged):
    run_pipeline(project, params={"runtime": {"distributed": {"nproc": 2}}})
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


@pytest.mark.parametrize("value", [{"nproc": 0}, {"nprocs": 2}, 2])
def test_a_bad_distributed_setting_is_named(value):
    from cts_pipeline.config import RuntimeConfig

    with pytest.raises(ValueError, match="runtime.distributed"):
        RuntimeConfig(distributed=value)

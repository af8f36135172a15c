"""The main job end to end: ``kedro run --pipelines=cts`` on the tiny ``smoke`` preset."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from cts_pipeline.core.nets.masks import payload_to_mask

from .conftest import latest, run_pipeline

SPARSITIES = {"sp50_00": 0.5, "sp90_00": 0.9}
SMOKE_PRUNABLE = 3688  # convnet of width 8 on 8x8 digits


def load_mask(project, branch: str) -> dict:
    path = latest(project, f"data/07_model_output/smoke/cts_kl-*/seed0/{branch}/mask.pt")
    return torch.load(path, weights_only=True)


def test_cts_pipeline_end_to_end(project, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # the smoke run lasts seconds
    run_pipeline(project)

    table = pd.read_csv(latest(project, "data/08_reporting/smoke/report-*/cts_results.csv"))
    assert list(table["method"]) == ["dense", "cts_kl", "cts_kl"]
    assert list(table["target_sparsity_pct"]) == [0.0, 50.0, 90.0]
    dense_accuracy = table.loc[0, "test_accuracy"]
    assert dense_accuracy > 50, "the smoke preset should learn digits well above chance"
    assert (table["dense_test_accuracy"] == dense_accuracy).all()
    assert (table["total_s"] > 0).all() and table["hardware"].str.contains("CPU").all()
    assert (latest(project, "data/08_reporting/smoke/report-*/cts_accuracy_vs_sparsity.png")).stat().st_size > 1000
    # Every row names the run that wrote it (the session id, also the artifacts' version folder),
    # the preset and the commit, so two runs' copied CSVs are told apart (issue 37, item 10).
    version = latest(project, "data/08_reporting/smoke/report-*/cts_results.csv").parent.name
    assert set(table["run"]) == {version} and set(table["preset"]) == {"smoke"}
    assert set(table["commit"]) == {"not a git checkout"}, "the test project is a copy outside git"

    for branch, sparsity in SPARSITIES.items():
        payload = load_mask(project, branch)
        mask = payload_to_mask(payload)
        kept = sum(int(m.sum()) for m in mask.values())
        assert kept == round((1 - sparsity) * SMOKE_PRUNABLE) == payload["kept_weights"]
        assert sum(m.numel() for m in mask.values()) == SMOKE_PRUNABLE
        row = table[table["target_sparsity_pct"] == 100 * sparsity].iloc[0]
        assert row["kept_weights"] == kept
        # The retrained weights honour the mask to the weight.
        weights = torch.load(latest(project, f"data/06_models/smoke/cts_kl-*/seed0/{branch}/final_weights.pt"),
                             weights_only=True)
        for name, keep in mask.items():
            assert not weights[name][~keep].any(), f"{name}: pruned weights are not zero"

    client = MlflowClient()
    experiment = client.get_experiment_by_name("cts-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["mlflow.source.name"] == "kedro run --pipelines=cts --env=smoke"
    assert parents[0].data.tags["kedro.session_id"] == version, "a CSV's run column finds its MLflow run"
    # The pipeline, then the time: what tells runs apart in MLflow's narrow name column.
    assert re.fullmatch(r"cts \d\d-\d\d \d\d:\d\d:\d\d smoke", parents[0].info.run_name)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert parents[0].data.params["grid.sparsities"] == "(0.5, 0.9)"
    # Settings whose null means "derived" are logged as what they resolve to.
    assert parents[0].data.params["cts.lr"] == "0.05 (training.lr)"
    assert parents[0].data.params["cts.epochs"].endswith("(long: training.epochs = 3)")
    assert parents[0].data.params["cts.loss_scale"] == "100 (the authors' factor for kl)"
    # No bare None anywhere a person reads parameters: what each null stands for, on the parent and
    # the children; and floats rounded where they are shown (the metrics keep them exact).
    for run in runs:
        assert "None" not in run.data.params.values(), {k: v for k, v in run.data.params.items() if v == "None"}
    assert parents[0].data.params["training.grad_clip_norm"] == "off"
    assert parents[0].data.params["data.std"].endswith("(the dataset's)")
    assert parents[0].data.params["runtime.num_threads"].endswith("(torch's default)")
    searched = [c for c in children if c.data.tags["method"] == "cts_kl"]
    assert {c.data.params["cts.lr"] for c in searched} == {"0.05 (training.lr)"}
    assert all(c.data.params["cts.epochs"].endswith("(long: training.epochs = 3)") for c in searched)
    assert all(len(c.data.params["sparsity"]) <= 8 for c in children if "sparsity" in c.data.params)
    # Every run says which preset and which configuration made it, so presets never mix.
    assert {r.data.tags["preset"] for r in runs} == {"smoke"}
    assert len({r.data.tags["config"] for r in runs}) == 1
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    # One accuracy-versus-sparsity line per method on the parent (step: sparsity in 0.01 %).
    line = client.get_metric_history(parents[0].info.run_id, "accuracy_vs_sparsity/cts_kl")
    assert sorted(m.step for m in line) == [5000, 9000]
    assert sorted(c.info.run_name for c in children) == ["50.00% cts_kl s0", "90.00% cts_kl s0", "dense s0"]
    # MLflow lists children by start time, newest first: the two tickets of one batched search
    # start together, and the sparsity's rank breaks the tie, so they list in sparsity order.
    by_start = sorted((c for c in children if c.data.tags["method"] == "cts_kl"), key=lambda c: -c.info.start_time)
    assert [c.info.run_name for c in by_start] == ["90.00% cts_kl s0", "50.00% cts_kl s0"]
    assert by_start[0].info.start_time - by_start[1].info.start_time == 1
    assert sorted(c.data.tags["namespace"] for c in children) == [
        "cts_kl.seed0.sp50_00", "cts_kl.seed0.sp90_00", "dense.seed0"]
    assert sorted((c.data.tags["method"], c.data.tags["sparsity"], c.data.tags["seed"]) for c in children) == [
        ("cts_kl", "0.5000", "0"), ("cts_kl", "0.9000", "0"), ("dense", "0.0000", "0")]
    for child in children:
        params, metrics = child.data.params, child.data.metrics
        for key in ("method", "model", "dataset", "seed", "density", "rewind_epoch"):
            assert key in params, f"{child.info.run_name} lacks param {key}"
        for key in ("test_accuracy", "achieved_sparsity", "kept_weights"):
            assert key in metrics, f"{child.info.run_name} lacks metric {key}"
        if params["method"] == "cts_kl":
            assert params["objective"] == "kl" and params["search_length"] == "long"
            # The smoke run searches and retrains its two sparsities together: the paths that
            # ran, and each ticket's time as a share beside the group's whole.
            assert params["search_path"] == "stacked" and params["retrain_path"] == "stacked x2"
            assert params["search_shared_by"] == "2" and params["retrain_shared_by"] == "2"
            assert metrics["seconds_find_mask_group"] == pytest.approx(2 * metrics["seconds_find_mask"])
            assert metrics["seconds_find_mask"] > 0 and metrics["seconds_retrain"] > 0
            # Its Duration spans the group: the tag names the group and says the seconds are shares.
            assert child.data.tags["shared_search"].startswith("1/2 of ")
            assert child.data.tags["shared_retraining"].endswith("share of the group cts_kl.seed0.sp50_00")
            trajectory = client.get_metric_history(child.info.run_id, "search/expected_over_budget")
            assert [m.step for m in trajectory] == list(range(1, int(params["search_epochs"]) + 1))
            assert params["cts.objective"] == "kl", "the branch's CTS settings are its parameters"
            files = {a.path for a in client.list_artifacts(child.info.run_id, "ticket")}
            assert files == {"ticket/ticket.safetensors", "ticket/ticket.json"}
            layers = client.download_artifacts(child.info.run_id, "layer_density.csv")
            table = pd.read_csv(layers)
            assert list(table.columns) == ["layer", "kept", "effective_kept", "density"]
            assert table["kept"].sum() == metrics["kept_weights"]
            # The per-layer density as one figure and one table, not one one-bar chart per layer.
            layer_files = {a.path for a in client.list_artifacts(child.info.run_id)}
            assert {"layer_density.png", "layer_density.json"} <= layer_files
            assert not any(k.startswith("layer_density/") for k in metrics)
        # The branch's own wall-clock (it spans at least its training), not the moment it was logged.
        assert child.info.end_time - child.info.start_time >= 1000 * metrics.get(
            "seconds_retrain", metrics.get("seconds_train", 0)) - 50
    assert any(k.startswith("system/cpu_utilization") for k in parents[0].data.metrics), "system metrics"
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"cts_results_table.csv", "cts_accuracy_plot.png"} <= artifacts

    # The two sparsities were searched together, as one batched search sharing its cost.
    log = json.loads(latest(project, "data/08_reporting/smoke/cts_kl-*/seed0/sp90_00/mask_log.json").read_text())
    assert log["search_group"] == ["cts_kl.seed0.sp50_00", "cts_kl.seed0.sp90_00"]
    assert log["seconds"] == pytest.approx(log["search_group_seconds"] / 2)
    assert log["cts_effective_loss_scale"] == 100.0

    # Same seed, same configuration on CPU: the same mask, to the bit.
    first = {b: load_mask(project, b)["masks"] for b in SPARSITIES}
    run_pipeline(project)
    again = load_mask(project, "sp90_00")["masks"]
    assert all(torch.equal(first["sp90_00"][n], again[n]) for n in again)

"""`runtime.batch_sparsities: auto`: a probe of one step decides whether a seed's searches (and its
tickets' retrainings) run batched or one at a time, and either way the branches get what the
matching fixed setting gives them, to the bit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import cts_pipeline.pipelines.cts.nodes as cts_nodes
import cts_pipeline.pipelines.tickets.nodes as ticket_nodes

from .conftest import copy_project, latest, run_pipeline

ARTIFACTS = ("07_model_output/smoke/cts_kl-*/seed0/sp50_00/mask.pt", "07_model_output/smoke/cts_kl-*/seed0/sp90_00/mask.pt")
METRICS = "08_reporting/smoke/cts_kl-*/seed0/sp90_00/metrics.json/*/metrics.json"


def outcome(project):
    masks = [torch.load(latest(project, f"data/{a}"), weights_only=True)["masks"] for a in ARTIFACTS]
    [metrics] = project.glob(f"data/{METRICS}")
    return masks, json.loads(metrics.read_text())["test_accuracy"]


@pytest.mark.parametrize(("ratio", "fixed"), [(2.0, False), (0.5, True)])
def test_auto_runs_what_the_probe_finds_faster(project, tmp_path, monkeypatch, logged, ratio, fixed,
                                              finished_smoke_data):
    with monkeypatch.context() as patch:  # the probes' timings, made certain
        patch.setattr(cts_nodes, "stacked_search_ratio", lambda *a, **k: ratio)
        patch.setattr(ticket_nodes, "stacked_training_ratio", lambda *a, **k: ratio)
        run_pipeline(project, params={"runtime": {"batch_sparsities": "auto"}})
    lines = [r.getMessage() for r in logged]
    searching, training = ("them together", "them stacked") if fixed else ("one at a time", "one at a time")
    assert any(f"takes {ratio:.2f} of 2 single steps on this device; searching {searching}" in line for line in lines)
    assert any(f"take {ratio:.2f} of 2 single steps on this device; training {training}" in line for line in lines)
    reference = copy_project(tmp_path / "fixed")
    monkeypatch.chdir(reference)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{(reference / 'mlflow.db').as_posix()}")
    if fixed:  # the smoke preset's own setting: its finished run is the reference
        shutil.copytree(finished_smoke_data, reference / "data")
    else:
        run_pipeline(reference, params={"runtime": {"batch_sparsities": fixed}})
    (auto_masks, auto_accuracy), (fixed_masks, fixed_accuracy) = outcome(project), outcome(reference)
    for ours, theirs in zip(auto_masks, fixed_masks, strict=True):
        assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert auto_accuracy == fixed_accuracy


def test_a_bad_batch_sparsities_value_is_named():
    from cts_pipeline.config.sections import RuntimeConfig

    with pytest.raises(ValueError, match="runtime.batch_sparsities must be auto, true or false, got 'sometimes'"):
        RuntimeConfig(batch_sparsities="sometimes")

"""`runtime.stack_seeds`: the grid's seeds as rows of one stacked network in the pipeline. The dense
runs of every seed are one node, a method's searches of every seed another, and the retrainings of
its tickets of every seed a third; each seed keeps its own artifacts and records, which equal those
of a node per seed up to float rounding."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from cts_pipeline.pipelines.reporting.nodes import shared_time_notes

from .conftest import copy_project, latest, run_pipeline

SEEDS = {"grid": {"seeds": [0, 1]}}


def records(project, pattern: str) -> dict[str, dict]:
    found = {}
    for path in project.glob(f"data/08_reporting/smoke/{pattern}/metrics.json/*/metrics.json"):
        record = json.loads(path.read_text())
        found[record["namespace"]] = record
    return found


def masks(project) -> dict[str, dict]:
    return {f"seed{seed}.{sp}": torch.load(latest(project, f"data/07_model_output/smoke/cts_kl-*/seed{seed}/{sp}/mask.pt"),
                                           weights_only=True)["masks"]
            for seed in (0, 1) for sp in ("sp50_00", "sp90_00")}


@pytest.mark.cross_path
def test_stacked_seeds_give_each_seed_what_a_node_per_seed_gives(project, tmp_path, monkeypatch, logged):
    run_pipeline(project, params={**SEEDS, "runtime": {"stack_seeds": True}})
    lines = [r.getMessage() for r in logged]
    assert any("cts_kl.seeds: one search of 2 seeds × 2 sparsities" in line for line in lines)
    assert any("cts_kl.seeds: 4 tickets retrained stacked" in line for line in lines)
    stacked_dense, stacked_tickets, stacked_masks = records(project, "dense-*/*"), records(project, "cts_kl-*/*/*"), \
        masks(project)
    table = pd.read_csv(latest(project, "data/08_reporting/smoke/report-*/cts_results.csv"))
    dense_rows = table[table["method"] == "dense"]
    assert list(dense_rows["dense_shared_by"]) == [2, 2]
    retrain_whole = table[table["method"] == "cts_kl"].drop_duplicates("retrain_group_id")["retrain_group_s"]
    assert len(retrain_whole) == 1, "one retraining for both seeds' tickets"
    notes = shared_time_notes(table)
    assert notes[0] == f"dense: times are each seed's share of one stacked training of 2 seeds " \
                       f"({dense_rows['total_s'].sum():.1f} s)"
    assert f"one retraining of 4 ({retrain_whole.iloc[0] / 2:.1f} s a seed)" in notes[1]
    reference = copy_project(tmp_path / "per_seed")
    monkeypatch.chdir(reference)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{(reference / 'mlflow.db').as_posix()}")
    run_pipeline(reference, params={**SEEDS, "runtime": {"stack_seeds": False}})
    dense, tickets, per_seed_masks = records(reference, "dense-*/*"), records(reference, "cts_kl-*/*/*"), masks(reference)

    assert sorted(stacked_dense) == sorted(dense) == ["dense.seed0", "dense.seed1"]
    for name, record in stacked_dense.items():
        assert record["dense_path"] == "stacked x2" and record["dense_shared_by"] == 2
        assert "dense_path" not in dense[name]
        one_image = 100 / record["test_images"]
        assert record["test_accuracy"] == pytest.approx(dense[name]["test_accuracy"], abs=one_image + 1e-9)
        for mine, theirs in zip(record["history"], dense[name]["history"], strict=True):
            assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
    assert stacked_dense["dense.seed0"]["test_accuracy"] != stacked_dense["dense.seed1"]["test_accuracy"] or \
        stacked_dense["dense.seed0"]["history"] != stacked_dense["dense.seed1"]["history"], "the seeds differ"

    assert sorted(stacked_tickets) == sorted(tickets) and len(tickets) == 4
    same_masks = 0
    for name, record in stacked_tickets.items():
        assert record["retrain_path"] == "stacked x4" and record["retrain_shared_by"] == 4
        assert record["search_path"] == "stacked x2 seeds" and record["search_shared_by"] == 4
        assert tickets[name]["search_path"] == "stacked" and tickets[name]["search_shared_by"] == 2
        assert record["kept_weights"] == tickets[name]["kept_weights"]
        # θ_k trained stacked or not, searched as seed rows or per seed: equal up to float rounding, so
        # a mask may swap a few weights.
        mask, theirs = stacked_masks[name.split(".", 1)[1]], per_seed_masks[name.split(".", 1)[1]]
        overlap = sum(int((m & theirs[n]).sum()) for n, m in mask.items()) / record["kept_weights"]
        assert overlap >= 0.95, f"{name}: {overlap:.3f} of the kept weights in common"
        if overlap == 1.0:  # the same ticket, retrained stacked with another seed's, or alone
            same_masks += 1
            assert record["test_accuracy"] == pytest.approx(tickets[name]["test_accuracy"],
                                                            abs=100 / record["test_images"] + 1e-9)
            for mine, theirs in zip(record["retrain_history"], tickets[name]["retrain_history"], strict=True):
                assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
    assert same_masks >= 2, "too few equal masks to compare the retrainings"


def test_a_bad_stack_seeds_value_is_named():
    from cts_pipeline.config.sections import RuntimeConfig

    with pytest.raises(ValueError, match="runtime.stack_seeds must be auto, true or false, got 2"):
        RuntimeConfig(stack_seeds=2)

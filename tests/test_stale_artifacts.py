"""`--only-missing-outputs` recomputes what it cannot trust, and never trains on a mask that is not
the branch's own: every artifact carries a record of itself (``datasets/_records.py``)."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from .conftest import latest, run_pipeline

SP50 = "data/07_model_output/smoke/cts_kl-*/seed0/sp50_00/mask.pt"
SP90 = "data/07_model_output/smoke/cts_kl-*/seed0/sp90_00/mask.pt"
SP90_METRICS = "data/08_reporting/smoke/cts_kl-*/seed0/sp90_00/metrics.json"
REPORT = "data/08_reporting/smoke/report-*/cts_results.csv"


def sp90_row(project) -> pd.Series:
    table = pd.read_csv(latest(project, REPORT))
    return table[(table["method"] == "cts_kl") & (table["target_sparsity_pct"] == 90.0)].iloc[0]


def test_a_replaced_mask_is_recomputed_with_what_depends_on_it(project, logged):
    run_pipeline(project)
    before = latest(project, SP90_METRICS)
    shutil.copy(latest(project, SP50), latest(project, SP90))  # the 50 % mask in the 90 % branch's file
    run_pipeline(project, only_missing_outputs=True)
    assert any("does not match what was written" in r.getMessage() and "sp90_00/mask.pt" in r.getMessage()
               and r.levelname == "WARNING" for r in logged)
    assert latest(project, SP90_METRICS) != before, "the branch's evaluation must follow its new mask"
    row = sp90_row(project)
    assert abs(row["achieved_sparsity_pct"] - 90.0) < 0.1, row


def test_a_truncated_mask_under_existing_outputs_is_recomputed(project, logged):
    run_pipeline(project)
    mask = latest(project, SP90)
    mask.write_bytes(mask.read_bytes()[:100])
    run_pipeline(project, only_missing_outputs=True)
    assert any("bytes where" in r.getMessage() for r in logged)
    assert torch.load(latest(project, SP90), weights_only=True)["kept_weights"] > 0


def test_a_mask_copied_with_its_record_is_refused_naming_branch_and_file(project):
    run_pipeline(project)
    sp90 = latest(project, SP90)
    for suffix in ("", ".record.json"):  # the file and its record: nothing looks tampered with
        shutil.copy(str(latest(project, SP50)) + suffix, str(sp90) + suffix)
    for metrics in project.glob(SP90_METRICS):
        shutil.rmtree(metrics)
    with pytest.raises(ValueError, match=r"cts_kl.seed0.sp90_00.mask: keeps 1844 of 3688 weights .* wants 369") as err:
        run_pipeline(project, only_missing_outputs=True)
    assert any(note == f"file: {sp90}" for note in err.value.__notes__)


def test_a_mask_from_another_model_is_refused_naming_the_file(project):
    from cts_pipeline.datasets import TorchDataset

    run_pipeline(project)
    sp90 = latest(project, SP90)
    payload = torch.load(sp90, weights_only=True)
    for part in ("masks", "kept", "total"):
        payload[part] = {f"other.{name}": value for name, value in payload[part].items()}
    dataset = TorchDataset(filepath=str(sp90))
    dataset.save(payload)  # a well-formed file with its record, for other layer names
    for metrics in project.glob(SP90_METRICS):
        shutil.rmtree(metrics)
    with pytest.raises(ValueError, match=r"cts_kl.seed0.sp90_00.mask: mask does not match the model") as err:
        run_pipeline(project, only_missing_outputs=True)
    assert f"file: {sp90}" in err.value.__notes__


def test_outputs_older_than_an_input_rewritten_by_a_partial_run_are_recomputed(project, logged):
    run_pipeline(project)
    before = latest(project, SP90_METRICS)
    mask_node = "cts_kl.seed0.sp90_00.binary_mask"
    run_pipeline(project, node_names=[mask_node])
    run_pipeline(project, only_missing_outputs=True)
    assert any("was written after its outputs" in r.getMessage() for r in logged)
    assert latest(project, SP90_METRICS) != before


def test_a_report_is_rebuilt_when_a_branch_it_summarises_is_recomputed(project):
    run_pipeline(project)
    first = latest(project, REPORT)
    for metrics in project.glob(SP90_METRICS):
        shutil.rmtree(metrics)  # only this branch's evaluation is missing now
    run_pipeline(project, only_missing_outputs=True)
    rebuilt = latest(project, REPORT)
    assert rebuilt != first, "the report must not keep the row of a branch that was recomputed"
    assert len(pd.read_csv(rebuilt)) == 3


def test_nothing_is_recomputed_when_every_artifact_matches_its_record(project, logged):
    run_pipeline(project)
    first = latest(project, REPORT)
    run_pipeline(project, only_missing_outputs=True)
    assert latest(project, REPORT) == first
    assert not [r.getMessage() for r in logged if ": recomputed, " in r.getMessage()]

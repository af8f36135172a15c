"""`--only-missing-outputs` never trains on a mask that is not the branch's own."""

from __future__ import annotations

import shutil

import pytest

from .conftest import latest, run_pipeline


def test_a_replaced_mask_is_refused_naming_the_branch(project):
    run_pipeline(project)
    sp50 = latest(project, "data/07_model_output/smoke/cts_kl-*/seed0/sp50_00/mask.pt")
    sp90 = latest(project, "data/07_model_output/smoke/cts_kl-*/seed0/sp90_00/mask.pt")
    shutil.copy(sp50, sp90)  # the 50 % mask where the 90 % branch reads its own
    for metrics in project.glob("data/08_reporting/smoke/cts_kl-*/seed0/sp90_00/metrics.json"):
        shutil.rmtree(metrics)
    with pytest.raises(ValueError, match=r"cts_kl.seed0.sp90_00.mask keeps 1844 of 3688 weights .* wants 369"):
        run_pipeline(project, only_missing_outputs=True)


def test_a_report_is_rebuilt_when_a_branch_it_summarises_is_recomputed(project):
    import pandas as pd

    run_pipeline(project)
    report = "data/08_reporting/smoke/report-*/cts_results.csv"
    first = latest(project, report)
    for metrics in project.glob("data/08_reporting/smoke/cts_kl-*/seed0/sp90_00/metrics.json"):
        shutil.rmtree(metrics)  # only this branch's evaluation is missing now
    run_pipeline(project, only_missing_outputs=True)
    rebuilt = latest(project, report)
    assert rebuilt != first, "the report must not keep the row of a branch that was recomputed"
    assert len(pd.read_csv(rebuilt)) == 3

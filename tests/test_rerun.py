"""Never redo finished work: `--only-missing-outputs` is keyed on the configuration."""

from __future__ import annotations

from .conftest import run_pipeline


def versions(project, pattern: str) -> int:
    """How many runs wrote the artifacts matching ``pattern`` (version folders)."""
    return sum(1 for _ in project.glob(pattern + "/*/"))


def test_reruns_skip_what_this_configuration_already_computed(finished_project):
    dense = "data/06_models/smoke/dense-*/seed0/theta_rewind.pt"
    sp50 = "data/07_model_output/smoke/cts_kl-*/seed0/sp50_00/mask.pt"
    sp70 = "data/07_model_output/smoke/cts_kl-*/seed0/sp70_00/mask.pt"
    report = "data/08_reporting/smoke/report-*/cts_results.csv"

    project = finished_project  # after `kedro run --pipelines=cts --env=smoke`
    assert (versions(project, dense), versions(project, sp50), versions(project, report)) == (1, 1, 1)

    run_pipeline(project, only_missing_outputs=True)  # same configuration: nothing to do
    assert (versions(project, dense), versions(project, sp50), versions(project, report)) == (1, 1, 1)

    # One more sparsity: the dense network is reused. The seed's batched search and retraining
    # rerun to make the new branch, so the old branches' masks and evaluations follow their new
    # scores (FreshnessHook); a new report (the grid is part of the report's key).
    run_pipeline(project, params={"grid": {"sparsities": [0.5, 0.7, 0.9]}}, only_missing_outputs=True)
    assert (versions(project, dense), versions(project, sp50), versions(project, sp70)) == (1, 2, 1)
    assert versions(project, report) == 2
    run_pipeline(project, params={"grid": {"sparsities": [0.5, 0.7, 0.9]}}, only_missing_outputs=True)
    assert (versions(project, sp50), versions(project, sp70), versions(project, report)) == (2, 1, 2)

    # Another search: new CTS branches under a new key, the dense network is reused.
    run_pipeline(project, params={"cts": {"epochs": 1}}, only_missing_outputs=True)
    assert versions(project, dense) == 1
    assert len(list(project.glob("data/07_model_output/smoke/cts_kl_1ep-*/seed0/sp50_00/mask.pt"))) == 1

    # Another training recipe: everything is recomputed, nothing stale is reused.
    run_pipeline(project, params={"training": {"lr": 0.04}}, only_missing_outputs=True)
    assert len(list(project.glob("data/06_models/smoke/dense-*"))) == 2

"""A search that runs away from its budget is flagged, never passed off as a CTS ticket."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from cts_pipeline.pipelines.cts.nodes import SearchDiverged

from .conftest import latest, run_pipeline

RUNAWAY = {"cts": {"lr": 1.0e6}}


def test_a_diverged_search_is_flagged_in_log_metrics_and_table(project, logged):
    run_pipeline(project, params=RUNAWAY)
    metrics = json.loads(latest(project, "data/08_reporting/smoke/cts_kl*-*/seed0/sp50_00/metrics.json").read_text())
    assert metrics["diverged"] and ("weight budget" in metrics["diverged"] or "saturated" in metrics["diverged"])
    table = pd.read_csv(latest(project, "data/08_reporting/smoke/report-*/cts_results.csv"))
    assert table.loc[table["family"] == "cts", "diverged"].all()
    assert any("the search diverged" in r.getMessage() for r in logged)


def test_strict_stops_the_run_at_a_diverged_search(project):
    with pytest.raises(SearchDiverged, match=r"cts_kl\S*\.seed0\.sp50_00: the search diverged: .*runtime.strict is on"):
        run_pipeline(project, params={**RUNAWAY, "runtime": {"strict": True}})


def test_a_healthy_search_is_not_flagged(finished_project):
    project = finished_project  # after `kedro run --pipelines=cts --env=smoke`
    table = pd.read_csv(latest(project, "data/08_reporting/smoke/report-*/cts_results.csv"))
    assert not table["diverged"].any()

"""The comparison end to end: every method side by side, the sanity checks, layer collapse flagged."""

from __future__ import annotations

import logging
import re

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from cts_pipeline.core.prune.ltr import level_density

from .conftest import latest, run_pipeline

METHODS = ["cts_kl", "grasp", "ltr", "magnitude", "random", "snip", "synflow"]


def check_the_comparison(project) -> None:
    """What the default run (`compare` and `sanity`) leaves: every method side by side, the sanity
    checks against their references, the plots and the MLflow children."""
    report = "data/08_reporting/smoke/report-*"

    table = pd.read_csv(latest(project, f"{report}/compare_results.csv"))
    assert sorted(set(table["method"])) == sorted(["dense", *METHODS])
    tickets = table[table["method"] != "dense"]
    assert len(tickets) == len(METHODS) * 2  # two sparsities, one seed
    exact = tickets[tickets["method"] != "ltr"]
    assert (exact["achieved_sparsity_pct"] - exact["target_sparsity_pct"]).abs().max() < 0.03
    # LTR's mask at a grid sparsity is the first level that reaches it: 50 % -> level 4, 90 % -> level 11.
    ltr = tickets[tickets["method"] == "ltr"].sort_values("target_sparsity_pct")
    assert list(ltr["kept_weights"]) == [round(level_density(4) * 3688), round(level_density(11) * 3688)]
    assert (ltr["find_mask_s"] > tickets[tickets["method"] == "snip"]["find_mask_s"].max()).all()

    summary = pd.read_csv(latest(project, f"{report}/compare_summary.csv"))
    assert {"test_accuracy_mean", "test_accuracy_std", "total_s", "seeds"} <= set(summary.columns)
    for plot in ("compare_accuracy_vs_sparsity.png", "compare_accuracy_vs_time.png", "compare_layer_density.png"):
        assert latest(project, f"{report}/{plot}").stat().st_size > 5000, plot

    sanity = pd.read_csv(latest(project, f"{report}/sanity.csv"))
    assert sorted(zip(sanity["method"], sanity["check"], strict=True)) == [
        ("cts_kl", "inverted"), ("cts_kl", "reinit"), ("cts_kl", "shuffled"), ("snip", "inverted"), ("snip", "reinit"),
        ("snip", "shuffled")]
    reference = table[(table["method"] == "snip") & (table["target_sparsity_pct"] == 90.0)]["test_accuracy"].item()
    assert sanity["reference_accuracy"][sanity["method"] == "snip"].eq(reference).all()
    assert (sanity["accuracy_change"] == sanity["check_accuracy"] - sanity["reference_accuracy"]).all()

    shuffled = torch.load(latest(project, "data/07_model_output/smoke/cts_kl_shuffled-*/seed0/sp90_00/mask.pt"),
                          weights_only=True)
    original = torch.load(latest(project, "data/07_model_output/smoke/cts_kl-*/seed0/sp90_00/mask.pt"),
                          weights_only=True)
    assert shuffled["kept"] == original["kept"], "a layerwise shuffle keeps every layer's count"
    assert any(not torch.equal(shuffled["masks"][n], original["masks"][n]) for n in original["masks"])

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("cts-pipeline").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 1 + len(METHODS) * 2 + len(sanity)
    assert {r.data.params["method"] for r in children} >= set(METHODS)


def test_layer_collapse_is_flagged_in_the_table_the_log_and_mlflow(project):
    # The base configuration (the smoke preset's convnet options do not apply to LeNet), shortened.
    params = {"model": {"name": "lenet_300_100"}, "methods": {"pai": ["magnitude"]}, "grid": {"levels": None, "sparsities": [0.98]},
              "training": {"epochs": 2, "milestones": [1]}, "runtime": {"progress": False}}
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)  # Kedro's logging setup, which replaces the logger's handlers: before ours
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("cts_pipeline")  # Kedro's logging setup replaces the root handlers
    logger.addHandler(handler)
    try:
        run_pipeline(project, env=None, params=params, pipeline="pai")
    finally:
        logger.removeHandler(handler)
    table = pd.read_csv(latest(project, "data/08_reporting/default/report-*/pai_results.csv"), keep_default_na=False)
    row = table[table["method"] == "magnitude"].iloc[0]
    assert row["collapsed_layers"] == "fc2.weight"  # Kaiming scaling makes 300->100 weights smallest
    warnings = [r.getMessage() for r in records]
    assert any("layer collapse" in w and "fc2.weight" in w for w in warnings), warnings
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("cts-pipeline").experiment_id])
    child = next(r for r in runs if r.data.params.get("method") == "magnitude")
    assert child.data.tags["layer_collapse"] == "fc2.weight" and child.data.metrics["collapsed_layers"] == 1.0


def test_the_default_run_compares_the_methods_and_the_notebook_redraws_it(project, monkeypatch):
    """The full run (checked in full: it is the one run of the default pipeline here)."""
    run_pipeline(project, pipeline="__default__")
    check_the_comparison(project)
    check_the_notebook(project, monkeypatch, with_sanity=True)


def test_the_notebook_redraws_a_cts_run_below_10_and_above_99_9_percent(project, monkeypatch):
    """The layer-density cell rebuilt the branches' names and missed ``sp05_00`` and ``sp99_90``:
    it reads them from the pipeline now (issue 37, item 9)."""
    conf = project / "conf" / "smoke" / "parameters.yml"  # the grid of a user's own preset
    conf.write_text(conf.read_text().replace("sparsities: [0.5, 0.9]", "sparsities: [0.05, 0.999]", 1))
    run_pipeline(project)
    table = pd.read_csv(latest(project, "data/08_reporting/smoke/report-*/cts_results.csv"))
    assert set(table["target_sparsity_pct"]) == {0.0, 5.0, 99.9}
    check_the_notebook(project, monkeypatch, with_sanity=False)


def check_the_notebook(project, monkeypatch, *, with_sanity: bool) -> None:
    import shutil

    import nbformat
    from nbclient import NotebookClient

    from .conftest import PROJECT_ROOT

    (project / "notebooks").mkdir()
    shutil.copy(PROJECT_ROOT / "notebooks" / "compare_methods.ipynb", project / "notebooks")
    notebook = nbformat.read(project / "notebooks" / "compare_methods.ipynb", as_version=4)
    monkeypatch.setenv("KEDRO_ENV", "smoke")
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(project / "notebooks")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3, "the accuracy, time and layer-density plots are redrawn"
    tables = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("test_accuracy_mean" in t for t in tables)
    assert any("passes" in t for t in tables) == with_sanity
    printed = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "kept " in printed and "98.00 % sparsity" in printed  # the one-call API's cell
    assert re.search(r"sparsity\): \d+\.\d\d % test accuracy on 360 held-out digits", printed), printed
    # Issue 24: no log lines or warnings in the cells, and the summary rounded with whole counts.
    noise = [o.get("text", "") for o in outputs if o.get("output_type") == "stream" and o.get("name") == "stderr"]
    assert not noise, noise
    assert "INFO" not in printed and "Warning" not in printed, printed
    [shown] = [t for t in tables if "test_accuracy_mean" in t]
    # Rounded (no float noise), and the counts (kept weights: hundreds and more) shown as integers.
    assert not re.search(r"\d\.\d{3,}", shown) and not re.search(r">\d{3,}\.0<", shown), shown[:2000]


def test_summary_counts_collapsed_seeds_after_a_csv_round_trip(tmp_path):
    from cts_pipeline.pipelines.reporting.nodes import summary

    columns = dict(method=["snip"] * 3, target_sparsity_pct=[99.0] * 3, seed=[0, 1, 2], achieved_sparsity_pct=[99.0] * 3,
                   kept_weights=[10] * 3, test_accuracy=[90.0, 91.0, 20.0], find_mask_s=[1.0] * 3, retrain_s=[2.0] * 3, to_rewind_s=[0.0] * 3,
                   total_s=[3.0] * 3, collapsed_layers=["", "", "fc1.weight"])
    pd.DataFrame(columns).to_csv(tmp_path / "table.csv", index=False)
    table = pd.read_csv(tmp_path / "table.csv")  # "" comes back as NaN
    assert summary(table)["collapsed_seeds"].tolist() == [1]
    assert summary(pd.DataFrame(columns))["collapsed_seeds"].tolist() == [1]


def test_one_seed_has_no_spread_and_every_plot_of_means_states_n():
    """With one seed the std is empty (NaN), never 0.0, and the legends say over how many seeds
    each method's points are means (issue 37, item 5)."""
    import math

    from cts_pipeline.pipelines.reporting.nodes import (
        accuracy_plot,
        grid_cost_plot,
        summary,
        time_plot,
    )

    rows = [dict(method=m, target_sparsity_pct=s, seed=seed, achieved_sparsity_pct=s, kept_weights=10,
                 test_accuracy=90.0 + seed, find_mask_s=1.0, retrain_s=2.0, total_s=3.0, collapsed_layers="",
                 test_images=100, family="cts" if m == "cts_kl" else "pai", to_rewind_s=1.0, find_mask_group_s=1.0,
                 retrain_group_s=2.0, search_group_id=f"{m}.seed{seed}.s{s}", retrain_group_id=f"{m}.seed{seed}.r{s}")
            for m, seeds in (("cts_kl", (0,)), ("snip", (0, 1, 2))) for s in (90.0, 99.0) for seed in seeds]
    rows.append(dict(rows[0], method="dense", family="dense", target_sparsity_pct=0.0, achieved_sparsity_pct=0.0))
    table = pd.DataFrame(rows)
    shown = summary(table).set_index(["method", "target_sparsity_pct"])
    assert math.isnan(shown.loc[("cts_kl", 90.0), "test_accuracy_std"])
    assert shown.loc[("snip", 90.0), "test_accuracy_std"] == pytest.approx(1.0)
    for plot in (accuracy_plot, time_plot, grid_cost_plot):
        legend = [t.get_text() for t in plot(table, "t").axes[0].get_legend().get_texts()]
        assert any(t.startswith("cts_kl (n = 1") for t in legend), (plot.__name__, legend)
        assert any(t.startswith("snip (n = 3") for t in legend), (plot.__name__, legend)
        assert any(t.startswith("dense (") and "n = 1" in t for t in legend), (plot.__name__, legend)

"""The whole-grid cost: what producing every grid ticket of a method and seed costs, by hand."""

from __future__ import annotations

import pandas as pd
import pytest

from cts_pipeline.pipelines.reporting.nodes import grid_cost, grid_cost_plot


def row(method, family, sparsity, to_rewind, find, retrain, accuracy, seed=0):
    return {"method": method, "family": family, "seed": seed, "target_sparsity_pct": sparsity,
            "to_rewind_s": to_rewind, "find_mask_s": find, "retrain_s": retrain, "test_accuracy": accuracy}


def table():
    return pd.DataFrame([
        row("dense", "dense", 0.0, 1.0, 0.0, 20.0, 99.0),
        # CTS batched: each ticket carries its share (1/2) of a 10 s search and a 30 s retraining.
        row("cts_kl", "cts", 99.26, 1.0, 5.0, 15.0, 95.0),
        row("cts_kl", "cts", 98.20, 1.0, 5.0, 15.0, 97.0),
        # LTR: find_mask is cumulative over the levels, the dense training included.
        row("ltr", "ltr", 98.20, 0.0, 300.0, 20.0, 98.0),
        row("ltr", "ltr", 99.26, 0.0, 420.0, 20.0, 97.5),
        row("cts_kl_shuffled", "sanity", 99.26, 1.0, 0.1, 20.0, 80.0),
    ])


def test_grid_cost_counts_the_rewind_once_and_ltr_levels_cumulatively():
    costs = grid_cost(table())
    assert set(costs["method"]) == {"cts_kl", "ltr"}, "dense and sanity checks are not methods"
    cts = costs[costs["method"] == "cts_kl"]
    assert list(cts["target_sparsity_pct"]) == [98.20, 99.26], "walked from the lowest sparsity up"
    assert list(cts["cumulative_s"]) == pytest.approx([1 + 5 + 15, 1 + 10 + 30])
    assert (cts["grid_cost_s"] == 41).all()
    ltr = costs[costs["method"] == "ltr"]
    assert list(ltr["cumulative_s"]) == pytest.approx([300 + 20, 420 + 40])
    assert (ltr["grid_cost_s"] == 460).all()


def test_grid_cost_plot_labels_each_method_with_its_grid_cost():
    fig = grid_cost_plot(table(), "t")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "cts_kl (grid: 41 s)" in labels and "ltr (grid: 460 s)" in labels

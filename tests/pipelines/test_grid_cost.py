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
    assert "cts_kl (n = 1; grid: 41 s)" in labels and "ltr (n = 1; grid: 460 s)" in labels


def batched_table():
    """Two CTS tickets from one batched search (10 s) and one stacked retraining (30 s), and an
    unbatched method, with the columns results_table writes."""
    def ticket(method, sparsity, find, retrain, accuracy, shared):
        return {**row(method, "cts" if method == "cts_kl" else "pai", sparsity, 1.0, find, retrain, accuracy),
                "search_shared_by": 2 if shared else 1, "find_mask_group_s": 10.0 if shared else find,
                "search_group_id": "cts_kl.seed0.sp98_20" if shared else "",
                "retrain_shared_by": 2 if shared else 1, "retrain_group_s": 30.0 if shared else retrain,
                "retrain_group_id": "cts_kl.seed0.sp98_20" if shared else "", "test_images": 360}
    return pd.DataFrame([
        {**row("dense", "dense", 0.0, 1.0, 0.0, 20.0, 99.0), "test_images": 360},
        ticket("cts_kl", 99.26, 5.0, 15.0, 95.0, True),
        ticket("cts_kl", 98.20, 5.0, 15.0, 97.0, True),
        ticket("snip", 98.20, 0.5, 20.0, 96.0, False),
        ticket("snip", 99.26, 0.5, 20.0, 94.0, False),
    ])


def test_a_batched_groups_time_is_paid_once_for_the_grid_and_spread_for_the_time_plot():
    """Issue 24: the grid's cost counts a batched search and a stacked retraining once (all its
    tickets exist when it ends); the accuracy-versus-time plot spreads it, so no points pile up."""
    once = grid_cost(batched_table())
    cts = once[once["method"] == "cts_kl"]
    assert list(cts["cumulative_s"]) == pytest.approx([1 + 10 + 30, 1 + 10 + 30])
    snip = once[once["method"] == "snip"]
    assert list(snip["cumulative_s"]) == pytest.approx([1 + 0.5 + 20, 1 + 1 + 40]), "unshared: as before"
    spread = grid_cost(batched_table(), shared="spread")
    assert list(spread[spread["method"] == "cts_kl"]["cumulative_s"]) == pytest.approx([21, 41])
    read_back = batched_table().astype({"search_group_id": object})
    read_back.loc[read_back["search_group_id"] == "", "search_group_id"] = float("nan")  # as from CSV
    assert list(grid_cost(read_back)["cumulative_s"]) == list(once["cumulative_s"])


def test_the_summary_says_which_times_are_shares_and_what_one_test_image_is_worth():
    from cts_pipeline.pipelines.reporting.nodes import (
        format_summary,
        shared_time_notes,
        test_set_note,
    )

    notes = shared_time_notes(batched_table())
    assert notes == ["cts_kl: times are each ticket's share of one search of 2 (10.0 s a seed) and one retraining "
                     "of 2 (30.0 s a seed)"]
    assert test_set_note(batched_table()) == "360 test images: one is 0.28 points"
    table = batched_table().assign(achieved_sparsity_pct=0.0, kept_weights=1, collapsed_layers="", total_s=1.0,
                                   hardware="CPU x")
    assert notes[0] in format_summary(table) and "360 test images" in format_summary(table)

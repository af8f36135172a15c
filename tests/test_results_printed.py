"""What the run prints at its end: a results table whose times add up, that fits the terminal
without wrapping, and one line with the run's whole wall-clock (issue 37, items 4 and 8)."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import pytest
from rich.console import Console

from cts_pipeline.framework.hooks import results
from cts_pipeline.framework.tracking import shared_time_tags
from cts_pipeline.pipelines.reporting.nodes import results_table, summary_rows

HARDWARE = "CPU test"


def metrics(method, sparsity, seed, seconds, **extra):
    dense = method == "dense"
    return {"method": method, "family": "dense" if dense else ("ltr" if method == "ltr" else "cts"), "seed": seed,
            "target_sparsity": sparsity, "achieved_sparsity": sparsity, "kept_weights": 100, "prunable_weights": 1000,
            "test_accuracy": 90.0 + seed, "dense_test_accuracy": 95.0, "collapsed_layers": [], "model": "convnet",
            "dataset": "digits", "rewind_epoch": 1, "hardware": HARDWARE, "test_images": 360, "seconds": seconds,
            **extra}


def sweep(seeds=(0,), note=False):
    out = []
    for seed in seeds:
        # Dense: 3.26 s to θ_k of an 8.94 s training; a batched CTS pair shares 8.2 s and 5.4 s.
        out.append(metrics("dense", 0.0, seed, {"to_rewind": 3.26, "train": 8.94}))
        for sparsity in (0.8926, 0.9953):
            seconds = {"to_rewind": 3.26, "find_mask": 4.1, "retrain": 2.67, "find_mask_group": 8.2,
                       "retrain_group": 5.34}
            seconds["total"] = seconds["to_rewind"] + seconds["find_mask"] + seconds["retrain"]
            out.append(metrics("cts_kl", sparsity, seed, seconds, search_shared_by=2, retrain_shared_by=2,
                               search_group_id=f"cts_kl.seed{seed}", retrain_group_id=f"cts_kl.seed{seed}",
                               collapsed_layers=["fc1.weight"] if note and sparsity > 0.99 and seed == 0 else []))
        # LTR: its mask time already holds the dense training, so its rewind is 0.
        out.append(metrics("ltr", 0.9953, seed, {"to_rewind": 0.0, "find_mask": 140.04, "retrain": 2.71,
                                                 "total": 142.75}))
    return results_table(out)


def test_every_total_shown_is_the_sum_of_the_times_shown():
    """The printed total hid the dense training to θ_k (5.3 + 3.3 shown, 9.0 total)."""
    header, rows = summary_rows(sweep(seeds=(0, 1)))
    columns = [header.index(c) for c in ("rewind s", "mask s", "retrain s", "total s")]
    for row in rows:
        rewind, mask, retrain, total = (float(row[i]) for i in columns)
        assert rewind + mask + retrain == pytest.approx(total, abs=1e-9), row
    shown = {row[0]: [row[i] for i in columns] for row in rows}
    assert shown["dense"] == ["3.3", "0.0", "5.7", "9.0"], "dense: θ_k, then the rest (8.94 s, shown as its parts add)"
    assert shown["cts_kl"] == ["3.3", "4.1", "2.7", "10.1"]
    assert shown["ltr"] == ["0.0", "140.0", "2.7", "142.7"]


def printed(table, width, files=None) -> list[str]:
    console = Console(file=io.StringIO(), force_terminal=True, width=width, color_system=None)
    results.print_tables({"cts_results_table": table}, files or {}, console)
    return console.file.getvalue().splitlines()


@pytest.mark.parametrize("seeds", [(0,), (0, 1, 2)])
def test_the_table_fits_100_columns_without_wrapping_and_says_what_it_left_out(seeds):
    table = sweep(seeds=seeds, note=True)
    lines = printed(table, 100, {"cts_results_table": "data/08_reporting/x/cts_results.csv"})
    width = max(len(line) for line in lines if line[:1] in "┏┃┡│└")
    assert width <= 100
    assert sum(line.startswith("┃") for line in lines) == 1, "the header is one line"
    assert sum(line.startswith("│") for line in lines) == len(summary_rows(table)[1]), "one line per row"
    [left_out] = [line for line in lines if line.startswith("left out at 100 columns")]
    assert "achieved %" in left_out and "data/08_reporting/x/cts_results.csv" in left_out
    assert any("LAYER COLLAPSE (1 of" in line for line in lines), "a note is never lost"
    wide = printed(table, 240)
    assert not any(line.startswith("left out") for line in wide)
    assert sum(line.startswith("┃") for line in wide) == 1 and "achieved %" in wide[2]


def test_the_run_ends_with_one_line_giving_its_whole_wall_clock(monkeypatch):
    console = Console(file=io.StringIO(), width=100)
    monkeypatch.setattr(results, "_console", lambda: console)
    clock = iter([100.0, 142.25])
    monkeypatch.setattr(results.time, "perf_counter", lambda: next(clock))
    hook = results.ResultsPrinterHook()
    hook.before_pipeline_run()
    hook.after_pipeline_run({"pipeline_names": ["cts"]}, SimpleNamespace(nodes=[]), catalog=None)
    assert console.file.getvalue().splitlines()[-1] == "kedro run (cts): 42.2 s wall-clock in all"


def test_a_batched_childs_tags_say_which_group_its_times_are_shares_of():
    """MLflow's Duration of a batched ticket spans its group's time; the tag says so."""
    row = next(m for m in [metrics("cts_kl", 0.99, 0, {"find_mask": 4.1, "retrain": 2.67, "find_mask_group": 8.2,
                                                      "retrain_group": 5.34},
                                   search_shared_by=2, retrain_shared_by=2, search_group_id="cts_kl.seed0",
                                   retrain_group_id="cts_kl.seed0")])
    tags = shared_time_tags(row)
    assert tags["shared_search"] == ("1/2 of 8.2 s: seconds_find_mask = 4.1 s is this ticket's share of the group "
                                     "cts_kl.seed0")
    assert re.match(r"1/2 of 5.3 s: seconds_retrain = 2.7 s .* cts_kl.seed0$", tags["shared_retraining"])
    assert shared_time_tags(metrics("snip", 0.99, 0, {"find_mask": 0.1, "retrain": 2.0})) == {}


def test_the_run_identity_names_the_commit_and_says_when_the_tree_was_dirty(tmp_path):
    import subprocess

    from cts_pipeline.framework.provenance import run_identity

    params = {"run_id": "2026-12-05T16.19.02.793Z"}
    assert run_identity(params, tmp_path, "smoke")["commit"] == "not a git checkout"
    git = ["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t"]
    (tmp_path / "a.txt").write_text("1")
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert run_identity(params, tmp_path, "smoke") == {"run": params["run_id"], "preset": "smoke",
                                                       "commit": head[:12]}
    (tmp_path / "a.txt").write_text("2")
    assert run_identity(params, tmp_path, "smoke")["commit"] == head[:12] + "+dirty"

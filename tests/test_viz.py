"""`kedro viz build` renders the project: one branch per seed and sparsity in the static site."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_kedro_viz_build_shows_every_branch(project):
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"}
    done = subprocess.run([sys.executable, "-m", "kedro", "viz", "build"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (project / "build" / "index.html").exists()
    graph = json.loads((project / "build" / "api" / "main").read_text())
    sparsities = ("sp89_26", "sp95_60", "sp98_20", "sp99_26", "sp99_53")
    methods = ("cts_kl", "ltr", "snip", "grasp", "synflow", "magnitude", "random")
    branches = {f"{m}.seed0.{sp}" for m in methods for sp in sparsities}
    checks = {f"{m}.seed0.sp99_26" for m in ("cts_kl_shuffled", "cts_kl_inverted", "snip_reinit")}
    shown = set(graph["modular_pipelines"])
    assert branches | checks | {"dense.seed0", "ltr.seed0"} <= shown, sorted(branches - shown)
    # What the project controls is in sparsity order: the names (the sidebar sorts them) and the
    # graph's node list. Within a row, kedro-viz's layout solver places nodes to cut edge crossings.
    named = [n["name"] for n in graph["nodes"] if n["name"].startswith("cts_kl.seed0.sp") and
             n["name"].endswith(".metrics")]
    assert named == [f"cts_kl.seed0.{sp}.metrics" for sp in sparsities]


def test_dataset_layers_have_an_order(project):
    """kedro-viz draws layers only when no node reads a later layer than one it writes."""
    from graphlib import CycleError, TopologicalSorter

    from kedro.framework.project import pipelines
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    with KedroSession.create(project_path=project) as session:
        catalog = session.load_context().catalog

        def layer(name):
            if name not in catalog:
                return None
            return ((getattr(catalog.get(name), "metadata", None) or {}).get("kedro-viz") or {}).get("layer")

        graph: dict[str, set[str]] = {}
        for node in pipelines["__default__"].nodes:
            for out in {layer(o) for o in node.outputs} - {None}:
                graph.setdefault(out, set()).update({layer(i) for i in node.inputs} - {None, out})
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        raise AssertionError(f"the catalog's layers form a cycle: {exc.args[1]}") from None
    assert order.index("models") < order.index("model output") < order.index("reporting")


def test_previews_are_rounded_and_short(tmp_path):
    import pandas as pd
    from kedro_datasets._typing import JSONPreview, TablePreview

    from cts_pipeline.datasets import CSVDataset, JSONDataset

    table = CSVDataset(filepath=str(tmp_path / "t.csv"))
    table.save(pd.DataFrame({"method": ["cts_kl"], "test_accuracy": [89.25999999999999]}))
    assert table.preview()["data"] == [["cts_kl", 89.26]]
    metrics = JSONDataset(filepath=str(tmp_path / "m.json"))
    metrics.save({"test_accuracy": 96.666666667, "history": [{"epoch": 1}], "method": "cts_kl"})
    assert json.loads(metrics.preview()) == {"test_accuracy": 96.6667, "method": "cts_kl"}
    # kedro-viz picks the widget by the annotation's name
    assert CSVDataset.preview.__annotations__["return"] in ("TablePreview", TablePreview)
    assert JSONDataset.preview.__annotations__["return"] in ("JSONPreview", JSONPreview)


def test_previews_show_every_row_and_lead_with_the_result(tmp_path):
    """Issue 24: the results preview hid the sixth row and put test accuracy in column 11; a
    metrics preview had test_accuracy 23rd of 34 and raw Unix times; tickets had no preview."""
    import pandas as pd
    import torch

    from cts_pipeline.datasets import CSVDataset, JSONDataset, TicketDataset

    table = CSVDataset(filepath=str(tmp_path / "t.csv"))
    rows = [{"family": "cts", "hardware": "CPU", "method": "cts_kl", "seed": 0, "target_sparsity_pct": p,
             "test_accuracy": 90.0 + i} for i, p in enumerate((89.26, 95.6, 98.2, 99.26, 99.53, 99.9))]
    table.save(pd.DataFrame(rows))
    preview = table.preview()
    assert preview["columns"][:4] == ["method", "target_sparsity_pct", "seed", "test_accuracy"]
    assert len(preview["data"]) == 6
    metrics = JSONDataset(filepath=str(tmp_path / "m.json"))
    metrics.save({"dataset": "digits", "started_at": 1_796_000_000.5, "seconds": {"total": 12.345},
                  "method": "cts_kl", "test_accuracy": 97.5})
    shown = json.loads(metrics.preview())
    assert list(shown)[:2] == ["test_accuracy", "method"] and shown["seconds"] == {"total": 12.3}
    assert shown["started_at"].startswith("2026-") and ":" in shown["started_at"]
    ticket = TicketDataset(filepath=str(tmp_path / "ticket.safetensors"))
    ticket.save({"mask": {"fc.weight": torch.ones(2, 2, dtype=torch.bool)},
                 "manifest": {"format": "cts-pipeline/ticket-v1", "test_accuracy": 97.5, "target_sparsity": 0.98,
                              "layer_kept": {"fc.weight": 4}}})
    assert list(json.loads(ticket.preview()))[:2] == ["test_accuracy", "target_sparsity"]


def test_kedro_viz_shows_the_statistics_of_its_own_presets_last_run(project):
    """After a smoke run, kedro-viz showed the smoke run's row counts and node states for the
    default preset too (issue 37, item 6): each preset's files are kept and put back in place."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from .conftest import run_pipeline

    def open_for(env):  # what `kedro viz run --env=<env>` does before it reads .viz/
        bootstrap_project(project)
        with KedroSession.create(project_path=project, env=env) as session:
            session.load_context()

    run_pipeline(project)  # smoke
    viz = project / ".viz"
    smoke_stats = json.loads((viz / "stats.json").read_text())
    assert smoke_stats["cts_results_table"]["rows"] == 3
    assert json.loads((viz / "shown_preset.json").read_text())["preset"] == "smoke"
    open_for(None)  # the default preset has never run: no statistics, not smoke's
    assert not (viz / "stats.json").exists() and not (viz / "kedro_pipeline_events.json").exists()
    assert json.loads((viz / "shown_preset.json").read_text())["preset"] == "default"
    open_for("smoke")
    assert json.loads((viz / "stats.json").read_text()) == smoke_stats
    # kedro-viz writes its events file for a `kedro run` from the command line only.
    events = viz / "kedro_pipeline_events.json"
    assert events.exists() == (viz / "presets" / "smoke" / events.name).exists()


def test_a_viz_file_fault_costs_one_warning_never_the_run(project, logged):
    """Showing a preset's kedro-viz statistics runs whenever a context opens: a fault there (here
    a folder where kedro-viz's file belongs) must not stop the run, nor leave a partial file."""
    from .conftest import run_pipeline

    kept = project / ".viz" / "presets" / "default"
    kept.mkdir(parents=True)
    (kept / "stats.json").write_text("{}")
    (project / ".viz" / "stats.json").mkdir()  # cannot be replaced by a file
    run_pipeline(project)  # opens a context for smoke, then for nothing else: must finish
    from cts_pipeline.framework import viz_stats

    viz_stats.show(project, "default")
    warnings = [r.getMessage() for r in logged if "kedro-viz statistics per preset" in r.getMessage()]
    assert len(warnings) >= 1 and all("\n" not in w for w in warnings), warnings
    assert not list((project / ".viz").glob(".*.partial")), "no half-written file left"

"""The whole grid's cost on MNIST with LeNet-300-100: CTS-KL `long` and `short` against LTR, at
levels 18, 20, 22, 24 and 28, through the project's own `compare` pipeline (issue 8).

    python benchmarks/grid_cost.py --data ../shared/data               # about 15 min a seed, 2 CPU cores
    python benchmarks/grid_cost.py --data ../shared/data --write-docs  # also rewrite docs/performance.md

LTR reaches its deepest level after 28 trainings and every shallower level comes with it; CTS pays
one (batched) search and one (batched) retraining per seed for the whole grid. The ratio is LTR's
whole-grid wall-clock over CTS's, per seed, from the run's `compare_grid_cost.csv`. On CPU it is
bounded near 29 trainings / 5 retrainings ≈ 5.8 when the search is free; the paper's per-ticket
figure is about 12× on GPUs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path

from docs_blocks import ROOT, replace_block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")  # no network here

    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    overrides = {
        "data": {"root": str(args.data.resolve())},
        "grid": {"levels": [18, 20, 22, 24, 28], "seeds": args.seeds},
        "methods": {"cts_variants": [{"search_length": "short"}], "ltr": True, "pai": []},
        "runtime": {"progress": False},
    }
    bootstrap_project(ROOT)
    started = time.perf_counter()
    with KedroSession.create(project_path=ROOT, env="mnist_lenet", runtime_params=overrides) as session:
        session.run(pipeline_names=["compare"], only_missing_outputs=True)
    wall = time.perf_counter() - started
    with KedroSession.create(project_path=ROOT, env="mnist_lenet", runtime_params=overrides) as session:
        catalog = session.load_context().catalog
        costs = catalog.load("compare_grid_cost_table")
        table = catalog.load("compare_results_table")
    per_seed = costs.groupby(["method", "seed"])["grid_cost_s"].max().unstack("seed")
    accuracy = costs.groupby("method")["test_accuracy"].mean()
    hardware = "; ".join(sorted(table["hardware"].unique()))
    lines = [f"`python benchmarks/grid_cost.py --data ../shared/data`, {datetime.date.today()}, {hardware}, "
             f"seeds {args.seeds} ({wall:.0f} s for the run, finished branches skipped).", "",
             "| method | whole grid, s (per seed) | mean accuracy over the grid % | LTR / method |",
             "|---|---|---|---|"]
    ltr = per_seed.loc["ltr"]
    for method, row in per_seed.iterrows():
        ratio = statistics.fmean(ltr[s] / row[s] for s in row.index)
        lines.append(f"| {method} | {', '.join(f'{v:.0f}' for v in row)} | {accuracy[method]:.2f} | "
                     f"**{ratio:.1f}×** |")
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        replace_block("docs/performance.md", "grid-cost", text)


if __name__ == "__main__":
    main()

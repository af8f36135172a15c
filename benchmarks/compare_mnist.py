"""The method comparison on real MNIST with LeNet-300-100: 3 seeds, 5 sparsities, every method,
and the sanity checks at 99.26 %. Runs the project's own pipelines, then prints markdown tables.

    python benchmarks/compare_mnist.py                       # about 2 h on 2 CPU cores
    python benchmarks/compare_mnist.py --data ../shared/data --seeds 0 1 2
    python benchmarks/compare_mnist.py --report-only         # tables from the runs already made

What runs: the `mnist_lenet` preset (the calibration recipe of the method notes), pipelines
`compare` then `sanity`, through Kedro sessions in this process with the runtime parameters below
(what `kedro run --params` would pass, but lists cannot go through that flag: Kedro splits it on
every comma). Finished branches are skipped (`only_missing_outputs`): their artifacts are keyed
on the configuration, so a rerun resumes where an interrupted one stopped.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def params(data: Path, seeds: list[int]) -> dict:
    return {
        "data": {"root": str(data)},
        "grid": {"seeds": seeds},
        "methods": {"cts_variants": [{"search_length": "short"}]},
        "sanity": {"methods": ["cts", "snip", "grasp", "synflow"], "sparsities": [0.9926]},
        "runtime": {"progress": False},
    }


def session(overrides: dict):
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(ROOT)
    return KedroSession.create(project_path=ROOT, env="mnist_lenet", runtime_params=overrides)


def run(pipeline: str, overrides: dict) -> float:
    started = time.perf_counter()
    with session(overrides) as s:
        s.run(pipeline_names=[pipeline], only_missing_outputs=True)
    return time.perf_counter() - started


def report(overrides: dict) -> None:
    from cts_pipeline.pipelines.reporting.nodes import summary

    with session(overrides) as s:
        catalog = s.load_context().catalog
        table = catalog.load("compare_results_table")
        sanity = catalog.load("sanity_table")
    s = summary(table)
    sparsities = sorted(set(s["target_sparsity_pct"]) - {0.0})
    print("\n### Test accuracy (%, last epoch), mean ± std over seeds\n")
    print("| method | " + " | ".join(f"{x:.2f} %" for x in sparsities) + " |")
    print("|---|" + "---|" * len(sparsities))
    dense = s[s["method"] == "dense"].iloc[0]
    print(f"| dense | {dense.test_accuracy_mean:.2f} ± {dense.test_accuracy_std:.2f} (all) |" + " |" * (len(sparsities) - 1))
    for method, rows in s[s["method"] != "dense"].groupby("method", sort=False):
        cells = []
        for x in sparsities:
            r = rows[rows["target_sparsity_pct"] == x]
            if r.empty:
                cells.append("")
                continue
            r = r.iloc[0]
            note = " (collapse)" if r.collapsed_seeds else ""
            cells.append(f"{r.test_accuracy_mean:.2f} ± {r.test_accuracy_std:.2f}{note}")
        print(f"| {method} | " + " | ".join(cells) + " |")
    print("\n### Wall-clock per ticket (s: find the mask + retrain; LTR cumulative over its levels), mean over seeds\n")
    print("| method | " + " | ".join(f"{x:.2f} %" for x in sparsities) + " |")
    print("|---|" + "---|" * len(sparsities))
    for method, rows in s[s["method"] != "dense"].groupby("method", sort=False):
        cells = [f"{rows[rows['target_sparsity_pct'] == x].iloc[0].total_s:.0f}"
                 if not rows[rows["target_sparsity_pct"] == x].empty else "" for x in sparsities]
        print(f"| {method} | " + " | ".join(cells) + " |")
    ltr = table[table["method"] == "ltr"]
    print("\nLTR achieved sparsity per grid point (the first level that reaches it): " + ", ".join(
        sorted({f"{r.target_sparsity_pct:.2f} -> {r.achieved_sparsity_pct:.2f} %" for r in ltr.itertuples()})))
    collapsed = table[table["collapsed_layers"].fillna("") != ""]
    print("\nLayer collapse: " + ("none" if collapsed.empty else "; ".join(
        sorted({f"{r.method} at {r.target_sparsity_pct:.2f} % ({r.collapsed_layers})" for r in collapsed.itertuples()}))))
    print("\n### Sanity checks at 99.26 % (accuracy change against the unperturbed mask, over seeds)\n")
    print("| method | check | reference | perturbed | change | seed spread | passes |")
    print("|---|---|---|---|---|---|---|")
    for r in sanity.itertuples():
        print(f"| {r.method} | {r.check} | {r.reference_accuracy:.2f} | {r.check_accuracy:.2f} | "
              f"{r.accuracy_change:+.2f} | {r.seed_spread:.2f} | {'yes' if r.passes else 'no'} |")
    print(f"\nhardware: {'; '.join(sorted(table['hardware'].unique()))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    overrides = params(args.data.resolve(), args.seeds)
    os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
    if not args.report_only:
        for pipeline in ("compare", "sanity"):
            seconds = run(pipeline, overrides)
            print(f"pipeline {pipeline}: {seconds:.0f} s", flush=True)
    report(overrides)


if __name__ == "__main__":
    main()

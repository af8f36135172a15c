"""The README's default run, as a user gets it: `kedro run --pipelines=cts` in a fresh project
folder, timed, with its results table and per-layer kept counts written into the docs.

    python benchmarks/default_run.py               # run and print the tables (about 1-2 min)
    python benchmarks/default_run.py --write-docs  # also rewrite the marked blocks of README.md
                                                   # and docs/results.md from this run

The docs' default-run tables are never edited by hand: they sit between
`<!-- default-run:NAME:begin -->` and `<!-- default-run:NAME:end -->` markers and this script
rewrites them from the run's own `cts_results.csv` and per-branch `metrics.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from docs_blocks import replace_block

from cts_pipeline.pipelines.reporting.nodes import summary_rows

ROOT = Path(__file__).resolve().parents[1]


def newest(folder: Path, pattern: str) -> Path:
    """The newest version of a versioned artifact (``<name>/<timestamp>/<name>``)."""
    found = sorted(folder.glob(pattern + "/*/" + Path(pattern).name), key=lambda p: p.parent.name)
    if not found:
        raise SystemExit(f"the run wrote no {pattern}")
    return found[-1]


def run(project: Path) -> tuple[float, int, str]:
    shutil.copytree(ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    (project / "conf" / "local").mkdir()
    (project / "src").mkdir()
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("KEDRO_ENV", None)
    kedro = Path(sys.executable).with_name("kedro")
    started = time.perf_counter()
    done = subprocess.run([str(kedro), "run", "--pipelines=cts"], cwd=project, env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"kedro run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    output = done.stdout + done.stderr
    return seconds, len(output.splitlines()), output


def results_table(project: Path) -> str:
    table = pd.read_csv(newest(project, "data/08_reporting/default/report-*/cts_results.csv"), keep_default_na=False)
    header, rows = summary_rows(table)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell for cell in row) + " |" for row in rows]
    return "\n".join(lines) + f"\n\nhardware: {'; '.join(sorted(table['hardware'].unique()))}"


def layer_table(project: Path) -> str:
    metrics = [json.loads(p.read_text()) for p in
               sorted(project.glob("data/08_reporting/default/cts_kl-*/seed0/sp*/metrics.json/*/metrics.json"))]
    metrics.sort(key=lambda m: m["target_sparsity"])
    layers = list(metrics[0]["layer_kept"])
    totals = {n: round(metrics[0]["layer_kept"][n] / metrics[0]["layer_density"][n])
              if metrics[0]["layer_density"][n] else 0 for n in layers}
    logs = [json.loads(p.read_text()) for p in
            project.glob("data/08_reporting/default/cts_kl-*/seed0/sp*/mask_log.json/*/mask_log.json")]
    lines = ["| sparsity | " + " | ".join(f"{n.split('.')[0]} ({totals[n]:,})" for n in layers) + " |",
             "|---|" + "---|" * len(layers)]
    for m in metrics:
        cells = [f"{m['layer_kept'][n]} ({100 * m['layer_density'][n]:.2f} %)" for n in layers]
        lines.append(f"| {100 * m['target_sparsity']:.2f} % | " + " | ".join(cells) + " |")
    peaks = [g["peak_expected_over_budget"] for g in logs]
    ends = [g["final_expected_over_budget"] for g in logs]
    lines.append(f"\nGradBalance kept the expected kept count `Σσ(s)` near its budget `D = 1.1·κ·d`: it peaked at "
                 f"{min(peaks):.2f}–{max(peaks):.2f} × D and ended at {min(ends):.2f}–{max(ends):.2f} × D.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-docs", action="store_true", help="rewrite the marked blocks of the docs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        project.mkdir()
        seconds, printed_lines, _ = run(project)
        results, layers = results_table(project), layer_table(project)
        if args.write_docs:
            shutil.copy(newest(project, "data/08_reporting/default/report-*/cts_accuracy_vs_sparsity.png"),
                        ROOT / "docs" / "img" / "default_accuracy_vs_sparsity.png")
    day = datetime.date.today().isoformat()
    summary = (f"Measured on {day} by `python benchmarks/default_run.py` in a fresh project folder: "
               f"`kedro run --pipelines=cts` took **{seconds:.0f} s** wall-clock and printed "
               f"{printed_lines} lines (output not a terminal).")
    print(summary, results, layers, sep="\n\n")
    if args.write_docs:
        replace_block("README.md", "default-run:table", f"{results}\n\n{summary}")
        replace_block("docs/results.md", "default-run:table", f"{results}\n\n{summary}")
        replace_block("docs/results.md", "default-run:layers", layers)
        print("rewrote README.md and docs/results.md")


if __name__ == "__main__":
    main()

"""Join every branch's metrics into one results table and an accuracy-versus-sparsity plot."""

from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")  # reports are written to files; never open a window

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

logger = logging.getLogger(__name__)

COLUMNS = [
    "method", "seed", "target_sparsity_pct", "achieved_sparsity_pct", "kept_weights", "prunable_weights",
    "test_accuracy", "dense_test_accuracy", "accuracy_drop", "to_rewind_s", "find_mask_s", "retrain_s",
    "total_s", "collapsed_layers", "model", "dataset", "rewind_epoch", "hardware",
]


def results_table(*metrics: dict) -> pd.DataFrame:
    """One row per (method, seed, sparsity), dense references first; accuracies in %."""
    rows = []
    for m in metrics:
        dense = m["method"] == "dense"
        seconds = m["seconds"]
        rows.append({
            "method": m["method"],
            "seed": m["seed"],
            "target_sparsity_pct": 0.0 if dense else 100 * m["target_sparsity"],
            "achieved_sparsity_pct": 100 * m["achieved_sparsity"],
            "kept_weights": m["kept_weights"],
            "prunable_weights": m["prunable_weights"],
            "test_accuracy": m["test_accuracy"],
            "dense_test_accuracy": m["test_accuracy"] if dense else m["dense_test_accuracy"],
            "accuracy_drop": 0.0 if dense else m["dense_test_accuracy"] - m["test_accuracy"],
            "to_rewind_s": seconds["to_rewind"],
            "find_mask_s": 0.0 if dense else seconds["find_mask"],
            "retrain_s": seconds["train"] if dense else seconds["retrain"],
            "total_s": seconds["train"] if dense else seconds["total"],
            "collapsed_layers": "" if dense else ";".join(m["collapsed_layers"]),
            "model": m["model"],
            "dataset": m["dataset"],
            "rewind_epoch": m["rewind_epoch"],
            "hardware": m["hardware"],
        })
    table = pd.DataFrame(rows, columns=COLUMNS)
    order = table["method"].ne("dense")
    return (table.assign(_dense_last=order)
            .sort_values(["_dense_last", "method", "target_sparsity_pct", "seed"])
            .drop(columns="_dense_last").reset_index(drop=True))


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds per (method, target sparsity): what the printed report shows."""
    grouped = table.groupby(["method", "target_sparsity_pct"], sort=False)
    out = grouped.agg(
        seeds=("seed", "count"),
        achieved_sparsity_pct=("achieved_sparsity_pct", "mean"),
        kept_weights=("kept_weights", "mean"),
        acc_mean=("test_accuracy", "mean"),
        acc_std=("test_accuracy", "std"),
        find_mask_s=("find_mask_s", "mean"),
        retrain_s=("retrain_s", "mean"),
        total_s=("total_s", "mean"),
        collapsed=("collapsed_layers", lambda c: int((c != "").sum())),
    ).reset_index()
    out["acc_std"] = out["acc_std"].fillna(0.0)
    return out


def summary_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The printed summary: header and formatted rows (accuracy as mean ± std when seeds > 1)."""
    header = ["method", "sparsity %", "achieved %", "kept", "seeds", "test acc %", "find mask s",
              "retrain s", "total s", "note"]
    rows = []
    for r in summary(table).itertuples():
        acc = f"{r.acc_mean:.2f} ± {r.acc_std:.2f}" if r.seeds > 1 else f"{r.acc_mean:.2f}"
        note = f"layer collapse ({r.collapsed} seed(s))" if r.collapsed else ""
        rows.append([r.method, f"{r.target_sparsity_pct:.2f}", f"{r.achieved_sparsity_pct:.2f}",
                     f"{r.kept_weights:.0f}", str(r.seeds), acc, f"{r.find_mask_s:.1f}",
                     f"{r.retrain_s:.1f}", f"{r.total_s:.1f}", note])
    return header, rows


def format_summary(table: pd.DataFrame) -> str:
    """The summary as fixed-width text (logs, docs)."""
    header, rows = summary_rows(table)
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths, strict=True)))
             for line in [header, *rows]]
    hardware = "; ".join(sorted(table["hardware"].unique()))
    return "\n".join(lines) + f"\nhardware: {hardware}"


def accuracy_plot(table: pd.DataFrame, title: str) -> Figure:
    """Test accuracy against sparsity (log-scaled density axis), dense accuracy as a reference."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    dense = table[table["method"] == "dense"]["test_accuracy"]
    if len(dense):
        ax.axhline(dense.mean(), color="black", lw=1, ls="--", label=f"dense ({dense.mean():.2f} %)")
        if len(dense) > 1:
            ax.axhspan(dense.min(), dense.max(), color="black", alpha=0.08)
    for method, rows in summary(table[table["method"] != "dense"]).groupby("method", sort=False):
        density = 100 - rows["target_sparsity_pct"]
        ax.errorbar(density, rows["acc_mean"], yerr=rows["acc_std"], marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.xaxis.set_major_formatter(FuncFormatter(lambda d, _: f"{100 - d:.4g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda d, _: ""))
    ticks = sorted(set(100 - table.loc[table["method"] != "dense", "target_sparsity_pct"]))
    if ticks:
        ax.set_xticks(ticks)
    ax.set_xlabel("sparsity (% of prunable weights removed)")
    ax.set_ylabel("test accuracy (%, last epoch)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def build_report(*metrics: dict) -> tuple[pd.DataFrame, Figure]:
    """The results table and the plot for all branches; logs the summary table."""
    table = results_table(*metrics)
    first = metrics[0]
    title = f"{first['dataset']} / {first['model']}, rewind epoch {first['rewind_epoch']}"
    logger.info("Results of %d branches (%s): see the table printed at the end of the run", len(table), title)
    return table, accuracy_plot(table, title)



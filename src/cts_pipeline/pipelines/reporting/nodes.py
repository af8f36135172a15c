"""Join every branch's metrics into tables and plots: accuracy against sparsity (dense as a band),
accuracy against wall-clock, and per-layer density at one sparsity."""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Mapping, Sequence

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from ...config.sections import ReportConfig
from ...core.nets.selection import describe

logger = logging.getLogger(__name__)

# Which run wrote a table (``framework/provenance.run_identity`` gives these keys).
RUN_COLUMNS = ("run", "preset", "commit")
COLUMNS = [
    "method", "family", "seed", "target_sparsity_pct", "achieved_sparsity_pct", "kept_weights",
    "effective_kept_weights", "disconnected", "diverged", "prunable_weights", "prunable_layers", "prunable", "test_accuracy", "dense_test_accuracy", "accuracy_drop", "to_rewind_s", "find_mask_s",
    "retrain_s", "total_s", "eval_s", "collapsed_layers", "thin_layers", "start", "model", "dataset", "rewind_epoch", "search_path",
    "retrain_path", "search_shared_by", "find_mask_group_s", "search_group_id", "retrain_shared_by",
    "retrain_group_s", "retrain_group_id", "dense_shared_by", "test_images", "hardware", *RUN_COLUMNS,
]


def results_table(metrics: Sequence[Mapping], run: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per (method, seed, sparsity), dense references first; accuracies in %. ``run``
    (:func:`~cts_pipeline.framework.provenance.run_identity`) fills the ``run``, ``preset`` and
    ``commit`` columns: which run wrote the table, so two runs' copied CSVs are told apart."""
    rows = []
    for m in metrics:
        dense = m["method"] == "dense"
        seconds = m["seconds"]
        rows.append({
            "method": m["method"],
            "family": m.get("family", "dense"),
            "seed": m["seed"],
            # Rounded past float noise (100 * 0.8926 = 89.25999999999999), far below a weight's share.
            "target_sparsity_pct": 0.0 if dense else round(100 * m["target_sparsity"], 8),
            "achieved_sparsity_pct": round(100 * m["achieved_sparsity"], 8),
            "kept_weights": m["kept_weights"],
            # Kept weights on some input-output path (dense: all of them).
            "effective_kept_weights": m.get("effective_kept_weights", m["kept_weights"]),
            "disconnected": bool(m.get("disconnected", False)),
            "diverged": bool(m.get("diverged")),
            "prunable_weights": m["prunable_weights"],
            "prunable_layers": m.get("prunable_layers"),  # (records written before model.prunable: none)
            "prunable": m.get("prunable", describe(None)),
            "test_accuracy": m["test_accuracy"],
            "dense_test_accuracy": m["test_accuracy"] if dense else m["dense_test_accuracy"],
            "accuracy_drop": 0.0 if dense else m["dense_test_accuracy"] - m["test_accuracy"],
            "to_rewind_s": seconds["to_rewind"],
            "find_mask_s": 0.0 if dense else seconds["find_mask"],
            # From θ_k to the end: the ticket's retraining, or the dense training's rest, so that
            # every row's total is to_rewind + find_mask + retrain.
            "retrain_s": seconds["train"] - seconds["to_rewind"] if dense else seconds["retrain"],
            "total_s": seconds["train"] if dense else seconds["total"],
            # Test evaluations, timed apart: some stages evaluate every epoch, others once.
            "eval_s": (seconds.get("test_during_training", 0.0) if dense
                       else seconds.get("test_during_retrain", 0.0) + seconds.get("evaluate", 0.0)),
            "collapsed_layers": "" if dense else ";".join(m["collapsed_layers"]),
            "thin_layers": "" if dense else ";".join(f"{n}:{k}" for n, k in m.get("thin_layers", {}).items()),
            "start": m.get("start", "init"),
            "model": m["model"],
            "dataset": m["dataset"],
            "rewind_epoch": m["rewind_epoch"],
            # How the stage times were earned: a CTS search's rows (single, stacked, vmap; "/ N
            # micro-batches" where memory cut the batch) and a retraining (single, stacked xK).
            "search_path": _search_path(m),
            "retrain_path": m.get("retrain_path") or "",
            # find_mask_s and retrain_s are a ticket's share where K tickets were made in one
            # wall-clock (a batched search, a stacked retraining): the whole of it, and its group.
            "search_shared_by": m.get("search_shared_by", 1),
            "find_mask_group_s": seconds.get("find_mask_group", 0.0 if dense else seconds["find_mask"]),
            "search_group_id": m.get("search_group_id") or "",
            "retrain_shared_by": m.get("retrain_shared_by", 1),
            "retrain_group_s": seconds.get("retrain_group", seconds["train"] - seconds["to_rewind"] if dense else seconds["retrain"]),
            "retrain_group_id": m.get("retrain_group_id") or "",
            # The seeds whose dense runs trained as one stacked network (runtime.stack_seeds): a dense
            # row's times, and so every ticket's to_rewind_s, are then its 1/S share.
            "dense_shared_by": m.get("dense_shared_by", 1),
            "test_images": m.get("test_images"),  # one image is 100 / test_images points of accuracy
            "hardware": m["hardware"],
            **{key: (run or {}).get(key, "") for key in RUN_COLUMNS},
        })
    table = pd.DataFrame(rows, columns=COLUMNS)
    return (table.assign(_dense_last=table["method"].ne("dense"))
            .sort_values(["_dense_last", "method", "target_sparsity_pct", "seed"], kind="stable")
            .drop(columns="_dense_last").reset_index(drop=True))


def _search_path(m: Mapping) -> str:
    path = m.get("search_path")
    if not path:
        return ""
    pieces = m.get("search_micro_batches") or 1
    return path if pieces == 1 else f"{path} / {pieces} micro-batches"


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds per (method, target sparsity), in first-seen order."""
    # Tables written before effective sparsity was reported have no such columns.
    defaults = {"effective_kept_weights": table["kept_weights"], "disconnected": False, "diverged": False}
    table = table.assign(**{k: v for k, v in defaults.items() if k not in table})
    grouped = table.groupby(["method", "target_sparsity_pct"], sort=False)
    out = grouped.agg(
        seeds=("seed", "count"),
        achieved_sparsity_pct=("achieved_sparsity_pct", "mean"),
        kept_weights=("kept_weights", "mean"),
        test_accuracy_mean=("test_accuracy", "mean"),
        test_accuracy_std=("test_accuracy", "std"),
        to_rewind_s=("to_rewind_s", "mean"),
        find_mask_s=("find_mask_s", "mean"),
        retrain_s=("retrain_s", "mean"),
        total_s=("total_s", "mean"),
        # A table read back from CSV holds NaN, not "", where no layer collapsed.
        collapsed_seeds=("collapsed_layers", lambda c: int((c.astype("string").fillna("") != "").sum())),
        effective_kept_weights=("effective_kept_weights", "mean"),
        disconnected_seeds=("disconnected", lambda c: int(c.astype(str).str.lower().eq("true").sum())),
        diverged_seeds=("diverged", lambda c: int(c.astype(str).str.lower().eq("true").sum())),
    ).reset_index()
    # One seed has no spread: its std stays NaN (empty in the CSV), never a 0.0 that reads as agreement.
    return out


def summary_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The printed summary: header and formatted rows (accuracy as mean ± std when seeds > 1).

    The total shown is the sum of the three times shown, each rounded to 0.1 s as printed, so the
    columns add up on screen (the CSV keeps the exact seconds); ``rewind s`` is the dense training
    to θ_k that every ticket of a seed starts from (0 for LTR, whose mask time holds it)."""
    header = ["method", "sparsity %", "achieved %", "kept", "effective", "seeds", "test acc %", "rewind s",
              "mask s", "retrain s", "total s", "note"]
    rows = []
    for r in summary(table).itertuples():
        acc = (f"{r.test_accuracy_mean:.2f} ± {r.test_accuracy_std:.2f}" if r.seeds > 1
               else f"{r.test_accuracy_mean:.2f}")
        note = f"LAYER COLLAPSE ({r.collapsed_seeds} of {r.seeds} seeds)" if r.collapsed_seeds else ""
        if r.disconnected_seeds > r.collapsed_seeds:
            note = f"DISCONNECTED ({r.disconnected_seeds} of {r.seeds} seeds)"
        if r.diverged_seeds:
            note = f"DIVERGED ({r.diverged_seeds} of {r.seeds} seeds)" + (f"; {note}" if note else "")
        times = [round(t, 1) for t in (r.to_rewind_s, r.find_mask_s, r.retrain_s)]
        rows.append([r.method, f"{r.target_sparsity_pct:.2f}", f"{r.achieved_sparsity_pct:.2f}",
                     f"{r.kept_weights:.0f}", f"{r.effective_kept_weights:.0f}", str(r.seeds), acc,
                     *(f"{t:.1f}" for t in times), f"{sum(times):.1f}", note])
    return header, rows


def shared_time_notes(table: pd.DataFrame) -> list[str]:
    """Per method whose tickets shared a wall-clock, one line saying so, with the group's real time
    (mean over seeds): the table's find-mask and retrain seconds are then shares of it."""
    notes = []
    dense = table[table["method"].eq("dense")]
    if "dense_shared_by" in dense and (dense["dense_shared_by"].fillna(1) > 1).any():
        notes.append(f"dense: times are each seed's share of one stacked training of "
                     f"{int(dense['dense_shared_by'].max())} seeds ({dense['total_s'].sum():.1f} s)")
    for method, rows in table[~table["method"].eq("dense")].groupby("method", sort=False):
        parts = []
        for stage, count, whole, group_id in (("search", "search_shared_by", "find_mask_group_s", "search_group_id"),
                                              ("retraining", "retrain_shared_by", "retrain_group_s",
                                               "retrain_group_id")):
            if count not in rows or not (rows[count].fillna(1) > 1).any():
                continue
            groups = rows[rows[count] > 1].drop_duplicates(group_id)
            # Over the seeds: a group may hold one seed's tickets or (runtime.stack_seeds) every seed's.
            seconds = groups[whole].sum() / _seeds_in(rows, group_id, groups)
            parts.append(f"one {stage} of {int(groups[count].max())} ({seconds:.1f} s a seed)")
        if parts:
            notes.append(f"{method}: times are each ticket's share of {' and '.join(parts)}")
    return notes


def _seeds_in(rows: pd.DataFrame, group_id: str, groups: pd.DataFrame) -> int:
    """How many seeds the shared ``groups`` made tickets for."""
    return max(1, rows[rows[group_id].isin(groups[group_id])]["seed"].nunique())


def format_summary(table: pd.DataFrame) -> str:
    """The summary as fixed-width text (logs, docs)."""
    header, rows = summary_rows(table)
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(line, widths, strict=True))).rstrip()
             for line in [header, *rows]]
    hardware = "; ".join(sorted(table["hardware"].unique()))
    notes = [*shared_time_notes(table), test_set_note(table)]
    return "\n".join([*lines, *[n for n in notes if n], f"hardware: {hardware}"])


def _figure(width: float, height: float):
    """A figure outside pyplot: no GUI backend, no global figure registry to leak into."""
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots()


def seeds_label(method: str, seeds: pd.Series, also: str = "") -> str:
    """A legend entry that says over how many seeds its points are means: ``cts_kl (n = 3)``, or
    ``(n = 1–3)`` where the sparsities had different counts; ``also`` follows n in the brackets."""
    low, high = int(seeds.min()), int(seeds.max())
    n = f"n = {low}" if low == high else f"n = {low}–{high}"
    return f"{method} ({n}{'; ' + also if also else ''})"


def _dense_band(ax, table: pd.DataFrame) -> None:
    dense = table[table["method"] == "dense"]["test_accuracy"]
    if len(dense):
        ax.axhline(dense.mean(), color="black", lw=1, ls="--", label=f"dense ({dense.mean():.2f} %, n = {len(dense)})")
        if len(dense) > 1:
            ax.axhspan(dense.mean() - dense.std(), dense.mean() + dense.std(), color="black", alpha=0.08)


def test_set_note(table: pd.DataFrame) -> str:
    """How coarse the accuracies are: the test set's size and what one image is worth."""
    sizes = sorted({int(n) for n in table.get("test_images", pd.Series(dtype=float)).dropna()})
    if len(sizes) != 1:
        return ""
    return f"{sizes[0]:,} test images: one is {100 / sizes[0]:.2g} points"


def _finish(fig: Figure, ax, xlabel: str, title: str, table: pd.DataFrame | None = None) -> Figure:
    # Wrapped to the figure's size (8 x 5 in at 10 pt): an unwrapped label is cut at both ends.
    ax.set_xlabel(textwrap.fill(xlabel, 95))
    note = test_set_note(table) if table is not None else ""
    ax.set_ylabel(textwrap.fill(f"test accuracy (%, last epoch{'; ' + note if note else ''})", 50))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def accuracy_plot(table: pd.DataFrame, title: str) -> Figure:
    """Test accuracy against sparsity (log-scaled density axis), dense accuracy as a band (±1 std)."""
    fig, ax = _figure(8, 5)
    _dense_band(ax, table)
    for method, rows in summary(table[table["method"] != "dense"]).groupby("method", sort=False):
        ax.errorbar(100 - rows["target_sparsity_pct"], rows["test_accuracy_mean"],
                    yerr=rows["test_accuracy_std"].fillna(0.0), marker="o", capsize=3,
                    label=seeds_label(method, rows["seeds"]))  # (one seed: no bar, and n = 1 says so)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.xaxis.set_major_formatter(FuncFormatter(lambda d, _: f"{100 - d:.4g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda d, _: ""))
    ticks = sorted(set(100 - table.loc[table["method"] != "dense", "target_sparsity_pct"]))
    if ticks:
        ax.set_xticks(ticks)
    return _finish(fig, ax, "sparsity (% of prunable weights removed)", title, table)


def _log_seconds_axis(ax) -> None:
    """A log-scaled seconds axis with plain 1-2-5 ticks ("20", "50"), spanning at least a factor of
    5 so that it always has two of them (matplotlib's default labels a narrow range "1.8x10^1")."""
    from matplotlib.ticker import LogLocator, NullLocator

    ax.set_xscale("log")
    low, high = ax.get_xlim()
    if high < 5 * low:
        middle = (low * high) ** 0.5
        low, high = middle / 5 ** 0.5, middle * 5 ** 0.5
        ax.set_xlim(low, high)
    ax.set_xlim(low, high * 1.15)  # room for the rightmost point's label
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def time_plot(table: pd.DataFrame, title: str) -> Figure:
    """Test accuracy against the cumulative wall-clock of the grid up to each ticket (dense
    training to θ_k once, then each mask and retraining, the grid walked from the lowest sparsity
    up), means ± std over seeds. A batched group's time is spread evenly over its tickets, so its
    points do not pile up at one x; the grid-cost plot counts it once instead."""
    fig, ax = _figure(8, 5)
    _dense_band(ax, table)
    costs = grid_cost(table, shared="spread")
    for method, rows in costs.groupby("method", sort=False):
        means = rows.groupby("target_sparsity_pct", sort=True).agg(
            seconds=("cumulative_s", "mean"), accuracy=("test_accuracy", "mean"), std=("test_accuracy", "std"),
            seeds=("test_accuracy", "count"))
        ax.errorbar(means["seconds"], means["accuracy"], yerr=means["std"].fillna(0.0), marker="o", ls="",
                    capsize=3, label=seeds_label(method, means["seeds"]))
        _label_points(ax, means["seconds"], means["accuracy"])
    _log_seconds_axis(ax)
    return _finish(fig, ax, "cumulative wall-clock up to this ticket, s (log; a batched search or retraining "
                   "shared evenly by its tickets; labels: sparsity %)", title, table)


def _label_points(ax, x: pd.Series, y: pd.Series) -> None:
    """Each point labelled with its sparsity (the series' index); points that coincide on the
    plot (a batched group paid once, equal accuracies) share one label, "89.26, 95.60", instead
    of printing over each other."""
    labels: dict[tuple[float, float], list[str]] = {}
    for sparsity, (px, py) in zip(x.index, zip(x, y, strict=True), strict=True):
        labels.setdefault((round(float(px), 3), round(float(py), 2)), []).append(f"{sparsity:.2f}")
    for (px, py), names in labels.items():
        ax.annotate(", ".join(names), (px, py), fontsize=8, xytext=(4, 3), textcoords="offset points")


def grid_cost(table: pd.DataFrame, shared: str = "once") -> pd.DataFrame:
    """Per method and seed, the wall-clock to produce its tickets at every grid sparsity, and the
    running total as the grid is walked from the lowest sparsity up (``cumulative_s`` per ticket).

    A ticket's own cost is finding its mask plus its retraining. Where K tickets came out of one
    wall-clock (a batched search, a stacked retraining), ``shared="once"`` pays that whole time at
    the group's first ticket and nothing at the others, which is what producing the grid costs;
    ``"spread"`` pays each ticket its 1/K share, so the points of a group spread over its time
    (the accuracy-versus-time plot). Tables without the group columns fall back to the shares. The
    dense training to θ_k is counted once per method and seed. LTR's masks are nested, so reaching
    its deepest level pays for every shallower one: its cost is the deepest ticket's cumulative
    ``find_mask_s`` (dense training included) plus the retrainings. Sanity checks are not methods
    and are left out.
    """
    if shared not in ("once", "spread"):
        raise ValueError(f"shared must be 'once' or 'spread', got {shared!r}")
    rows = []
    tickets = table[~table["method"].eq("dense") & ~table["family"].eq("sanity")]
    for (method, seed), group in tickets.groupby(["method", "seed"], sort=False):
        group = group.sort_values("target_sparsity_pct")
        retrain = _paid(group, "retrain_s", "retrain_group_s", "retrain_group_id", shared).cumsum()
        if (group["family"] == "ltr").all():
            cumulative = group["find_mask_s"] + retrain
        else:
            find = _paid(group, "find_mask_s", "find_mask_group_s", "search_group_id", shared)
            cumulative = group["to_rewind_s"].max() + find.cumsum() + retrain
        for r, total in zip(group.itertuples(), cumulative, strict=True):
            rows.append({"method": method, "seed": seed, "target_sparsity_pct": r.target_sparsity_pct,
                         "test_accuracy": r.test_accuracy, "cumulative_s": float(total)})
    out = pd.DataFrame(rows, columns=["method", "seed", "target_sparsity_pct", "test_accuracy", "cumulative_s"])
    out["grid_cost_s"] = out.groupby(["method", "seed"], sort=False)["cumulative_s"].transform("max")
    return out


def _paid(group: pd.DataFrame, share: str, whole: str, group_id: str, shared: str) -> pd.Series:
    """What reaching each ticket (in walk order) costs of one stage: its share, or under
    ``shared="once"`` a group's whole time at its first ticket and nothing at the rest."""
    if shared == "spread" or whole not in group or group_id not in group:
        return group[share]
    seen: set[str] = set()
    paid = []
    ids = group[group_id].astype("string").fillna("")  # read back from CSV: NaN where no group
    for gid, own, total in zip(ids, group[share], group[whole], strict=True):
        if not gid:
            paid.append(own)
        elif gid in seen:
            paid.append(0.0)
        else:
            seen.add(gid)
            paid.append(total)
    return pd.Series(paid, index=group.index, dtype=float)


def grid_cost_plot(table: pd.DataFrame, title: str) -> Figure:
    """Accuracy at each grid sparsity against the cumulative cost of producing the grid up to it
    (means over seeds): how much a whole accuracy-versus-sparsity curve costs, method by method."""
    fig, ax = _figure(8, 5)
    _dense_band(ax, table)
    costs = grid_cost(table)
    for method, rows in costs.groupby("method", sort=False):
        means = rows.groupby("target_sparsity_pct", sort=True)[["cumulative_s", "test_accuracy"]].mean()
        seeds = rows.groupby("target_sparsity_pct", sort=True)["test_accuracy"].count()
        # One batched wall-clock for the whole grid puts every point at one x: points, not a line.
        line = "-" if means["cumulative_s"].round(6).nunique() > 1 else ""
        ax.plot(means["cumulative_s"], means["test_accuracy"], marker="o", ls=line, label=seeds_label(
            method, seeds, also=f"grid: {rows.groupby('seed')['grid_cost_s'].max().mean():.0f} s"))
        _label_points(ax, means["cumulative_s"], means["test_accuracy"])
    if costs.empty:
        ax.text(0.5, 0.5, "no method tickets to cost", ha="center", transform=ax.transAxes)
    else:
        _log_seconds_axis(ax)
    return _finish(fig, ax, "cumulative wall-clock to produce the grid up to this sparsity, s (log; a batched "
                   "search or retraining paid once, at its first ticket; labels: sparsity %)", title, table)


def ticket_layer_plot(metrics: Mapping) -> Figure:
    """One ticket's per-layer density as one bar chart (a bar per layer, log scale), with the
    overall density as a line: its MLflow child's picture of where the kept weights are."""
    density = metrics.get("layer_density") or {}
    fig, ax = _figure(max(6.0, 0.35 * len(density) + 2), 4)
    layers = list(density)
    heights = [max(float(density[n]), 1e-6) for n in layers]
    ax.bar(range(len(layers)), heights, color="tab:blue")
    overall = metrics.get("achieved_density")
    if overall is not None:
        ax.axhline(float(overall), color="black", lw=1, ls="--", label=f"overall density {100 * float(overall):.2f} %")
        ax.legend(fontsize="small")
    ax.set_yscale("log")
    # Whole decades from below the smallest bar to 1: bar lengths compare, the ticks read 10^-k.
    ax.set_ylim(10 ** math.floor(math.log10(min(heights, default=1.0) / 2)), 1.0)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([n.removesuffix(".weight") for n in layers], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("fraction of the layer's weights kept\n(log; 1e-6 = layer collapse)")
    name = f"{metrics.get('method')} seed {metrics.get('seed')}"
    if metrics.get("sparsity") is not None:
        name += f" at {100 * float(metrics['sparsity']):.2f} % sparsity"
    ax.set_title(f"per-layer density: {name}")
    ax.grid(alpha=0.3, axis="y")
    return fig


def layer_density_plot(metrics: Sequence[Mapping], sparsity: float | None, title: str) -> Figure:
    """Per-layer density of each method's masks at one sparsity (mean over seeds), log scale."""
    tickets = [m for m in metrics if m["method"] != "dense"]
    available = sorted({round(m["target_sparsity"], 6) for m in tickets})
    fig, ax = _figure(9, 5)
    if not available:
        ax.set_title(f"{title}: no tickets")
        return fig
    chosen = min(available, key=lambda s: abs(s - sparsity)) if sparsity is not None else available[-1]
    chosen_metrics = [m for m in tickets if round(m["target_sparsity"], 6) == chosen]
    layers = list(chosen_metrics[0]["layer_density"])
    methods = list(dict.fromkeys(m["method"] for m in chosen_metrics))
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        rows = [m["layer_density"] for m in chosen_metrics if m["method"] == method]
        means = [sum(r[layer] for r in rows) / len(rows) for layer in layers]
        ax.bar([j + i * width for j in range(len(layers))], [max(v, 1e-6) for v in means], width, label=method)
    ax.axhline(1 - chosen, color="black", lw=1, ls="--", label=f"overall density {100 * (1 - chosen):.2f} %")
    ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))])
    ax.set_xticklabels([layer.removesuffix(".weight") for layer in layers], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("fraction of the layer's weights kept (log; 1e-6 = layer collapse)")
    ax.set_title(f"{title}: per-layer density at {100 * chosen:.2f} % sparsity")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    return fig


def build_report(report: ReportConfig, run: Mapping[str, str], *metrics: dict) -> tuple[
        pd.DataFrame, pd.DataFrame, pd.DataFrame, Figure, Figure, Figure, Figure]:
    """Results table, mean ± std summary, whole-grid cost, and the four plots for all branches of a
    pipeline; ``run`` (run, preset, commit) names the run in every row of the table."""
    table = results_table(metrics, run)
    first = metrics[0]
    title = f"{first['dataset']} / {first['model']}, rewind epoch {first['rewind_epoch']}"
    collapsed = table[table["collapsed_layers"] != ""]
    for r in collapsed.itertuples():
        logger.warning("layer collapse: %s seed %d at %.2f %% sparsity leaves no weight in %s",
                       r.method, r.seed, r.target_sparsity_pct, r.collapsed_layers)
    logger.info("Results of %d runs (%s): the summary is printed at the end of the run", len(table), title)
    return (
        table,
        summary(table),
        grid_cost(table),
        accuracy_plot(table, title),
        time_plot(table, title),
        grid_cost_plot(table, title),
        layer_density_plot(metrics, report.layer_density_sparsity, title),
    )

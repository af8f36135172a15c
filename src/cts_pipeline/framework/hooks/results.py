"""The results tables printed at the end of a run, read from the catalog in the driver."""

from __future__ import annotations

import time
from typing import Any

from kedro.framework.hooks import hook_impl

from .catalog import RESULT_TABLE_SUFFIX, load_fresh, shown_path


class ResultsPrinterHook:
    """Print each report's summary when the run ends (a log line would be wrapped and lost), then
    one line with the run's whole wall-clock.

    The tables are read from the catalog, so the summary appears under every runner, and also
    when ``--only-missing-outputs`` had nothing left to compute.
    """

    def __init__(self) -> None:
        self.started: float | None = None

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self) -> None:
        self.started = time.perf_counter()

    @hook_impl(trylast=True)  # after the MLflow run is closed: the last thing the run prints
    def after_pipeline_run(self, run_params, pipeline, catalog) -> None:
        tables, files = {}, {}
        for node in pipeline.nodes:
            if "report" in node.tags:
                for name in node.outputs:
                    if (name.endswith(RESULT_TABLE_SUFFIX) or name == "sanity_table") and catalog.exists(name):
                        tables[name] = load_fresh(catalog, name)
                        files[name] = shown_path(catalog, name)
        console = _console()
        if tables:
            print_tables(tables, files, console)
        if self.started is not None:
            pipelines = "+".join(run_params.get("pipeline_names") or ["__default__"])
            console.print(f"kedro run ({pipelines}): {time.perf_counter() - self.started:.1f} s wall-clock in all",
                          highlight=False)


def _console():
    """A terminal's own width; off one, as wide as a line needs (nothing wraps a log file)."""
    from rich.console import Console

    terminal = Console()
    return terminal if terminal.is_terminal else Console(width=OFF_TERMINAL_WIDTH)


# Off a terminal no column is left out of a table: its lines may be as long as they need.
OFF_TERMINAL_WIDTH = 240
# Which columns a narrow terminal loses first (all of them stay in the CSV); the note moves under
# the table instead, one line per noted row.
LEAVE_OUT_FIRST = ("achieved %", "effective", "note", "kept", "seeds")


def fit_columns(header: list[str], rows: list[list[str]], width: int) -> list[str]:
    """The columns of a rich table (heavy head: three characters of border and padding per
    column, one more at the end) that fit ``width`` without wrapping a cell, leaving out
    :data:`LEAVE_OUT_FIRST` in order until they do; what still does not fit is left to rich."""
    from rich.cells import cell_len

    sizes = {h: max(cell_len(cell) for cell in [h, *(r[i] for r in rows)]) for i, h in enumerate(header)}
    shown = list(header)
    for column in LEAVE_OUT_FIRST:
        if sum(sizes[h] + 3 for h in shown) + 1 <= width:
            break
        if column in shown:
            shown.remove(column)
    return shown


def print_tables(tables: dict[str, Any], files: dict[str, str] | None = None, console=None) -> None:
    from rich.table import Table

    from ...pipelines.reporting.nodes import shared_time_notes, summary_rows, test_set_note

    console = console or _console()
    files = files or {}
    for name, table in tables.items():
        if name == "sanity_table":
            header = list(table.columns)
            rows = [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in r] for r in table.itertuples(index=False)]
            title = "sanity checks (a method passes when the check costs accuracy beyond the seed spread)"
        else:
            header, rows = summary_rows(table)
            if not any(row[-1] for row in rows):  # no note to show: its column's width goes to the numbers
                header, rows = header[:-1], [row[:-1] for row in rows]
            title = f"{name.removesuffix(RESULT_TABLE_SUFFIX)}: last-epoch test accuracy, mean ± std over seeds"
        shown = fit_columns(header, rows, console.width)
        out = Table(title=title, title_justify="left")
        for column in shown:
            out.add_column(column, justify="left" if column in (header[0], "note") else "right")
        for row in rows:
            out.add_row(*(cell for column, cell in zip(header, row, strict=True) if column in shown))
        console.print(out)
        lines = []
        if "note" in header and "note" not in shown:
            at = header.index("note")
            lines += [f"note: {' '.join(row[:2])} %: {row[at]}" for row in rows if row[at]]
        left_out = [h for h in header if h not in shown and h != "note"]
        if left_out:  # soft-wrapped: the terminal folds the path, and a copy of it stays whole
            console.print(f"left out at {console.width} columns: {', '.join(left_out)}; every column is in "
                          f"{files.get(name, name)}", soft_wrap=True, highlight=False)
        if name != "sanity_table":
            lines += [note for note in [*shared_time_notes(table), test_set_note(table)] if note]
        if "hardware" in table:
            lines.append(f"hardware: {'; '.join(sorted(table['hardware'].unique()))}")
        for line in lines:
            console.print(line, highlight=False)

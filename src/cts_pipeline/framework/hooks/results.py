"""The results tables printed at the end of a run, read from the catalog in the driver."""

from __future__ import annotations

from typing import Any

from kedro.framework.hooks import hook_impl

from .catalog import RESULT_TABLE_SUFFIX, load_fresh


class ResultsPrinterHook:
    """Print each report's summary when the run ends (a log line would be wrapped and lost).

    The tables are read from the catalog, so the summary appears under every runner, and also
    when ``--only-missing-outputs`` had nothing left to compute.
    """

    @hook_impl
    def after_pipeline_run(self, pipeline, catalog) -> None:
        tables = {}
        for node in pipeline.nodes:
            if "report" in node.tags:
                for name in node.outputs:
                    if (name.endswith(RESULT_TABLE_SUFFIX) or name == "sanity_table") and catalog.exists(name):
                        tables[name] = load_fresh(catalog, name)
        if tables:
            print_tables(tables)


def print_tables(tables: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from ...pipelines.reporting.nodes import shared_time_notes, summary_rows, test_set_note

    # A terminal's own width (rich fits the columns, wrapping headers); off one, wide enough for
    # every column on one line, since nothing wraps a log file's lines.
    terminal = Console()
    console = terminal if terminal.is_terminal else Console(width=140)
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
        out = Table(title=title, title_justify="left")
        for i, column in enumerate(header):
            out.add_column(column, justify="left" if i == 0 or column == "note" else "right")
        for row in rows:
            out.add_row(*row)
        console.print(out)
        if name != "sanity_table":
            for note in [*shared_time_notes(table), test_set_note(table)]:
                if note:
                    console.print(note, soft_wrap=True, highlight=False)
        if "hardware" in table:
            console.print(f"hardware: {'; '.join(sorted(table['hardware'].unique()))}")

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

    from ..pipelines.reporting.nodes import summary_rows

    console = Console(width=max(Console().width, 140))
    for name, table in tables.items():
        if name == "sanity_table":
            header = list(table.columns)
            rows = [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in r] for r in table.itertuples(index=False)]
            title = "sanity checks (a method passes when the check costs accuracy beyond the seed spread)"
        else:
            header, rows = summary_rows(table)
            title = f"{name.removesuffix(RESULT_TABLE_SUFFIX)}: last-epoch test accuracy, mean ± std over seeds"
        out = Table(title=title, title_justify="left")
        for i, column in enumerate(header):
            out.add_column(column, justify="left" if i in (0, len(header) - 1) else "right")
        for row in rows:
            out.add_row(*row)
        console.print(out)
        if "hardware" in table:
            console.print(f"hardware: {'; '.join(sorted(table['hardware'].unique()))}")

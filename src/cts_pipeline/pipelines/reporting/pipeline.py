from kedro.pipeline import Pipeline, node

from .nodes import build_report


def create_pipeline(report: str, metrics: list[str]) -> Pipeline:
    """``<report>_results_table``, ``<report>_summary_table`` and ``<report>_grid_cost_table`` (CSV),
    and the accuracy, time, whole-grid cost and per-layer density plots (PNG), from the given metrics."""
    return Pipeline([
        node(
            build_report,
            ["params:report", "run_identity", *metrics],
            [f"{report}_results_table", f"{report}_summary_table", f"{report}_grid_cost_table",
             f"{report}_accuracy_plot", f"{report}_time_plot", f"{report}_grid_cost_plot",
             f"{report}_layer_density_plot"],
            name=f"{report}_report",
            tags="report",
        )
    ])

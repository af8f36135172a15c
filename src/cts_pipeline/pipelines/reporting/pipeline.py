from kedro.pipeline import Pipeline, node

from .nodes import build_report


def create_pipeline(report: str, metrics: list[str]) -> Pipeline:
    """``<report>_results_table`` (CSV) and ``<report>_accuracy_plot`` (PNG) from the given metrics."""
    return Pipeline([
        node(
            build_report,
            metrics,
            [f"{report}_results_table", f"{report}_accuracy_plot"],
            name=f"{report}_report",
            tags="report",
        )
    ])

from collections.abc import Mapping

from kedro.pipeline import Pipeline, node

from ...grid import GridConfig, cts_method_name, method_branches
from ..tickets.pipeline import create_pipeline as ticket_pipeline
from .nodes import extract_mask, search_mask

SHARED_PARAMETERS = {"params:model", "params:training", "params:cts", "params:runtime"}


def create_pipeline(grid: GridConfig, cts: Mapping) -> tuple[Pipeline, list[str]]:
    """One branch per (seed, sparsity): search -> binary mask -> retrain -> evaluate.

    Returns the pipeline and the names of its metrics outputs (the report's inputs).
    """
    search = Pipeline([
        node(
            search_mask,
            ["theta_start", "train_data", "params:model", "params:training", "params:cts",
             "params:runtime", "params:branch"],
            ["scores", "search_log"],
            name="search",
        ),
        node(extract_mask, ["scores", "params:branch"], "mask", name="binary_mask"),
    ])
    template = search + Pipeline(ticket_pipeline(), inputs={"mask_log": "search_log"})
    method = cts_method_name(cts)
    start = cts.get("search_at", "rewind")
    theta = "theta_rewind" if start == "rewind" else "theta_init"
    branches = method_branches(method, grid, start)
    pipeline = Pipeline([
        Pipeline(
            template,
            namespace=b.namespace,
            inputs={
                "theta_start": f"dense.seed{b.seed}.{theta}",
                "dense_metrics": f"dense.seed{b.seed}.metrics",
                "train_data": "train_data",
                "test_data": "test_data",
            },
            parameters=SHARED_PARAMETERS,
        )
        for b in branches
    ], tags=["cts", method])
    return pipeline, [f"{b.namespace}.metrics" for b in branches]

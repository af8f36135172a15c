from kedro.pipeline import Pipeline, node

from ...grid import Branch
from ..tickets.pipeline import branch_pipeline, score_to_mask
from .nodes import search_mask


def create_pipeline(branches: list[Branch]) -> Pipeline:
    """One branch per (CTS variant, seed, sparsity): search -> binary mask -> retrain -> evaluate."""
    search = Pipeline([
        node(
            search_mask,
            ["theta_start", "train_data", "params:model", "params:training", "params:runtime", "params:branch"],
            ["scores", "mask_log"],
            name="search",
        ),
        score_to_mask(),
    ])
    return Pipeline([branch_pipeline(search, b) for b in branches], tags="cts")

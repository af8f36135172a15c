from kedro.pipeline import Pipeline, node

from ...grid import Branch
from ..tickets.pipeline import branch_pipeline, score_to_mask
from .nodes import score_weights


def create_pipeline(branches: list[Branch]) -> Pipeline:
    """One branch per (method, seed, sparsity): score -> binary mask -> retrain -> evaluate."""
    find = Pipeline([
        node(score_weights, ["theta_start", "train_data", "params:model", "params:runtime", "params:branch"],
             ["scores", "mask_log"], name="score"),
        score_to_mask(),
    ])
    return Pipeline([branch_pipeline(find, b) for b in branches], tags="pai")

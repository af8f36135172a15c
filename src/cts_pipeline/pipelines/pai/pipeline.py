from kedro.pipeline import Pipeline, node

from ...config.sweep import Branch
from ..common import GPU_TAG
from ..tickets.pipeline import score_to_mask, ticket_branches
from .nodes import score_weights


def create_pipeline(branches: list[Branch], batch: bool = True, stack_seeds: bool = False) -> Pipeline:
    """One branch per (method, seed, sparsity): score -> binary mask -> retrain -> evaluate."""
    find = Pipeline([
        node(score_weights, ["theta_start", "train_data", "params:model", "params:runtime", "params:branch"],
             ["scores", "mask_log"], name="score", tags=GPU_TAG),
        score_to_mask(),
    ])
    return Pipeline(ticket_branches([(find, b, None) for b in branches], batch, stack_seeds), tags="pai")

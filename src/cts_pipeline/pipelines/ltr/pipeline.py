from kedro.pipeline import Pipeline, node

from ...config.sweep import Branch
from ..common import GPU_TAG
from ..tickets.pipeline import SHARED_PARAMETERS, ticket_branches
from .nodes import prune_iteratively, select_level


def create_pipeline(runs: list[Branch], branches: list[Branch], batch: bool = True,
                    stack_seeds: bool = False) -> Pipeline:
    """Per seed, one iterative run (``ltr.seed<N>.prune``); per sparsity, select its level's mask,
    retrain it from θ_k and evaluate it (``ltr.seed<N>.sp<XX_YY>``)."""
    prune = Pipeline([
        node(
            prune_iteratively,
            ["theta_rewind", "dense_final_weights", "dense_metrics", "train_data", "test_data",
             "params:model", "params:training", "params:runtime", "params:branch"],
            ["level_masks", "levels_log"],
            name="prune",
            tags=GPU_TAG,
        )
    ])
    per_seed = [
        Pipeline(prune, namespace=run.namespace, parameters=SHARED_PARAMETERS, inputs={
            "theta_rewind": f"dense.seed{run.seed}.theta_rewind",
            "dense_final_weights": f"dense.seed{run.seed}.final_weights",
            "dense_metrics": f"dense.seed{run.seed}.metrics",
            "train_data": "train_data",
            "test_data": "test_data",
        })
        for run in runs
    ]
    select = Pipeline([node(select_level, ["level_masks", "levels_log", "params:branch"], ["mask", "mask_log"],
                            name="select_level")])
    per_sparsity = ticket_branches([
        (select, b, {"level_masks": f"ltr.seed{b.seed}.level_masks", "levels_log": f"ltr.seed{b.seed}.levels_log"})
        for b in branches
    ], batch, stack_seeds)
    return Pipeline([*per_seed, *per_sparsity], tags="ltr")

from kedro.pipeline import Pipeline, node

from ...config.sweep import Branch
from ..common import GPU_TAG
from ..tickets.pipeline import SHARED_PARAMETERS
from .nodes import train_dense


def create_pipeline(branches: list[Branch]) -> Pipeline:
    """One ``dense.seed<N>`` branch per seed of the grid."""
    template = Pipeline([
        node(
            train_dense,
            ["train_data", "test_data", "params:model", "params:training", "params:runtime", "params:branch"],
            ["theta_init", "theta_rewind", "final_weights", "metrics"],
            name="train_dense",
            tags=["metrics", GPU_TAG],
        )
    ])
    return Pipeline([
        Pipeline(template, namespace=b.namespace, inputs={"train_data", "test_data"}, parameters=SHARED_PARAMETERS)
        for b in branches
    ], tags="dense")

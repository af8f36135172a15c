from kedro.pipeline import Pipeline, node

from ...config.sweep import Branch
from ..common import GPU_TAG
from ..tickets.pipeline import SHARED_PARAMETERS
from .nodes import DENSE_OUTPUTS, train_dense, train_dense_seeds

DATA_AND_SETTINGS = ["train_data", "test_data", "params:model", "params:training", "params:runtime"]


def create_pipeline(branches: list[Branch], stack_seeds: bool = False) -> Pipeline:
    """One ``dense.seed<N>`` branch per seed of the grid; with ``stack_seeds``
    (``runtime.stack_seeds`` not false) and several seeds, one node ``dense.seeds.train`` that
    trains them as rows of one stacked network and saves the same per-seed outputs."""
    if stack_seeds and len(branches) > 1:
        outputs = {f"{b.namespace}.{name}": f"{b.namespace}.{name}" for b in branches for name in DENSE_OUTPUTS}
        return Pipeline([node(
            train_dense_seeds, [*DATA_AND_SETTINGS, *[f"params:{b.namespace}.branch" for b in branches]], outputs,
            name="train", namespace="dense.seeds", tags=["metrics", GPU_TAG],
        )], tags="dense")
    template = Pipeline([
        node(
            train_dense, [*DATA_AND_SETTINGS, "params:branch"], list(DENSE_OUTPUTS),
            name="train_dense",
            tags=["metrics", GPU_TAG],
        )
    ])
    return Pipeline([
        Pipeline(template, namespace=b.namespace, inputs={"train_data", "test_data"}, parameters=SHARED_PARAMETERS)
        for b in branches
    ], tags="dense")

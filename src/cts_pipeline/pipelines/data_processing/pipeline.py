from kedro.pipeline import Pipeline, node

from .nodes import prepare_data


def create_pipeline() -> Pipeline:
    return Pipeline(
        [node(prepare_data, "params:data", ["train_data", "test_data"], name="prepare_data")],
        tags="data",
    )

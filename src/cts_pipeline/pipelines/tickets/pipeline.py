from kedro.pipeline import Pipeline, node

from .nodes import evaluate_ticket, retrain_ticket


def create_pipeline() -> Pipeline:
    """Retrain and evaluate one ticket. A template: each method namespaces it per branch and maps
    ``theta_start``, ``mask``, ``mask_log`` (how the mask was found, with its ``seconds``) and
    ``dense_metrics`` to its own datasets."""
    return Pipeline([
        node(
            retrain_ticket,
            ["theta_start", "mask", "train_data", "test_data", "params:model", "params:training",
             "params:runtime", "params:branch"],
            ["final_weights", "retrain_log"],
            name="retrain",
        ),
        node(
            evaluate_ticket,
            ["final_weights", "mask", "test_data", "params:model", "params:training", "params:runtime",
             "params:branch", "mask_log", "retrain_log", "dense_metrics"],
            "metrics",
            name="evaluate",
            tags="metrics",
        ),
    ])

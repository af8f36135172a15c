"""What every pruning method shares once it has a mask: a template per branch.

A method contributes the nodes that make ``mask`` and ``mask_log`` (how the mask was found, with
its ``seconds``) from ``theta_start``; :func:`branch_pipeline` appends sparse retraining and
evaluation and namespaces the whole branch, wiring its inputs to the seed's dense run.
"""

from kedro.pipeline import Pipeline, node

from ...grid import Branch
from .nodes import evaluate_ticket, retrain_ticket, topk_mask

SHARED_PARAMETERS = {"params:model", "params:training", "params:runtime"}


def score_to_mask():
    """``scores`` -> ``mask``: the global top ``round(κ·d)`` (CTS logits, saliency scores)."""
    return node(topk_mask, ["scores", "params:branch"], "mask", name="binary_mask")


def retrain_and_evaluate() -> Pipeline:
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


def start_weights(branch: Branch) -> str:
    """The dense run's dataset a branch starts from: θ_k (rewind) or θ_0 (init)."""
    return f"dense.seed{branch.seed}.{'theta_rewind' if branch.start == 'rewind' else 'theta_init'}"


def branch_pipeline(find_mask: Pipeline, branch: Branch, inputs: dict[str, str] | None = None) -> Pipeline:
    """``find_mask`` + retrain + evaluate, namespaced as ``branch``; ``inputs`` maps extra free inputs."""
    template = find_mask + retrain_and_evaluate()
    wiring = {
        "theta_start": start_weights(branch),
        "dense_metrics": f"dense.seed{branch.seed}.metrics",
        "train_data": "train_data",
        "test_data": "test_data",
        **(inputs or {}),
    }
    free = template.inputs()
    return Pipeline(template, namespace=branch.namespace,
                    inputs={k: v for k, v in wiring.items() if k in free}, parameters=SHARED_PARAMETERS)

"""What every pruning method shares once it has a mask: a template per branch.

A method contributes the nodes that make ``mask`` and ``mask_log`` (how the mask was found, with
its ``seconds``) from ``theta_start``; :func:`branch_pipeline` appends sparse retraining and
evaluation and namespaces the whole branch, wiring its inputs to the seed's dense run.
:func:`ticket_branches` does that for a family's branches and, with batching on, retrains the
tickets of one method and seed that start from the same weights in one node,
``<method>.seed<N>.retrain``, which fans out to each branch's ``final_weights`` and ``retrain_log``;
with seeds stacked too (``runtime.stack_seeds``), the tickets of one method and every seed, each
from its seed's weights, in ``<method>.seeds.retrain``.
"""

from kedro.pipeline import Pipeline, node

from ...config.sweep import Branch, group_namespace
from ..common import GPU_TAG
from .nodes import evaluate_ticket, retrain_ticket, retrain_tickets, topk_mask

SHARED_PARAMETERS = {"params:model", "params:training", "params:runtime"}


def score_to_mask():
    """``scores`` -> ``mask``: the global top ``round(κ·d)`` (CTS logits, saliency scores)."""
    return node(topk_mask, ["scores", "params:branch"], "mask", name="binary_mask")


RETRAIN_INPUTS = ["train_data", "test_data", "params:model", "params:training", "params:runtime"]


def retrain() -> Pipeline:
    return Pipeline([node(
        retrain_ticket, ["theta_start", "mask", *RETRAIN_INPUTS, "params:branch"], ["final_weights", "retrain_log"],
        name="retrain", tags=GPU_TAG,
    )])


def evaluate() -> Pipeline:
    return Pipeline([
        node(
            evaluate_ticket,
            ["final_weights", "mask", "test_data", "params:model", "params:training", "params:runtime",
             "params:branch", "mask_log", "retrain_log", "dense_metrics"],
            ["metrics", "ticket"],
            name="evaluate",
            tags=["metrics", GPU_TAG],
        ),
    ])


def start_weights(branch: Branch) -> str:
    """The dense run's dataset a branch starts from: θ_k (rewind) or θ_0 (init)."""
    return f"dense.seed{branch.seed}.{'theta_rewind' if branch.start == 'rewind' else 'theta_init'}"


def retrain_and_evaluate() -> Pipeline:
    return retrain() + evaluate()


def branch_pipeline(find_mask: Pipeline, branch: Branch, inputs: dict[str, str] | None = None, *,
                    with_retraining: bool = True) -> Pipeline:
    """``find_mask`` + retrain + evaluate, namespaced as ``branch``; ``inputs`` maps extra free inputs.

    ``with_retraining=False`` keeps only ``find_mask``: :func:`retrain_group` retrains and
    evaluates the branch with others.
    """
    template = find_mask + retrain_and_evaluate() if with_retraining else find_mask
    wiring = {
        "theta_start": start_weights(branch),
        "dense_metrics": f"dense.seed{branch.seed}.metrics",
        "train_data": "train_data",
        "test_data": "test_data",
        **(inputs or {}),
    }
    free = template.inputs()
    return Pipeline(template, namespace=branch.namespace, inputs={k: v for k, v in wiring.items() if k in free},
                    parameters={p for p in SHARED_PARAMETERS if p in free})


def retrain_group(group: list[Branch]) -> Pipeline:
    """``<method>.seed<N>.retrain``: one node retraining ``group``'s tickets together from their
    shared start weights, then ``<method>.seed<N>.evaluate_sp<XX_YY>`` per ticket. A group of
    several seeds is ``<method>.seeds.retrain``, with each seed's start weights, then
    ``<method>.seeds.evaluate_seed<N>_sp<XX_YY>``.

    The evaluations sit in the group's namespace, not the branches': a Kedro namespace must be one
    contiguous piece of the DAG, and the shared retraining comes between a branch's mask and its
    evaluation.
    """
    starts = list(dict.fromkeys(start_weights(b) for b in group))  # one per seed, in the branches' order
    several_seeds = len({b.seed for b in group}) > 1
    namespace = group_namespace(group)
    outputs = {name: name for b in group for name in (f"{b.namespace}.final_weights", f"{b.namespace}.retrain_log")}
    nodes = [node(
        retrain_tickets,
        [*RETRAIN_INPUTS, *starts, *[f"{b.namespace}.mask" for b in group],
         *[f"params:{b.namespace}.branch" for b in group]],
        outputs, name="retrain", namespace=namespace, tags=GPU_TAG,
    )]
    for b in group:
        ns = b.namespace
        label = ns.split(".", 1)[1].replace(".", "_") if several_seeds else ns.rsplit(".", 1)[1]
        nodes.append(node(
            evaluate_ticket,
            [f"{ns}.final_weights", f"{ns}.mask", "test_data", "params:model", "params:training", "params:runtime",
             f"params:{ns}.branch", f"{ns}.mask_log", f"{ns}.retrain_log", f"dense.seed{b.seed}.metrics"],
            [f"{ns}.metrics", f"{ns}.ticket"], name=f"evaluate_{label}", namespace=namespace,
            tags=["metrics", GPU_TAG],
        ))
    return Pipeline(nodes)


def ticket_branches(parts: list[tuple[Pipeline, Branch, dict[str, str] | None]], batch: bool,
                    stack_seeds: bool = False) -> list[Pipeline]:
    """Each (find_mask, branch, inputs) as a branch; with ``batch``, the tickets of one method and
    seed that start from the shared weights θ_k or θ_0 retrain in one node; with ``stack_seeds``
    as well, those of one method and every seed (each from its seed's θ_k or θ_0).

    A branch whose ``find_mask`` makes its own start weights (reinitialisation) retrains alone.
    """
    groups: dict[tuple, list[tuple[Pipeline, Branch, dict[str, str] | None]]] = {}
    for find_mask, b, inputs in parts:
        shared_start = "theta_start" in (find_mask + retrain_and_evaluate()).inputs()
        seed_key = () if stack_seeds else (b.seed,)
        key = (b.method, *seed_key, b.start) if batch and shared_start else (b.namespace,)
        groups.setdefault(key, []).append((find_mask, b, inputs))
    out = []
    for members in groups.values():
        if len(members) == 1:
            find_mask, b, inputs = members[0]
            out.append(branch_pipeline(find_mask, b, inputs))
            continue
        out += [branch_pipeline(find_mask, b, inputs, with_retraining=False) for find_mask, b, inputs in members]
        out.append(retrain_group([b for _, b, _ in members]))
    return out

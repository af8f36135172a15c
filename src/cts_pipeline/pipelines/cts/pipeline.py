from kedro.pipeline import Pipeline, node

from ...config.sweep import Branch, search_group_namespace
from ...core.cts import OBJECTIVES
from ..common import GPU_TAG
from ..tickets.pipeline import score_to_mask, start_weights, ticket_branches
from .nodes import search_mask, search_masks

SEARCH_INPUTS = ["train_data", "params:model", "params:training", "params:runtime"]


def create_pipeline(branches: list[Branch], batch_sparsities: bool = True, stack_seeds: bool = False) -> Pipeline:
    """One branch per (CTS variant, seed, sparsity): search -> binary mask -> retrain -> evaluate.

    With ``batch_sparsities`` (``runtime.batch_sparsities``, the default), a seed's branches of one
    CTS configuration share one batched search node, ``<method>.seed<N>.search``, which fans out
    to each branch's ``scores`` and ``mask_log``, and one retraining node,
    ``<method>.seed<N>.retrain``; the mask and the evaluation stay per branch.
    Network objectives (features, gradients) cannot be batched and keep one search per branch.
    With ``stack_seeds`` the search and retraining nodes are shared by every seed,
    ``<method>.search_seeds`` and ``<method>.seeds.retrain``.
    """
    groups: dict[str, list[Branch]] = {}
    stack_seeds = stack_seeds and len({b.seed for b in branches}) > 1
    for b in branches:
        objective = OBJECTIVES.get(b.settings.get("objective", "kl"))  # unknown: refused when the run starts
        batchable = batch_sparsities and (objective is None or objective.kind == "logits")
        key = (f"{b.method}.search_seeds" if stack_seeds else search_group_namespace(b)) if batchable else b.namespace
        groups.setdefault(key, []).append(b)
    parts, branch_parts = [], []
    for key, group in groups.items():
        if len(group) == 1:
            search = Pipeline([
                node(search_mask, ["theta_start", *SEARCH_INPUTS, "params:branch"], ["scores", "mask_log"],
                     name="search", tags=GPU_TAG),
                score_to_mask(),
            ])
            branch_parts.append((search, group[0], None))
            continue
        outputs = {name: name for b in group for name in (f"{b.namespace}.scores", f"{b.namespace}.mask_log")}
        starts = list(dict.fromkeys(start_weights(b) for b in group))  # one per seed, in the branches' order
        # Several seeds' search sits in the method's namespace, not in <method>.seeds: that namespace's
        # retraining comes after the branches' masks, and a Kedro namespace must be one contiguous piece.
        namespace, name = key.rsplit(".", 1) if key.endswith(".search_seeds") else (key, "search")
        parts.append(Pipeline([node(
            search_masks, [*SEARCH_INPUTS, *starts, *[f"params:{b.namespace}.branch" for b in group]],
            outputs, name=name, namespace=namespace, tags=GPU_TAG,
        )]))
        branch_parts += [(Pipeline([score_to_mask()]), b, None) for b in group]
    return Pipeline(parts + ticket_branches(branch_parts, batch_sparsities, stack_seeds), tags="cts")

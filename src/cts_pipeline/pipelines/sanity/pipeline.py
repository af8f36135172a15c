from kedro.pipeline import Pipeline, node

from ...config.sweep import Branch, branch_namespace
from ..tickets.pipeline import ticket_branches
from .nodes import invert_mask, reinitialise, sanity_table, shuffle_mask


def create_pipeline(branches: list[Branch], batch: bool = True, stack_seeds: bool = False) -> Pipeline:
    """One branch per (checked method, check, seed, sparsity), reusing the checked branch's mask,
    scores and start weights, then the shared retraining and evaluation."""
    pipelines = []
    for b in branches:
        checked = branch_namespace(b.settings["of"], b.seed, b.sparsity)
        check = b.settings["check"]
        if check == "shuffle":
            make = node(shuffle_mask, ["checked_mask", "params:branch"], "mask", name="shuffle_mask")
            wiring = {"checked_mask": f"{checked}.mask"}
        elif check == "invert":
            make = node(invert_mask, ["checked_scores", "params:branch"], "mask", name="invert_mask")
            wiring = {"checked_scores": f"{checked}.scores"}
        else:  # reinit: the same mask on a fresh initialisation
            make = node(reinitialise, ["train_data", "params:model", "params:branch"],
                        "theta_start", name="reinitialise")
            wiring = {"mask": f"{checked}.mask"}
        wiring["mask_log"] = f"{checked}.mask_log"
        pipelines.append((Pipeline([make]), b, wiring))
    return Pipeline(ticket_branches(pipelines, batch, stack_seeds), tags="sanity")


def create_report(metrics: list[str]) -> Pipeline:
    """``sanity_table`` (CSV): each check's accuracy change against the checked method."""
    return Pipeline([node(sanity_table, metrics, "sanity_table", name="sanity_report", tags="report")])

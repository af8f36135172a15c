"""CTS nodes: learn mask logits on the frozen start weights (θ_k, or θ_0 for search at init)."""

from __future__ import annotations

import logging
import time

import torch

from ...config.sections import ModelConfig, RuntimeConfig
from ...config.sweep import Branch, search_group_namespace
from ...core.cts import SearchConfig, SearchResult, concrete_search, stacked_search_ratio
from ...core.device.runtime import describe_hardware
from ...core.train.memory import release_cached_memory
from ...core.train.recipe import TrainRecipe
from ...terminal.console import PROGRESS_LOGGER
from ..common import (
    batched_if_faster,
    build_network,
    checkpoint_for,
    data_fingerprint,
    device_for,
    distributable,
    split_from_payload,
    uses_channels_last,
)

logger = logging.getLogger(__name__)
progress = logging.getLogger(PROGRESS_LOGGER)

# A search has diverged when its expected kept count Σσ(s) ends outside this band around the
# budget (GradBalance holds it within 1.1x; healthy searches end at 0.95-1.05), or when its logits
# saturate: |s| beyond SATURATED_LOGIT, where σ's gradient vanishes in float32 and the search can
# no longer move. Adam's step is at most about cts.lr, so a healthy search stays far below.
BUDGET_BAND = (0.5, 1.5)
SATURATED_LOGIT = 1.0e3


class SearchDiverged(RuntimeError):
    """A search ended far from its budget or with saturated logits (``runtime.strict: true``)."""


def divergence(result: SearchResult) -> str | None:
    """Why a search's mask cannot be trusted, or None."""
    low, high = BUDGET_BAND
    ratio = result.final_expected_over_budget
    if not low <= ratio <= high:
        return f"ended at {ratio:.2f}x its weight budget (healthy: {low}-{high}x)"
    largest = max(float(s.abs().max()) for s in result.scores.values())
    if largest > SATURATED_LOGIT:
        return f"logits saturated (|s| up to {largest:.3g} > {SATURATED_LOGIT:g})"
    return None


def _search_log(branch: Branch, cts: SearchConfig, training: TrainRecipe, result: SearchResult,
                hardware: str, group: list[Branch], started_at: float) -> dict:
    return {
        **branch.as_dict(),
        **{f"cts_{k}": v for k, v in cts.as_dict().items()},
        "cts_effective_loss_scale": cts.effective_loss_scale,
        "search_epochs": cts.search_epochs(training.epochs),
        "steps": result.steps,
        "budget": result.budget,
        "peak_expected_over_budget": result.peak_expected_over_budget,
        "final_expected_over_budget": result.final_expected_over_budget,
        "seconds": result.seconds,  # this ticket's share: the batched search's time over its K masks
        "search_group": [b.namespace for b in group],
        "search_group_seconds": result.group_seconds,  # the whole search's wall-clock, shared or not
        "search_shared_by": result.shared_by,  # how many masks that wall-clock produced together
        "search_path": result.forward_path,  # single, or how K rows ran together: stacked or vmap
        "search_micro_batches": result.micro_batches,
        "search_ranks_as_rows": result.ranks_as_rows,  # training.virtual_ranks as rows of one pass (rank_rows.py)
        "history": result.history,
        "hardware": hardware,
        "started_at": started_at,  # wall-clock (Unix seconds): the branch's start in MLflow
        "diverged": divergence(result),
    }


def search_mask(
    theta_start: dict,
    train_data: dict,
    model: ModelConfig,
    training: TrainRecipe,
    runtime: RuntimeConfig,
    branch: Branch,
) -> tuple[dict, dict]:
    """Concrete Ticket Search at the branch's density with the branch's CTS settings.

    Returns the logits per layer (the scores the binary mask ranks) and the search log.
    """
    scores_and_logs = search_masks(theta_start, train_data, model, training, runtime, branch)
    return scores_and_logs[f"{branch.namespace}.scores"], scores_and_logs[f"{branch.namespace}.mask_log"]


@distributable
def search_masks(
    theta_start: dict,
    train_data: dict,
    model: ModelConfig,
    training: TrainRecipe,
    runtime: RuntimeConfig,
    *group: Branch,
) -> dict[str, dict]:
    """One batched search for a seed's branches of one CTS configuration, at all their densities.

    The branches share the start weights, the data order, the noise and the dense teacher, so
    their searches run as one (``core.cts.concrete_search`` with several densities). Returns
    ``{<branch>.scores: logits, <branch>.mask_log: log}`` for every branch.
    """
    started_at = time.time()
    first = group[0]
    cts = SearchConfig(**first.settings)
    if any(b.settings != first.settings or b.seed != first.seed or b.start != first.start for b in group):
        raise ValueError(f"{search_group_namespace(first)}: a batched search needs one CTS configuration, "
                         "seed and start")
    device = device_for(runtime)
    train_split = split_from_payload(train_data, device, runtime.data_workers)
    net = build_network(model, train_split, device, state=theta_start)
    channels_last = uses_channels_last(runtime, net)
    batched = len(group) > 1 and batched_if_faster(
        runtime, search_group_namespace(first),
        lambda: stacked_search_ratio(net, train_split, [b.density for b in group], cts, training, seed=first.seed,
                                     channels_last=channels_last),
        len(group), f"a batched search step of {len(group)} masks takes", "searching", "them together")

    def search(branches: tuple[Branch, ...]) -> list[SearchResult]:
        together = len(branches) > 1
        namespace = search_group_namespace(first) if together else branches[0].namespace
        found = concrete_search(
            net, train_split, density=[b.density for b in branches] if together else branches[0].density,
            config=cts, recipe=training, seed=first.seed, stage=f"{namespace} search", progress=runtime.progress,
            checkpoint=checkpoint_for(runtime, namespace, "search", model, training, *[b.as_dict() for b in branches],
                                      theta_start, data_fingerprint(train_data)),
            channels_last=channels_last, rank_passes=runtime.virtual_rank_passes,
        )
        return found if together else [found]

    # One at a time, each branch's search is the one its own node would run (same checkpoint too).
    results = None
    if batched:
        try:
            results = search(group)
        except torch.OutOfMemoryError:  # even in micro-batches of two samples: K rows at once do not fit
            results = None
        if results is None:  # (past the except clause, whose traceback held the K rows' tensors)
            release_cached_memory()
            logger.warning("%s: %d densities searched together do not fit in device memory; searching them one "
                           "at a time", search_group_namespace(first), len(group))
    if results is None:
        results = [r for b in group for r in search((b,))]
    elif results[0].shared_by > 1:  # the group's real wall-clock, said once (each ticket reports its share)
        progress.info("%s: one search of %d sparsities, %.1f s (1/%d a ticket)",
                      search_group_namespace(first), len(group), results[0].group_seconds, len(group))
    hardware = describe_hardware(device)
    out = {}
    for branch, result in zip(group, results, strict=True):
        log = _search_log(branch, cts, training, result, hardware, list(group), started_at)
        if log["diverged"]:
            message = (f"{branch.namespace}: the search diverged: {log['diverged']}; its mask is not a "
                       f"CTS ticket (check cts.lr = {cts.lr}, cts.loss_scale)")
            if runtime.strict:
                raise SearchDiverged(message + "; runtime.strict is on")
            logger.warning("%s; the branch is flagged DIVERGED", message)
        out[f"{branch.namespace}.scores"] = result.scores
        out[f"{branch.namespace}.mask_log"] = log
    return out

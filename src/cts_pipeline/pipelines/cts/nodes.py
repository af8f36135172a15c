"""CTS nodes: learn mask logits on the frozen start weights (θ_k, or θ_0 for search at init)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from ...config.sections import ModelConfig, RuntimeConfig
from ...config.sweep import Branch, group_namespace, search_group_namespace, seeds_group_namespace
from ...core.cts import (
    SearchConfig,
    SearchResult,
    concrete_search,
    seed_rows_ratio,
    stacked_search_ratio,
)
from ...core.cts.seed_rows import SeedRowsDeclined, seed_rows_decline
from ...core.device.distributed import rank_and_world
from ...core.device.runtime import describe_hardware
from ...core.device.virtual_ranks import RankLayout
from ...core.train.batched import stacks_ranks
from ...core.train.memory import plan_rows, release_cached_memory
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
    starts_then_branches,
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
    scores_and_logs = search_masks(train_data, model, training, runtime, theta_start, branch)
    return scores_and_logs[f"{branch.namespace}.scores"], scores_and_logs[f"{branch.namespace}.mask_log"]


@distributable
def search_masks(
    train_data: dict,
    model: ModelConfig,
    training: TrainRecipe,
    runtime: RuntimeConfig,
    *starts_and_branches: dict | Branch,
) -> dict[str, dict]:
    """The searches of one CTS configuration's branches: of one seed, as one batched search at all
    their densities; of several seeds (``runtime.stack_seeds``), as rows of one search where they
    can (``core.cts.seed_rows``), else one seed after another.

    ``starts_and_branches`` is one start state per seed (in the order the branches first name their
    seeds), then the branches. A seed's branches share the start weights, the data order, the noise
    and the dense teacher, so their searches run as one (``core.cts.concrete_search`` with several
    densities). Returns ``{<branch>.scores: logits, <branch>.mask_log: log}`` for every branch.
    """
    started_at = time.time()
    start_of_seed, _, group = starts_then_branches(starts_and_branches, "search_masks")
    seeds = list(start_of_seed)
    first = group[0]
    cts = SearchConfig(**first.settings)
    if any(b.settings != first.settings or b.start != first.start for b in group):
        raise ValueError(f"{group_namespace(group)}: a batched search needs one CTS configuration and start")
    device = device_for(runtime)
    train_split = split_from_payload(train_data, device, runtime.data_workers)
    search = _Searches(train_data, train_split, model, training, runtime, cts, start_of_seed)
    found = search.seeds_as_rows(group) if len(seeds) > 1 else {}
    for seed in seeds:
        members = [b for b in group if b.seed == seed]
        if members[0].namespace not in found:
            found.update(search.one_seed(members))
    hardware = describe_hardware(device)
    out = {}
    for branch in group:
        result = found[branch.namespace]
        shared = [b for b in group if b.namespace in search.groups.get(branch.namespace, [branch.namespace])]
        log = _search_log(branch, cts, training, result, hardware, shared, started_at)
        if log["diverged"]:
            message = (f"{branch.namespace}: the search diverged: {log['diverged']}; its mask is not a "
                       f"CTS ticket (check cts.lr = {cts.lr}, cts.loss_scale)")
            if runtime.strict:
                raise SearchDiverged(message + "; runtime.strict is on")
            logger.warning("%s; the branch is flagged DIVERGED", message)
        out[f"{branch.namespace}.scores"] = result.scores
        out[f"{branch.namespace}.mask_log"] = log
    return out


class _Searches:
    """The ways a node searches its branches, each returning ``{namespace: SearchResult}`` and
    noting in :attr:`groups` which branches shared one search's wall-clock."""

    def __init__(self, train_data: dict, train_split, model: ModelConfig, training: TrainRecipe,
                 runtime: RuntimeConfig, cts: SearchConfig, start_of_seed: dict[int, dict]) -> None:
        self.train_data, self.train_split, self.model, self.training = train_data, train_split, model, training
        self.runtime, self.cts, self.start_of_seed = runtime, cts, start_of_seed
        self.groups: dict[str, list[str]] = {}

    def _net(self, seed: int):
        return build_network(self.model, self.train_split, self.train_split.device, state=self.start_of_seed[seed])

    def _checkpoint(self, namespace: str, branches: list[Branch], *starts: dict):
        return checkpoint_for(self.runtime, namespace, "search", self.model, self.training,
                              *[b.as_dict() for b in branches], *starts, data_fingerprint(self.train_data))

    def _found(self, branches: list[Branch], results: list[SearchResult]) -> dict[str, SearchResult]:
        for b in branches:
            self.groups[b.namespace] = [other.namespace for other in branches]
        return {b.namespace: r for b, r in zip(branches, results, strict=True)}

    def one_seed(self, group: list[Branch]) -> dict[str, SearchResult]:
        """One seed's branches: one batched search where faster (``runtime.batch_sparsities``), else
        one at a time (each then exactly the search its own node would run, checkpoint included)."""
        first, runtime, training, cts = group[0], self.runtime, self.training, self.cts
        net = self._net(first.seed)
        channels_last = uses_channels_last(runtime, net)
        batched = len(group) > 1 and batched_if_faster(
            runtime, search_group_namespace(first),
            lambda: stacked_search_ratio(net, self.train_split, [b.density for b in group], cts, training,
                                         seed=first.seed, channels_last=channels_last),
            len(group), f"a batched search step of {len(group)} masks takes", "searching", "them together")

        def search(branches: list[Branch]) -> list[SearchResult]:
            together = len(branches) > 1
            namespace = search_group_namespace(first) if together else branches[0].namespace
            found = concrete_search(
                net, self.train_split, density=[b.density for b in branches] if together else branches[0].density,
                config=cts, recipe=training, seed=first.seed, stage=f"{namespace} search", progress=runtime.progress,
                checkpoint=self._checkpoint(namespace, branches, self.start_of_seed[first.seed]),
                channels_last=channels_last, rank_passes=runtime.virtual_rank_passes,
            )
            return found if together else [found]

        results = None
        if batched:
            try:
                results = search(group)
            except torch.OutOfMemoryError:  # even in micro-batches of two samples: K rows at once do not fit
                results = None
            if results is None:  # (past the except clause, whose traceback held the K rows' tensors)
                release_cached_memory()
                logger.warning("%s: %d densities searched together do not fit in device memory; searching them "
                               "one at a time", search_group_namespace(first), len(group))
        if results is None:
            return {b.namespace: search([b])[0] for b in group}
        if results[0].shared_by > 1:  # the group's real wall-clock, said once (each ticket reports its share)
            progress.info("%s: one search of %d sparsities, %.1f s (1/%d a ticket)",
                          search_group_namespace(first), len(group), results[0].group_seconds, len(group))
        return self._found(group, results)

    def seeds_as_rows(self, group: list[Branch]) -> dict[str, SearchResult]:
        """Several seeds' branches as rows of one search (``runtime.stack_seeds``), in groups of
        seeds that fit the device's memory; ``{}`` (one seed after another) where they cannot, or
        (``auto``) where a probe finds it slower. A group that runs out of memory, or whose model
        fails the stacked layout's check, falls back to one seed at a time."""
        runtime, training, cts = self.runtime, self.training, self.cts
        seeds = list(dict.fromkeys(b.seed for b in group))
        by_seed = {s: [b for b in group if b.seed == s] for s in seeds}
        densities = [b.density for b in by_seed[seeds[0]]]
        namespace = seeds_group_namespace(group[0])
        net = self._net(seeds[0])
        rank, world = rank_and_world()
        why = seed_rows_decline(net, cts.resolved_objective, RankLayout(training.virtual_ranks, rank, world,
                                                                        presharded=self.train_split.streamed))
        if why is None and any([b.density for b in by_seed[s]] != densities for s in seeds):
            why = "the seeds search different densities"
        if why is None and (runtime.compile or runtime.distributed.nproc > 1):
            why = "runtime.compile or several processes"
        if why is None and not stacks_ranks(training, runtime.virtual_rank_passes, self.train_split.device):
            why = "the virtual ranks run one after another (runtime.virtual_rank_passes; auto on a CPU)"
        if why is not None:
            logger.info("%s: the seeds search one after another: %s", namespace, why)
            return {}
        channels_last = uses_channels_last(runtime, net)
        starts = [self.start_of_seed[s] for s in seeds]
        if not batched_if_faster(
                runtime, namespace,
                lambda: seed_rows_ratio(net, self.train_split, densities, cts, training, seeds=seeds, starts=starts,
                                        channels_last=channels_last),
                len(seeds), f"a search step of {len(seeds)} seeds as rows takes", "searching", "them as rows",
                settings=("batch_sparsities", "stack_seeds")):
            return {}
        probe_config, stage = replace(cts, epochs=1), f"{namespace} search"
        per_group = plan_rows(self.train_split.device, len(seeds), training.batch_size,
                              lambda samples: concrete_search(
                                  net, self.train_split.subset(samples), density=densities, config=probe_config,
                                  recipe=replace(training, batch_size=samples), seed=seeds[0], stage="memory probe",
                                  progress=False, channels_last=channels_last), stage)
        found = {}
        for at in range(0, len(seeds), per_group):
            chunk = seeds[at:at + per_group]
            if len(chunk) == 1:
                continue  # searched alone by the caller
            branches = [b for s in chunk for b in by_seed[s]]
            try:
                results = concrete_search(net, self.train_split, density=densities, config=cts, recipe=training,
                                          seed=chunk, starts=[self.start_of_seed[s] for s in chunk], stage=stage,
                                          progress=runtime.progress, channels_last=channels_last,
                                          checkpoint=self._checkpoint(namespace, branches,
                                                                      *[self.start_of_seed[s] for s in chunk]))
            except (torch.OutOfMemoryError, SeedRowsDeclined) as exc:
                results, reason = None, str(exc).splitlines()[0]
            if results is None:  # past the except clause, whose traceback held the rows' tensors
                release_cached_memory()
                logger.warning("%s: %d seeds as rows of one search failed (%s); searching them one at a time",
                               namespace, len(chunk), reason)
                continue
            progress.info("%s: one search of %d seeds × %d sparsities, %.1f s (1/%d a ticket)", namespace,
                          len(chunk), len(densities), results[0][0].group_seconds, len(branches))
            found.update(self._found(branches, [r for per_seed in results for r in per_seed]))
        return found

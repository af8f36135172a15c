"""What every pruning method shares once it has a mask: sparse retraining and evaluation."""

from __future__ import annotations

import logging
import time

import torch

from ...config.sections import ModelConfig, RuntimeConfig
from ...config.sweep import Branch, group_namespace
from ...core.device.runtime import describe_hardware
from ...core.nets.masks import (
    check_mask_matches,
    collapsed_layers,
    global_topk_mask,
    kept_count,
    layer_report,
    mask_digest,
    mask_to_payload,
    payload_to_mask,
    prunable_parameters,
    thin_layers,
)
from ...core.nets.selection import describe
from ...core.prune.connectivity import effective_report
from ...core.train.batched import (
    eval_probe_step,
    probe_step,
    stacked_training_ratio,
    train_tickets,
)
from ...core.train.loop import effective_precision, evaluate, state_on_cpu, train
from ...core.train.memory import plan_rows, release_cached_memory
from ...core.train.recipe import TrainRecipe
from ...terminal.console import PROGRESS_LOGGER
from ..common import (
    ArtifactMismatch,
    batched_if_faster,
    build_network,
    checkpoint_for,
    data_fingerprint,
    device_for,
    distributable,
    may_train_stacked,
    split_from_payload,
    starts_then_branches,
    uses_channels_last,
)

logger = logging.getLogger(__name__)
progress = logging.getLogger(PROGRESS_LOGGER)


def topk_mask(scores: dict, branch: Branch) -> dict:
    """The binary mask: exactly ``round(κ·d)`` highest scores over the whole network.

    A CTS ablation with ``min_kept_per_layer`` reserves that many weights in every layer first.
    A mask that empties a layer, or keeps only a handful of its weights, is logged as a warning:
    at extreme sparsity on small networks CTS-KL tends to starve the convolutions
    (``docs/results.md``, "Where CTS spends its budget").
    """
    floor = branch.settings.get("min_kept_per_layer", 0) if branch.family == "cts" else 0
    mask = global_topk_mask(scores, branch.density, min_per_layer=floor)
    thin = thin_layers(mask)
    if thin:
        logger.warning("%s: the mask keeps only %s; a layer this thin is close to collapse "
                       "(opt-in remedy for CTS: cts.min_kept_per_layer)", branch.namespace,
                       ", ".join(f"{kept} of {mask[name].numel()} weights in {name}" for name, kept in thin.items()))
    return mask_to_payload(mask, branch.density)


def branch_mask(payload: dict, branch: Branch, net) -> dict:
    """``payload`` as a mask for ``net``, refused when it is not this branch's: a file replaced by
    hand, or left by another configuration or model, is named instead of being retrained as if it were."""
    keep = payload_to_mask(payload)
    try:
        check_mask_matches(net, keep)
    except ValueError as exc:
        raise ArtifactMismatch(f"{branch.namespace}.mask", f"{exc}: the mask was made for another model; "
                               "delete that version folder and rerun") from None
    if branch.family == "ltr":  # a level's mask: its own density (the level reaching the sparsity)
        return keep
    kept, total = sum(int(k.sum()) for k in keep.values()), sum(k.numel() for k in keep.values())
    expected = kept_count(branch.density, total)
    stored = payload.get("target_density")
    if kept != expected or (stored is not None and abs(stored - branch.density) > 1e-9):
        raise ArtifactMismatch(
            f"{branch.namespace}.mask", f"keeps {kept} of {total} weights (target density {stored}), but the branch "
            f"wants {expected} at density {branch.density:.6g}: the file was replaced or comes from another "
            f"configuration; delete that version folder and rerun")
    return keep


def start_epoch(training: TrainRecipe, branch: Branch) -> int:
    """Retraining resumes the schedule where the start weights were taken: ``k``, or 0 at init."""
    return training.rewind_epoch if branch.start == "rewind" else 0


@distributable
def retrain_ticket(
    theta_start: dict,
    mask: dict,
    train_data: dict,
    test_data: dict,
    model: ModelConfig,
    training: TrainRecipe,
    runtime: RuntimeConfig,
    branch: Branch,
) -> tuple[dict, dict]:
    """Train ``mask ⊙ θ_start`` from its epoch to the end with a fresh optimizer; pruned weights stay 0."""
    started_at = time.time()
    device = device_for(runtime)
    train_split = split_from_payload(train_data, device, runtime.data_workers)
    test_split = split_from_payload(test_data, device, runtime.data_workers)
    net = build_network(model, train_split, device, state=theta_start)
    first = start_epoch(training, branch)
    keep = branch_mask(mask, branch, net)
    result = train(
        net, train_split, test_split, training, seed=branch.seed, stage=f"{branch.namespace} retrain",
        start_epoch=first, mask=keep, progress=runtime.progress,
        checkpoint=checkpoint_for(runtime, branch.namespace, "retrain", model, training, branch.as_dict(),
                                  theta_start, keep, data_fingerprint(train_data)),
        channels_last=uses_channels_last(runtime, net), compile_model=runtime.compile,
        sync_batchnorm=runtime.sync_batchnorm, rank_passes=runtime.virtual_rank_passes,
    )
    return state_on_cpu(net), _retrain_log(branch, first, result, started_at, retrain_path="single")


def _retrain_log(branch: Branch, first: int, result, started_at: float, **extra) -> dict:
    """What a retraining tells evaluation and the report; its times exclude test evaluations."""
    return {**branch.as_dict(), "start_epoch": first, "seconds": result.seconds, "eval_seconds": result.eval_seconds,
            "started_at": started_at, **extra, "history": result.history}


@distributable
def retrain_tickets(
    train_data: dict,
    test_data: dict,
    model: ModelConfig,
    training: TrainRecipe,
    runtime: RuntimeConfig,
    *starts_masks_branches: dict | Branch,
) -> dict[str, dict]:
    """Retrain several tickets of one method together: of one seed from its start weights, or of
    several seeds (``runtime.stack_seeds``), each from its seed's.

    ``starts_masks_branches`` is one start state per seed (in the order the branches first name
    their seeds), then K mask payloads, then their K branches. They train as one stacked network
    (``core.train.batched``; a ticket of another seed reads that seed's batches) where the model
    allows it, else one after the other; the results are the same up to float rounding. Returns
    ``{<branch>.final_weights: state, <branch>.retrain_log: log}`` for every branch; each log's
    ``seconds`` is that ticket's share.
    """
    started_at = time.time()
    start_of_seed, payloads, branches = starts_then_branches(starts_masks_branches, "retrain_tickets")
    seeds = list(start_of_seed)
    first_branch = branches[0]
    device = device_for(runtime)
    train_split = split_from_payload(train_data, device, runtime.data_workers)
    test_split = split_from_payload(test_data, device, runtime.data_workers)
    net = build_network(model, train_split, device, state=start_of_seed[first_branch.seed])
    first = start_epoch(training, first_branch)
    keeps = [branch_mask(p, b, net) for p, b in zip(payloads, branches, strict=True)]

    def row_starts(group) -> list[dict] | None:
        """Each row's start state where the rows are of several seeds (else the network's own)."""
        return None if len({b.seed for b in group}) == 1 else [start_of_seed[b.seed] for b in group]

    stage = f"{group_namespace(branches)} retrain x{len(branches)}"

    def one_at_a_time(members: list[int]) -> dict[str, dict]:
        out = {}
        for i in members:
            payload, branch = payloads[i], branches[i]
            weights, log = retrain_ticket(start_of_seed[branch.seed], payload, train_data, test_data, model, training,
                                          runtime, branch)
            out[f"{branch.namespace}.final_weights"], out[f"{branch.namespace}.retrain_log"] = weights, log
        return out

    channels_last = uses_channels_last(runtime, net)

    def stacked(members: list[int]) -> dict[str, dict]:
        """The tickets ``members`` (indices) as one stacked network, or one at a time if they do
        not fit in device memory after all."""
        group, masks = [branches[i] for i in members], [keeps[i] for i in members]
        if len(group) == 1:
            return one_at_a_time(members)
        namespace = group_namespace(group)
        stage = f"{namespace} retrain x{len(group)}"
        try:
            states, results = train_tickets(
                net, masks, train_split, test_split, training, seed=[b.seed for b in group], starts=row_starts(group),
                stage=stage, start_epoch=first, progress=runtime.progress, channels_last=channels_last,
                checkpoint=checkpoint_for(runtime, namespace, "retrain", model, training, *[b.as_dict() for b in group],
                                          *[start_of_seed[s] for s in dict.fromkeys(b.seed for b in group)], *masks,
                                          data_fingerprint(train_data)),
            )
        except torch.OutOfMemoryError:
            states = None
        if states is None:
            # Outside the except clause: its traceback held the group's K stacked parameters,
            # gradients, momenta and activations, which the one-at-a-time retraining needs the room of.
            release_cached_memory()
            logger.warning("%s: %d tickets stacked do not fit in device memory; retraining them one at a time",
                           stage, len(group))
            return one_at_a_time(members)
        progress.info("%s: %d tickets retrained stacked, %.1f s (1/%d a ticket)",
                      namespace, len(group), results[0].seconds * len(group), len(group))
        out = {}
        for branch, state, result in zip(group, states, results, strict=True):
            out[f"{branch.namespace}.final_weights"] = state
            out[f"{branch.namespace}.retrain_log"] = _retrain_log(branch, first, result, started_at,
                                                                  retrain_group=[b.namespace for b in group],
                                                                  retrain_path=f"stacked x{len(group)}",
                                                                  retrain_shared_by=len(group))
        return out

    everyone = list(range(len(branches)))
    # Several seeds stack where runtime.stack_seeds says (auto: the probe below), one seed's
    # sparsities where runtime.batch_sparsities does; both true: no probe.
    settings = ("batch_sparsities", "stack_seeds") if len(seeds) > 1 else ("batch_sparsities",)
    if not may_train_stacked(net, training, runtime, device, stage) \
            or not batched_if_faster(
                runtime, stage,
                lambda: stacked_training_ratio(net, keeps, train_split, training, seed=[b.seed for b in branches],
                                               starts=row_starts(branches), channels_last=channels_last),
                len(keeps), f"stacked training steps of {len(keeps)} tickets take", "training", "them stacked",
                settings=settings):
        return one_at_a_time(everyone)
    # On a GPU, as many tickets at once as fit the free memory (core/train/memory.py); all of them on a CPU.
    per_group = plan_rows(device, len(keeps), training.batch_size,
                          lambda samples: probe_step(net, keeps[0], train_split, training, samples,
                                                     seed=first_branch.seed, channels_last=channels_last), stage,
                          eval_batch=training.eval_batch_size,
                          eval_probe=lambda samples: eval_probe_step(net, keeps[0], test_split, samples,
                                                                     channels_last=channels_last))
    out = {}
    for start in range(0, len(branches), per_group):
        out.update(stacked(everyone[start:start + per_group]))
    return out


def evaluate_ticket(
    final_weights: dict,
    mask: dict,
    test_data: dict,
    model: ModelConfig,
    training: TrainRecipe,
    runtime: RuntimeConfig,
    branch: Branch,
    mask_log: dict,
    retrain_log: dict,
    dense_metrics: dict,
) -> tuple[dict, dict]:
    """Last-epoch test accuracy of the retrained ticket, its sparsity to the weight, and the times;
    and the ticket itself in a portable form (``core.prune.tickets``: safetensors and a manifest).

    Checks that every pruned weight is exactly zero in the saved weights: a ticket that is not as
    sparse as it claims fails here rather than in someone's paper.
    """
    started = time.perf_counter()
    device = device_for(runtime)
    test_split = split_from_payload(test_data, device, runtime.data_workers)
    net = build_network(model, test_split, device, state=final_weights)
    keep = branch_mask(mask, branch, net)
    weights = prunable_parameters(net)
    leaked = {name: int((weights[name].detach().cpu() != 0)[~keep[name]].sum()) for name in keep}
    if any(leaked.values()):
        raise ValueError(f"{branch.namespace}: pruned weights are not zero after retraining: "
                         f"{ {n: c for n, c in leaked.items() if c} }")
    test = evaluate(net, test_split, training.eval_batch_size, channels_last=uses_channels_last(runtime, net),
                    precision=effective_precision(training.precision, device))  # as the last epoch's test
    collapsed = collapsed_layers(keep)
    if collapsed:
        logger.warning("%s: layer collapse, no weight left in %s: the network is disconnected",
                       branch.namespace, ", ".join(collapsed))
    connectivity = effective_report(net, keep, test_split.info.image_shape)
    if connectivity["disconnected"] and not collapsed:
        logger.warning("%s: the mask disconnects the input from the output: none of its %d kept weights lies "
                       "on an input-output path", branch.namespace, mask["kept_weights"])
    seconds = {
        # LTR's mask already cost the whole dense training (to θ_k and beyond): count it once.
        "to_rewind": (dense_metrics["seconds"]["to_rewind"]
                      if branch.start == "rewind" and not mask_log.get("includes_dense_training") else 0.0),
        "find_mask": mask_log["seconds"],
        "retrain": retrain_log["seconds"],
        "evaluate": time.perf_counter() - started,
        "test_during_retrain": retrain_log.get("eval_seconds", 0.0),  # apart from the stage times
    }
    seconds["total"] = seconds["to_rewind"] + seconds["find_mask"] + seconds["retrain"]
    # A batched search or a stacked retraining made K tickets in one wall-clock: each ticket's
    # find_mask and retrain above are 1/K shares of it; the whole of it is kept beside them.
    search_shared_by = int(mask_log.get("search_shared_by", 1))
    retrain_shared_by = int(retrain_log.get("retrain_shared_by", 1))
    seconds["find_mask_group"] = float(mask_log.get("search_group_seconds", seconds["find_mask"]))
    seconds["retrain_group"] = seconds["retrain"] * retrain_shared_by
    shared = max(search_shared_by, retrain_shared_by) > 1
    # Under 80 characters for the default run, so the line fits 100 columns with rich's time and
    # level: the namespace names the sparsity, the results table the rest.
    progress.info("%s: %.2f %% accuracy, %d kept (%d effective), %.1f s%s", branch.namespace, test["accuracy"],
                  mask["kept_weights"], connectivity["effective_kept_weights"], seconds["total"],
                  " share" if shared else "")
    metrics = {
        **branch.as_dict(),
        "model": model.name,
        "dataset": test_split.info.name,
        "rewind_epoch": training.rewind_epoch,
        "start_epoch": retrain_log["start_epoch"],
        "family": branch.family,
        "objective": mask_log.get("cts_objective"),
        "search_length": mask_log.get("cts_search_length"),
        "search_epochs": mask_log.get("search_epochs"),
        "checked_method": branch.settings.get("of"),
        "target_sparsity": branch.sparsity,
        "target_density": branch.density,
        "achieved_sparsity": mask["sparsity"],
        "achieved_density": mask["density"],
        "kept_weights": mask["kept_weights"],
        "prunable_weights": mask["prunable_weights"],
        "prunable": describe(model.prunable),  # which weights the methods may prune (model.prunable)
        "prunable_layers": len(keep),
        "mask_digest": mask_digest(keep),  # the mask these numbers belong to (hooks.FreshnessHook)
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_images": len(test_split),  # one image is 100 / test_images points of accuracy
        "dense_test_accuracy": dense_metrics["test_accuracy"],
        "layer_density": {name: r["density"] for name, r in layer_report(keep).items()},
        "layer_kept": {name: r["kept"] for name, r in layer_report(keep).items()},
        "collapsed_layers": collapsed,
        "diverged": mask_log.get("diverged"),  # a search that ended far from its budget
        "thin_layers": thin_layers(keep),
        **connectivity,  # effective (input-to-output) kept counts, per layer and overall
        "seconds": seconds,
        "retrain_history": retrain_log["history"],
        # How the mask was found, per search epoch (CTS only): the objective, Σσ over the budget, λ.
        "search_history": [{k: r[k] for k in ("epoch", "loss", "expected_over_budget", "multiplier") if k in r}
                           for r in mask_log.get("history", [])],
        # How the branch's work ran: the search's rows (single, stacked, vmap), its micro-batches, whether
        # its virtual ranks ran as rows, and the retraining (single, or stacked with K tickets): the
        # times above depend on it.
        "search_path": mask_log.get("search_path"),
        "search_micro_batches": mask_log.get("search_micro_batches"),
        "search_ranks_as_rows": mask_log.get("search_ranks_as_rows"),
        "retrain_path": retrain_log.get("retrain_path"),
        "search_shared_by": search_shared_by,  # the tickets one search's wall-clock made together
        "retrain_shared_by": retrain_shared_by,
        # The groups a ticket shares its time with, by their first branch (reporting counts each once).
        "search_group_id": min(mask_log.get("search_group") or [branch.namespace]) if search_shared_by > 1 else "",
        "retrain_group_id": min(retrain_log.get("retrain_group") or [branch.namespace]) if retrain_shared_by > 1 else "",
        "hardware": describe_hardware(device),
        # Wall-clock (Unix seconds) of the branch's stages, for MLflow's start, end and duration.
        "started_at": mask_log.get("started_at"),
        "retrain_started_at": retrain_log.get("started_at"),
        "finished_at": time.time(),
    }
    return metrics, {"mask": keep, "weights": final_weights,
                     "manifest": ticket_manifest(metrics, model, test_split.info)}


def ticket_manifest(metrics: dict, model: ModelConfig, info) -> dict:
    """What a ticket file says about itself: enough to rebuild and check the network (``info``:
    the data's :class:`~cts_pipeline.core.data.registry.DatasetInfo`)."""
    from ... import __version__

    return {
        "format": "cts-pipeline/ticket-v1",
        "project_version": __version__,
        "model": model.name, "model_options": dict(model.options),
        # Which weights the methods could prune (model.prunable; None: every Conv and Linear weight).
        "model_prunable": None if model.prunable is None else list(model.prunable),
        "dataset": info.name, "image_shape": list(info.image_shape), "num_classes": info.num_classes,
        **{k: metrics[k] for k in ("method", "namespace", "seed", "rewind_epoch", "start", "target_sparsity",
                                   "achieved_sparsity", "kept_weights", "prunable_weights", "mask_digest",
                                   "test_accuracy")},
        "layer_kept": metrics["layer_kept"],
    }

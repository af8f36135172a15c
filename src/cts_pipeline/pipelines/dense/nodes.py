"""Dense training: one run that keeps θ_0, θ_k and the fully trained unpruned reference."""

from __future__ import annotations

import logging
import time

import torch

from ...config.sections import ModelConfig, RuntimeConfig
from ...config.sweep import Branch
from ...core.device.distributed import rank_and_world
from ...core.device.runtime import describe_hardware
from ...core.nets.masks import count_prunable, prunable_parameters
from ...core.nets.registry import count_parameters
from ...core.nets.selection import describe
from ...core.train.batched import eval_probe_step, probe_step, stacked_training_ratio, train_tickets
from ...core.train.loop import TrainResult, state_on_cpu, train
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
    may_train_stacked,
    split_from_payload,
    uses_channels_last,
)

logger = logging.getLogger(__name__)
progress = logging.getLogger(PROGRESS_LOGGER)


@distributable
def train_dense(
    train_data: dict,
    test_data: dict,
    model: ModelConfig,
    training: TrainRecipe,
    runtime: RuntimeConfig,
    branch: Branch,
) -> tuple[dict, dict, dict, dict]:
    """Train from a seeded initialisation to the end of the recipe.

    Returns ``θ_0``, ``θ_k`` (after ``training.rewind_epoch`` epochs; ``θ_0`` when that is 0),
    the final weights, and the dense metrics (last-epoch test accuracy, wall-clock to ``θ_k``).
    Checkpointed every epoch: a killed run resumes where it stopped.
    """
    started_at = time.time()
    device = device_for(runtime)
    train_split = split_from_payload(train_data, device, runtime.data_workers)
    test_split = split_from_payload(test_data, device, runtime.data_workers)
    net = build_network(model, train_split, device, seed=branch.seed)
    theta_init = state_on_cpu(net)
    k = training.rewind_epoch
    result = train(
        net, train_split, test_split, training, seed=branch.seed, stage=f"{branch.namespace} dense",
        snapshot_epochs={k}, progress=runtime.progress,
        checkpoint=checkpoint_for(runtime, branch.namespace, "dense", model, training, branch.seed,
                                  data_fingerprint(train_data)),
        channels_last=uses_channels_last(runtime, net), compile_model=runtime.compile,
        sync_batchnorm=runtime.sync_batchnorm, rank_passes=runtime.virtual_rank_passes,
    )
    metrics = _dense_metrics(branch, model, net, train_split, test_split, training, result, started_at)
    progress.info("%s: %.2f %% test accuracy, dense, %.1f s", branch.namespace, metrics["test_accuracy"],
                  result.seconds)
    return theta_init, result.snapshots[k], state_on_cpu(net), metrics


DENSE_OUTPUTS = ("theta_init", "theta_rewind", "final_weights", "metrics")  # what a seed's dense run saves


def _outputs(branch: Branch, *values: dict) -> dict[str, dict]:
    """A seed's dense outputs (:data:`DENSE_OUTPUTS`, in order) by their datasets' names."""
    return {f"{branch.namespace}.{name}": value for name, value in zip(DENSE_OUTPUTS, values, strict=True)}


def _dense_metrics(branch: Branch, model: ModelConfig, net, train_split, test_split, training: TrainRecipe,
                   result: TrainResult, started_at: float, **extra) -> dict:
    """A dense run's record: last-epoch test accuracy, the parameters, the wall-clock to θ_k."""
    k = training.rewind_epoch
    return {
        **branch.as_dict(),
        "model": model.name,
        "dataset": train_split.info.name,
        "rewind_epoch": k,
        "parameters": count_parameters(net),
        "prunable_weights": count_prunable(net),
        "prunable": describe(model.prunable),  # which weights the methods may prune (model.prunable)
        "prunable_layers": len(prunable_parameters(net)),
        "kept_weights": count_prunable(net),
        "achieved_sparsity": 0.0,
        "test_accuracy": result.final["test_accuracy"],
        "test_loss": result.final["test_loss"],
        "test_images": len(test_split),  # one image is 100 / test_images points of accuracy
        "seconds": {"to_rewind": result.seconds_until(k), "train": result.seconds,
                    "test_during_training": result.eval_seconds},
        "history": result.history,
        "hardware": describe_hardware(train_split.device),
        "resumed_after_epoch": result.resumed_at,  # a killed run picked up from its checkpoint
        **extra,
        "started_at": started_at,
        "finished_at": time.time(),
    }


@distributable
def train_dense_seeds(
    train_data: dict,
    test_data: dict,
    model: ModelConfig,
    training: TrainRecipe,
    runtime: RuntimeConfig,
    *branches: Branch,
) -> dict[str, dict]:
    """The dense runs of several seeds (``runtime.stack_seeds``) as rows of one stacked network,
    each from its own seeded initialisation on its own data order (``core.train.batched``), or one
    after another where the model, the settings or (with ``auto``) a probe say so; in groups that fit
    the device's memory. Returns ``{dense.seed<N>.<output>: ...}`` with :func:`train_dense`'s four
    outputs for every seed, equal to its up to float rounding; each record's ``seconds`` is its
    seed's share of the stacked wall-clock (``dense_shared_by``).
    """
    started_at = time.time()
    device = device_for(runtime)
    train_split = split_from_payload(train_data, device, runtime.data_workers)
    test_split = split_from_payload(test_data, device, runtime.data_workers)
    nets = [build_network(model, train_split, device, seed=b.seed) for b in branches]
    inits = [state_on_cpu(net) for net in nets]
    net, k = nets[0], training.rewind_epoch
    seeds = [b.seed for b in branches]
    channels_last = uses_channels_last(runtime, net)
    stage = f"dense.seeds dense x{len(branches)}"

    def one_at_a_time(members: list[int]) -> dict[str, dict]:
        out = {}
        for i in members:
            out.update(_outputs(branches[i], *train_dense(train_data, test_data, model, training, runtime,
                                                          branches[i])))
        return out

    def stacked(members: list[int]) -> dict[str, dict]:
        group = [branches[i] for i in members]
        if len(group) == 1:
            return one_at_a_time(members)
        try:
            states, results = train_tickets(
                net, [None] * len(group), train_split, test_split, training, seed=[b.seed for b in group],
                starts=[inits[i] for i in members], snapshot_epochs={k}, stage=stage, progress=runtime.progress,
                channels_last=channels_last,
                checkpoint=checkpoint_for(runtime, "dense.seeds", "dense", model, training, [b.seed for b in group],
                                          data_fingerprint(train_data)),
            )
        except torch.OutOfMemoryError:
            states = None
        if states is None:  # outside the except clause, whose traceback holds the stacked rows
            release_cached_memory()
            logger.warning("%s: %d seeds stacked do not fit in device memory; training them one at a time", stage,
                           len(group))
            return one_at_a_time(members)
        out = {}
        for i, branch, state, result in zip(members, group, states, results, strict=True):
            metrics = _dense_metrics(branch, model, nets[i], train_split, test_split, training, result, started_at,
                                     dense_path=f"stacked x{len(group)}", dense_shared_by=len(group))
            progress.info("%s: %.2f %% test accuracy, dense, %.1f s share", branch.namespace,
                          metrics["test_accuracy"], result.seconds)
            out.update(_outputs(branch, inits[i], result.snapshots[k], state, metrics))
        return out

    everyone = list(range(len(branches)))
    # (Under torchrun, runtime.distributed.nproc is 1 but the processes are several: one at a time too.)
    if not may_train_stacked(net, training, runtime, device, stage) or rank_and_world()[1] > 1 \
            or not batched_if_faster(
                runtime, stage,
                lambda: stacked_training_ratio(net, [None] * len(seeds), train_split, training, seed=seeds,
                                               starts=inits, channels_last=channels_last),
                len(seeds), f"stacked training steps of {len(seeds)} seeds take", "training", "them stacked",
                settings=("stack_seeds",)):
        return one_at_a_time(everyone)
    per_group = plan_rows(device, len(seeds), training.batch_size,
                          lambda samples: probe_step(net, None, train_split, training, samples, seed=seeds[0],
                                                     channels_last=channels_last), stage,
                          eval_batch=training.eval_batch_size,
                          eval_probe=lambda samples: eval_probe_step(net, None, test_split, samples,
                                                                     channels_last=channels_last))
    out = {}
    for first in range(0, len(branches), per_group):
        out.update(stacked(everyone[first:first + per_group]))
    return out

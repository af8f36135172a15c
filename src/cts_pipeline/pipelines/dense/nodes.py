"""Dense training: one run that keeps θ_0, θ_k and the fully trained unpruned reference."""

from __future__ import annotations

import logging
import time

from ...config.sections import ModelConfig, RuntimeConfig
from ...config.sweep import Branch
from ...core.device.runtime import describe_hardware
from ...core.nets.masks import count_prunable
from ...core.nets.registry import count_parameters
from ...core.train.loop import state_on_cpu, train
from ...core.train.recipe import TrainRecipe
from ...terminal.console import PROGRESS_LOGGER
from ..common import (
    build_network,
    checkpoint_for,
    data_fingerprint,
    device_for,
    distributable,
    split_from_payload,
    uses_channels_last,
)


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
    metrics = {
        **branch.as_dict(),
        "model": model.name,
        "dataset": train_split.info.name,
        "rewind_epoch": k,
        "parameters": count_parameters(net),
        "prunable_weights": count_prunable(net),
        "kept_weights": count_prunable(net),
        "achieved_sparsity": 0.0,
        "test_accuracy": result.final["test_accuracy"],
        "test_loss": result.final["test_loss"],
        "test_images": len(test_split),  # one image is 100 / test_images points of accuracy
        "seconds": {"to_rewind": result.seconds_until(k), "train": result.seconds,
                    "test_during_training": result.eval_seconds},
        "history": result.history,
        "hardware": describe_hardware(device),
        "resumed_after_epoch": result.resumed_at,  # a killed run picked up from its checkpoint
        "started_at": started_at,
        "finished_at": time.time(),
    }
    logging.getLogger(PROGRESS_LOGGER).info("%s: %.2f %% test accuracy, dense, %.1f s", branch.namespace,
                                            metrics["test_accuracy"], result.seconds)
    return theta_init, result.snapshots[k], state_on_cpu(net), metrics

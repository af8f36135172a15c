"""Lottery ticket rewinding: iterative global magnitude pruning, 20 % per level, rewound to θ_k."""

from __future__ import annotations

import time

from ...config.sections import ModelConfig, RuntimeConfig
from ...config.sweep import Branch
from ...core.device.runtime import describe_hardware
from ...core.nets.masks import mask_to_payload
from ...core.prune.ltr import lottery_ticket_rewinding
from ...core.train.recipe import TrainRecipe
from ..common import (
    build_network,
    checkpoint_for,
    data_fingerprint,
    device_for,
    distributable,
    split_from_payload,
)


@distributable
def prune_iteratively(
    theta_rewind: dict,
    dense_final_weights: dict,
    dense_metrics: dict,
    train_data: dict,
    test_data: dict,
    model: ModelConfig,
    training: TrainRecipe,
    runtime: RuntimeConfig,
    branch: Branch,
) -> tuple[dict, dict]:
    """All levels of one seed, down to the deepest level of the grid, in one resumable run.

    Level 0 is the dense run already trained; level ``L``'s mask keeps the largest ``0.8^L·d``
    magnitudes of level ``L − 1``'s trained weights; every level trains from ``θ_k`` at epoch ``k``.
    Returns the masks of the grid's levels and the per-level log (times are cumulative: the cost of
    finding a level's mask includes the dense training and every level before it).
    """
    started_at = time.time()
    device = device_for(runtime)
    train_split = split_from_payload(train_data, device, runtime.data_workers)
    test_split = split_from_payload(test_data, device, runtime.data_workers)
    levels, max_level = branch.settings["levels"], branch.settings["max_level"]
    key = (model, training, branch.as_dict(), theta_rewind, data_fingerprint(train_data))
    masks, records = lottery_ticket_rewinding(
        lambda: build_network(model, train_split, device, state=theta_rewind),
        dense_final_weights, train_split, test_split, training,
        seed=branch.seed, max_level=max_level, start_epoch=training.rewind_epoch,
        dense_seconds=dense_metrics["seconds"]["train"], keep_levels=set(levels), progress=runtime.progress,
        stage=branch.namespace, sync_batchnorm=runtime.sync_batchnorm, rank_passes=runtime.virtual_rank_passes,
        checkpoint=checkpoint_for(runtime, branch.namespace, "ltr", *key),
        level_checkpoint=lambda level: checkpoint_for(runtime, branch.namespace, f"ltr-level{level}", level, *key),
    )
    log = {
        **branch.as_dict(),
        "levels": [r.__dict__ for r in records],
        "hardware": describe_hardware(device),
        "started_at": started_at,
    }
    return {level: mask_to_payload(mask, masks_density(records, level)) for level, mask in masks.items()}, log


def masks_density(records, level: int) -> float:
    return next(r.density for r in records if r.level == level)


def select_level(level_masks: dict, levels_log: dict, branch: Branch) -> tuple[dict, dict]:
    """The mask of the level that reaches the branch's sparsity, and what it cost to find it."""
    level = branch.settings["level"]
    record = next(r for r in levels_log["levels"] if r["level"] == level)
    log = {
        **branch.as_dict(),
        "level": level,
        "level_density": record["density"],
        # The dense training and levels 1..L-1: finding this mask took all of them.
        "seconds": record["cumulative_seconds"],
        "includes_dense_training": True,
        "started_at": levels_log.get("started_at"),
    }
    return level_masks[level], log

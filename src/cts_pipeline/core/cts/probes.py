"""The probes that time the search's stacked forms against one at a time, on this device: K
densities as rows (``runtime.batch_sparsities: auto``) and S seeds as rows (``runtime.stack_seeds``).
Each searches copies of its own (logits, noise, a few batches), so no search's state is touched."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import nn

from ..data.splits import Split
from ..device.runtime import UniformNoise, seconds_per_step, synchronize
from ..nets.masks import prunable_parameters
from ..train.loop import to_layout
from ..train.recipe import TrainRecipe
from .balance import make_balancer
from .config import SearchConfig
from .forwards import batch_statistics, check_stacked
from .relaxation import ConcreteMask
from .search import concrete_search, frozen_for_search, search_step


def stacked_search_ratio(model: nn.Module, train_split: Split, densities: Sequence[float], config: SearchConfig,
                         recipe: TrainRecipe, *, seed: int, channels_last: bool = False, steps: int = 2) -> float:
    """The time of one batched search step over K densities against K single steps: below 1,
    searching the K densities together saves time on this device; above 1, one at a time does.

    The stacked layout wins where K copies of the activations stay cheap (the digits convnet on a
    CPU: 0.77 of the time) and loses where they do not (ResNet-20 at batch 512 on a CPU: 2.0×), and
    no rule of thumb predicts that across devices and shapes, so it is measured, as cuDNN's
    benchmark mode measures its algorithms. Each side runs one warm-up step and ``steps`` timed
    ones on logits, optimizers, noise and a batch of its own (the split's first samples), so the
    search's own state and random streams are untouched.
    """
    device = train_split.device
    objective = config.resolved_objective
    lr = config.lr if config.lr is not None else recipe.lr
    index = torch.arange(min(recipe.batch_size, len(train_split)))
    x = to_layout(train_split.take(index), channels_last)
    y = train_split.labels[index].to(device)
    weights = prunable_parameters(model)

    def seconds_per_step(density: float | list[float]) -> float:
        relaxation = ConcreteMask(weights, density)
        balancer = make_balancer(config.balance, density, relaxation.num_weights, lr)
        optimizer = torch.optim.Adam([relaxation.logits], lr=lr, fused=True)
        noise = UniformNoise(device, seed, "stacking-probe", 0)
        if relaxation.batched:
            relaxation.stacked = check_stacked(model, relaxation, x, "stacking probe")
        for i in range(steps + 1):
            if i == 1:  # after the warm-up step
                synchronize(device)
                started = time.perf_counter()
            search_step(model, relaxation, objective, balancer, optimizer, noise, x, y, config.effective_loss_scale)
        synchronize(device)
        return (time.perf_counter() - started) / steps

    with frozen_for_search(model, channels_last), batch_statistics(model):
        return seconds_per_step([float(k) for k in densities]) / (len(densities) * seconds_per_step(densities[0]))


def seed_rows_ratio(model: nn.Module, train_split: Split, densities: Sequence[float], config: SearchConfig,
                    recipe: TrainRecipe, *, seeds: Sequence[int], starts: Sequence[Mapping[str, torch.Tensor]],
                    channels_last: bool = False, steps: int = 2) -> float:
    """The time of a step of S seeds' searches as rows against S seeds' batched steps one after
    another: below 1, the seeds search faster together on this device (``runtime.stack_seeds: auto``).

    Each side searches copies (no checkpoint) for one epoch of one batch and one of ``1 + steps``
    batches, after one warm-up: the difference is ``steps`` steps without the set-up, as
    :func:`..train.batched.stacked_training_ratio` measures training.
    """
    probe_config = replace(config, epochs=1)
    one_batch = train_split.subset(recipe.batch_size)
    more = train_split.subset(min(len(train_split), (1 + steps) * recipe.batch_size))
    taken = math.ceil(len(more) / recipe.batch_size) - 1
    device = train_split.device

    def as_rows(split: Split) -> None:
        concrete_search(model, split, density=list(densities), config=probe_config, recipe=recipe, seed=list(seeds),
                        starts=starts, stage="stacking probe", progress=False, channels_last=channels_last)

    def one_after_another(split: Split) -> None:
        for seed, start in zip(seeds, starts, strict=True):
            alone = copy.deepcopy(model)
            alone.load_state_dict(start)
            concrete_search(alone, split, density=list(densities), config=probe_config, recipe=recipe, seed=seed,
                            stage="stacking probe", progress=False, channels_last=channels_last)

    return (seconds_per_step(as_rows, one_batch, more, taken, device)
            / seconds_per_step(one_after_another, one_batch, more, taken, device))

"""A search's virtual ranks as rows of one stacked pass, against the same ranks one after another.

The sequential ranks are the reference (``rank_passes="sequential"``): ``test_distributed.py`` checks
them against two gloo processes. One process, so equality is to float rounding.
"""

from __future__ import annotations

import logging

import pytest
import torch

from cts_pipeline.core.cts import SearchConfig, concrete_search
from cts_pipeline.core.cts.forwards import batch_statistics
from cts_pipeline.core.cts.objectives import OBJECTIVES
from cts_pipeline.core.cts.rank_rows import draw_rank_noise, objective_and_rank_gradients
from cts_pipeline.core.cts.relaxation import ConcreteMask
from cts_pipeline.core.cts.search import _objective_and_gradient
from cts_pipeline.core.data.splits import load_splits
from cts_pipeline.core.device.dispatched_ops import DispatchedOps
from cts_pipeline.core.device.runtime import UniformNoise
from cts_pipeline.core.device.virtual_ranks import RankLayout
from cts_pipeline.core.nets.masks import global_topk_mask, prunable_parameters
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.train.recipe import TrainRecipe

from .test_one_pass_ranks import cifar_like, relative_gap

RANKS = 4


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits")


def convnet():
    return build_model("convnet", image_shape=(1, 8, 8), num_classes=10, width=4,
                       generator=torch.Generator().manual_seed(0))


def noises(epoch: int = 0) -> list[UniformNoise]:
    layout = RankLayout(RANKS)
    return [UniformNoise(torch.device("cpu"), 0, "concrete-noise", epoch, *layout.stream_suffix(c))
            for c in range(RANKS)]


@pytest.mark.cross_path
@pytest.mark.parametrize(("network", "densities", "objective"), [
    ("convnet", 0.1, "kl"), ("convnet", [0.2, 0.05, 0.01], "kl"), ("resnet20", 0.1, "kl"),
    ("resnet20", [0.2, 0.05, 0.01], "kl"),
    ("convnet", [0.2, 0.05], "ce"),  # no teacher
    ("convnet", [0.2, 0.05], "dloss"),  # not a batch mean; its cross-entropies are float32 by design
])
def test_rows_give_each_rank_its_objective_and_gradient_in_exact_arithmetic(network, densities, objective):
    """One step in float64 (where only a wrong statistic, chunk or noise row could differ): each
    rank's objective and gradient to the logits, rows against chunks, within 1e-10 relative."""
    if network == "convnet":
        model, split = convnet(), load_splits("digits")[0].subset(64)
    else:
        model = build_model("resnet20", image_shape=(3, 32, 32), num_classes=10, width=8,
                            generator=torch.Generator().manual_seed(0), shortcut="conv3x3", bn_running_stats=False)
        split = cifar_like(32)
    model = model.double()
    x, y = split.take(torch.arange(len(split))).double(), split.labels
    relaxation = ConcreteMask(prunable_parameters(model), densities)
    layout, objective = RankLayout(RANKS), OBJECTIVES[objective]
    with batch_statistics(model):
        rows_loss, rows_grad = objective_and_rank_gradients(model, relaxation, objective,
                                                            draw_rank_noise(relaxation, noises()), x, y, layout, 1.0)
        chunks = [_objective_and_gradient(model, relaxation, objective, source, x_part, y_part, 1.0)
                  for source, (x_part, y_part) in zip(noises(), layout.chunks(x, y), strict=True)]
    tolerance = 1e-5 if objective is OBJECTIVES["dloss"] else 1e-10
    for c, (loss, grad) in enumerate(chunks):
        assert relative_gap(rows_loss[c], loss) < tolerance, f"rank {c}'s objective"
        assert relative_gap(rows_grad[c], grad) < tolerance, f"rank {c}'s gradient"


def search_both(split, densities, recipe, config, **options):
    found = {}
    for passes in ("one", "sequential"):
        model = convnet()
        found[passes] = concrete_search(model, split, density=densities, config=config, recipe=recipe, seed=0,
                                        progress=False, rank_passes=passes, **options)
    return found


@pytest.mark.cross_path
@pytest.mark.parametrize("densities", [0.05, [0.1, 0.03, 0.01]])
def test_rows_search_as_the_ranks_one_after_another_over_an_epoch(digits, densities):
    """An epoch (1000 samples, batch 64: 16 steps, the last one padded) of the digits convnet's search
    with 4 ranks: logits within 1e-4, the objective and λ within 1e-5 relative, the masks' kept
    counts equal and their overlap at least 0.95 (measured: 1.0)."""
    recipe = TrainRecipe(epochs=1, batch_size=64, lr=0.05, virtual_ranks=RANKS)
    found = search_both(digits[0].subset(1000), densities, recipe, SearchConfig(epochs=1))
    one, sequential = ([r] if not isinstance(r, list) else r for r in (found["one"], found["sequential"]))
    assert all(r.ranks_as_rows for r in one) and not any(r.ranks_as_rows for r in sequential)
    for got, want, density in zip(one, sequential, densities if isinstance(densities, list) else [densities],
                                  strict=True):
        for name, logits in want.scores.items():
            assert torch.allclose(got.scores[name], logits, rtol=0, atol=1e-4), name
        for a, b in zip(got.history, want.history, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["multiplier"] == pytest.approx(b["multiplier"], rel=1e-5)
        kept = {passes: global_topk_mask(r.scores, density) for passes, r in (("one", got), ("sequential", want))}
        counts = {p: sum(int(m.sum()) for m in masks.values()) for p, masks in kept.items()}
        assert counts["one"] == counts["sequential"]
        both = sum(int((kept["one"][n] & kept["sequential"][n]).sum()) for n in kept["one"])
        assert both / counts["one"] >= 0.95


def test_out_of_memory_in_the_rows_goes_on_one_rank_after_another_with_the_same_noise(digits, monkeypatch, caplog):
    """After an out-of-memory error in the rows, the step is repeated one chunk after another with
    the noise the rows drew: the search is then the sequential one to the bit (one process)."""
    recipe = TrainRecipe(epochs=1, batch_size=64, lr=0.05, virtual_ranks=RANKS)
    split, config = digits[0].subset(256), SearchConfig(epochs=2)
    calls = []

    def out_of_memory(*args, **kwargs):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    want = concrete_search(convnet(), split, density=0.05, config=config, recipe=recipe, seed=0, progress=False,
                           rank_passes="sequential")
    monkeypatch.setattr("cts_pipeline.core.cts.search.objective_and_rank_gradients", out_of_memory)
    with caplog.at_level(logging.WARNING):
        got = concrete_search(convnet(), split, density=0.05, config=config, recipe=recipe, seed=0, progress=False,
                              rank_passes="one")
    assert calls == [1], "tried once, then off for good"
    assert "one rank after another from now on" in caplog.text and not got.ranks_as_rows
    for name, logits in want.scores.items():
        assert torch.equal(got.scores[name], logits), name


def test_rows_forward_each_convolution_twice_per_step_not_twice_per_rank(digits):
    """The teacher's and the masked network's convolutions, once each per step for all the ranks: an
    epoch of two steps less an epoch of one (whose first step also checks the stacked layout)."""
    recipe = TrainRecipe(epochs=1, batch_size=64, lr=0.05, virtual_ranks=RANKS)
    layers = sum(isinstance(m, torch.nn.Conv2d) for m in convnet().modules())
    per_step = {}
    for passes in ("one", "sequential"):
        counts = []
        for steps in (1, 2):
            with DispatchedOps() as ops:
                concrete_search(convnet(), digits[0].subset(64 * steps), density=0.05, config=SearchConfig(epochs=1),
                                recipe=recipe, seed=0, progress=False, rank_passes=passes)
            counts.append(len(ops.named("convolution")))
        per_step[passes] = counts[1] - counts[0]
    assert per_step == {"one": 2 * layers, "sequential": 2 * layers * RANKS}

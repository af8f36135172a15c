"""N virtual ranks in one pass (ghost BatchNorm) against the same ranks one chunk after another.

The sequential chunks are the reference (``rank_passes="sequential"``): they are the authors' N
GPUs by construction (``test_recipe_options.py`` checks one step of them against DDP written
out). One process, so equality is to float rounding: the reductions run in another order.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cts_pipeline.core.data.registry import DATASETS
from cts_pipeline.core.data.splits import Split, load_splits
from cts_pipeline.core.device.dispatched_ops import DispatchedOps
from cts_pipeline.core.device.ghost_batchnorm import ghost_batchnorm
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.train.loop import _TrainingRun, train
from cts_pipeline.core.train.recipe import TrainRecipe

DIGITS = (1, 8, 8)
WEIGHTS_RTOL = 1e-5  # the bound on the weights after an epoch, relative to each tensor's norm


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits")


def convnet(**options) -> nn.Module:
    return build_model("convnet", image_shape=DIGITS, num_classes=10, width=4,
                       generator=torch.Generator().manual_seed(0), **options)


def cifar_like(n: int) -> Split:
    """``n`` random 32×32 images (ResNet-20's input), labelled at random."""
    g = torch.Generator().manual_seed(1)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.randint(0, 10, (n,), generator=g), DATASETS["cifar10"])


def norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def train_both(make_model, split: Split, recipe: TrainRecipe, **options):
    models, results = [], []
    for passes in ("one", "sequential"):
        model = make_model()
        results.append(train(model, split, None, recipe, seed=0, stage=passes, progress=False,
                             rank_passes=passes, **options))
        models.append(model)
    return models, results


def assert_same_training(one: nn.Module, sequential: nn.Module, results) -> None:
    for (name, got), want in zip(one.named_parameters(), sequential.parameters(), strict=True):
        assert relative_gap(got, want) < WEIGHTS_RTOL, name
    for got, want in zip(norms(one), norms(sequential), strict=True):
        if want.running_mean is not None:
            assert relative_gap(got.running_mean, want.running_mean) < WEIGHTS_RTOL
            assert relative_gap(got.running_var, want.running_var) < WEIGHTS_RTOL
            assert torch.equal(got.num_batches_tracked, want.num_batches_tracked)
    one_record, sequential_record = (r.final for r in results)
    assert one_record["train_loss"] == pytest.approx(sequential_record["train_loss"], rel=1e-5)
    assert one_record["train_accuracy"] == pytest.approx(sequential_record["train_accuracy"], abs=0.2)


@pytest.mark.cross_path
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("running_stats", [True, False])
def test_one_pass_trains_the_convnet_as_the_sequential_ranks(digits, reduction, running_stats):
    """An epoch of the digits convnet with 4 ranks, on 1000 samples: the padded last batch (1000 % 64
    = 40 samples, 10 a rank) is one of its steps."""
    recipe = TrainRecipe(epochs=1, batch_size=64, lr=0.05, weight_decay=1e-3, loss_reduction=reduction,
                         virtual_ranks=4, grad_clip_norm=5.0 if reduction == "sum" else None)
    (one, sequential), results = train_both(lambda: convnet(bn_running_stats=running_stats),
                                            digits[0].subset(1000), recipe)
    assert_same_training(one, sequential, results)


class InFloat64(nn.Module):
    """Casts the loop's float32 batches to float64, so that the model runs in float64."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def resnet20(dtype: torch.dtype = torch.float32) -> nn.Module:
    net = build_model("resnet20", image_shape=(3, 32, 32), num_classes=10,
                      generator=torch.Generator().manual_seed(0)).to(dtype)
    return nn.Sequential(InFloat64(), net) if dtype == torch.float64 else net


@pytest.mark.cross_path
@pytest.mark.parametrize("channels_last", [False, True])
def test_one_pass_trains_resnet20_as_the_sequential_ranks_in_exact_arithmetic(channels_last):
    """ResNet-20, 4 ranks, an epoch of 3 steps (the last one padded: 90 samples to 92, 23 a rank),
    in float64, where rounding cannot hide a wrong statistic or weight: every tensor within 1e-10
    relative (measured: 3e-14 at worst). In float32 the two paths' rounding differs, and one step's
    gap grows with every step of a 20-layer network on random labels (after 3 steps: 6e-6 with
    AVX-512 kernels, 1.3e-4 with the unvectorised ones); the next test bounds one step in float32."""
    recipe = TrainRecipe(epochs=1, batch_size=32, lr=0.05, weight_decay=5e-4, virtual_ranks=4)
    (one, sequential), results = train_both(lambda: resnet20(torch.float64), cifar_like(90), recipe,
                                            channels_last=channels_last)
    for (name, got), want in zip(one.named_parameters(), sequential.parameters(), strict=True):
        assert relative_gap(got, want) < 1e-10, name
    for got, want in zip(norms(one), norms(sequential), strict=True):
        assert relative_gap(got.running_mean, want.running_mean) < 1e-10
        assert relative_gap(got.running_var, want.running_var) < 1e-10
    assert results[0].final["train_loss"] == pytest.approx(results[1].final["train_loss"], rel=1e-6)


@pytest.mark.cross_path
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_pass_gives_resnet20_the_sequential_ranks_gradients_in_float32(reduction):
    """One step of ResNet-20 in float32, 4 ranks: the gradients within 1e-5 relative (measured
    1.6e-6 with AVX-512, AVX2 and unvectorised kernels), the loss and correct count as reported.

    NCHW only: in float32 the sequential path's own channels_last step differs from its NCHW step by
    4e-3 (ResNet-20's BatchNorm backward over 8-sample chunks in channels_last, torch 2.14.1 on CPU),
    so it is no reference at 1e-5; the float64 test above covers both layouts."""
    recipe = TrainRecipe(epochs=1, batch_size=32, lr=0.05, virtual_ranks=4, loss_reduction=reduction)
    split = cifar_like(32)
    x, y = split.take(torch.arange(32)), split.labels
    gradients, reported = {}, {}
    for passes in ("one", "sequential"):
        model = resnet20()
        run = _TrainingRun.set_up(model, split, recipe, mask=None, start_epoch=0, channels_last=False,
                                  compile_model=False, sync_batchnorm=False, rank_passes=passes)
        with run.released:
            loss, correct = run._forward_backward(x, y, 1.0)
        gradients[passes] = torch.cat([p.grad.flatten() for p in model.parameters()])
        reported[passes] = (loss.item(), correct.item())
    assert relative_gap(gradients["one"], gradients["sequential"]) < WEIGHTS_RTOL
    assert reported["one"][0] == pytest.approx(reported["sequential"][0], rel=1e-6)
    assert reported["one"][1] == reported["sequential"][1]


def test_one_pass_forwards_each_convolution_once_per_step(digits):
    """What a launch-bound GPU pays: one convolution per layer and step, not one per rank."""
    split = digits[0].subset(64)
    recipe = TrainRecipe(epochs=1, batch_size=64, lr=0.05, virtual_ranks=4)
    x, y = split.take(torch.arange(64)), split.labels[:64]
    counts = {}
    for passes in ("one", "sequential"):
        model = convnet()
        run = _TrainingRun.set_up(model, split, recipe, mask=None, start_epoch=0, channels_last=False,
                                  compile_model=False, sync_batchnorm=False, rank_passes=passes)
        with run.released, DispatchedOps() as ops:
            run._step(x, y)
        counts[passes] = len(ops.named("convolution"))
    layers = sum(isinstance(m, nn.Conv2d) for m in convnet().modules())
    assert counts == {"one": layers, "sequential": 4 * layers}


def test_the_model_is_given_back_with_plain_buffers_whatever_ends_the_run(digits):
    """The ghost BatchNorm's views and forward exist only while the training runs: after it, and
    after a step that raised, the buffers are the model's own tensors again (holding rank 0's
    statistics) and the forward is the class's."""
    model = convnet()
    own = [(m.running_mean, m.running_var) for m in norms(model)]
    recipe = TrainRecipe(epochs=1, batch_size=64, lr=0.05, virtual_ranks=4)
    train(model, digits[0].subset(128), None, recipe, seed=0, stage="one", progress=False, rank_passes="one")
    for m, (mean, var) in zip(norms(model), own, strict=True):
        assert m.running_mean is mean and m.running_var is var and "forward" not in vars(m)
        assert not torch.equal(mean, torch.zeros_like(mean)), "rank 0's statistics were copied back"

    broken = convnet()
    with pytest.raises(ValueError, match="cannot be dealt equally to 4 virtual ranks"), \
            ghost_batchnorm(broken, 4):
        broken.train()(digits[0].take(torch.arange(6)))
    assert all("forward" not in vars(m) and m.running_mean.untyped_storage().nbytes() == m.running_mean.nbytes
               for m in norms(broken))


def test_a_deep_copy_under_ghost_batchnorm_normalises_with_its_own_statistics(digits):
    """A bound method (not a closure) is what a deep copy rebinds: the copy's forward updates the
    copy's statistics, not the original's."""
    model = convnet().train()
    x = digits[0].take(torch.arange(64))
    with ghost_batchnorm(model, 4):
        twin = copy.deepcopy(model)
        before = norms(model)[0].running_mean.clone()
        twin(x)
        assert torch.equal(norms(model)[0].running_mean, before)
        assert not torch.equal(norms(twin)[0].running_mean, before)


def test_auto_plays_the_ranks_in_one_pass_on_a_gpu_and_one_chunk_after_another_on_a_cpu():
    from cts_pipeline.core.device.virtual_ranks import RankLayout

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert [RankLayout(4).one_pass("auto", d) for d in (cpu, cuda)] == [False, True]
    assert [RankLayout(4).one_pass(p, cpu) for p in ("one", "sequential")] == [True, False]
    # a process that plays one rank has nothing to put in one pass
    assert not RankLayout(2, process=1, processes=2).one_pass("one", cuda)
    assert not RankLayout(1).one_pass("one", cuda)


def test_unknown_rank_passes_are_refused_naming_the_setting(digits):
    recipe = TrainRecipe(epochs=1, batch_size=64, lr=0.05, virtual_ranks=4)
    with pytest.raises(ValueError, match="runtime.virtual_rank_passes must be one of auto, one, sequential"):
        train(convnet(), digits[0].subset(64), None, recipe, seed=0, stage="x", progress=False,
              rank_passes="parallel")


def test_a_test_evaluation_inside_a_one_pass_training_normalises_its_whole_batch(digits):
    """With batch statistics at test time (the paper presets' bn_running_stats: false), the training
    run's own test evaluation normalises each test batch whole, as the sequential ranks' does and as
    an evaluation after the run does: not per rank (a test batch of 30 would not even divide by 4)."""
    from cts_pipeline.core.train.loop import evaluate

    recipe = TrainRecipe(epochs=1, batch_size=64, lr=0.05, virtual_ranks=4, eval_batch_size=30)
    test = digits[1].subset(90)
    for passes in ("one", "sequential"):
        model = convnet(bn_running_stats=False)
        result = train(model, digits[0].subset(128), test, recipe, seed=0, stage=passes, progress=False,
                       rank_passes=passes)
        after = evaluate(model, test, 30)
        assert result.final["test_loss"] == pytest.approx(after["loss"], rel=1e-6), passes
        assert result.final["test_accuracy"] == after["accuracy"], passes

"""Retraining K tickets stacked against K runs of the plain training loop: the same weights,
running statistics, losses and accuracies up to float rounding."""

from __future__ import annotations

import pytest
import torch

import cts_pipeline.core.train.batched as bt
from cts_pipeline.core.data.splits import load_splits
from cts_pipeline.core.nets.masks import global_topk_mask, prunable_parameters
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.train.batched import supports, train_tickets
from cts_pipeline.core.train.loop import train
from cts_pipeline.core.train.recipe import TrainRecipe


@pytest.fixture(scope="module")
def digits():
    train_split, test_split = load_splits("digits")
    return train_split.subset(256), test_split.subset(128)


def net(name="convnet"):
    options = {"width": 4} if name == "convnet" else {}
    return build_model(name, image_shape=(1, 8, 8), num_classes=10, generator=torch.Generator().manual_seed(0),
                       **options)


def random_masks(model, densities):
    g = torch.Generator().manual_seed(5)
    return [global_topk_mask({n: torch.rand(w.shape, generator=g) for n, w in prunable_parameters(model).items()}, k)
            for k in densities]


@pytest.mark.cross_path
@pytest.mark.parametrize(("name", "recipe"), [
    ("convnet", TrainRecipe(epochs=3, batch_size=64, lr=0.1, rewind_epoch=1, milestones=[2], weight_decay=5e-4)),
    ("convnet", TrainRecipe(epochs=2, batch_size=48, lr=0.05, loss_reduction="sum", grad_clip_norm=2.0,
                            augment=True, nesterov=True)),
    ("lenet_300_100", TrainRecipe(epochs=2, batch_size=64, lr=0.1, eval_every=2)),
    # Virtual ranks, stacked in one pass against one ticket at a time with its ranks one after another
    # (on a CPU, `auto`): 4 ranks; 3 ranks with a summed loss, where 256 samples pad to 258 and the
    # last batch of 18 gives each rank 6.
    ("convnet", TrainRecipe(epochs=2, batch_size=64, lr=0.1, weight_decay=5e-4, virtual_ranks=4)),
    ("convnet", TrainRecipe(epochs=2, batch_size=48, lr=0.05, loss_reduction="sum", grad_clip_norm=2.0,
                            augment=True, virtual_ranks=3)),
])
def test_stacked_retraining_equals_one_ticket_at_a_time(digits, name, recipe):
    train_split, test_split = digits
    start = net(name)
    masks = random_masks(start, [0.5, 0.2, 0.05])
    first = recipe.rewind_epoch
    singles = []
    for mask in masks:
        model = net(name)
        result = train(model, train_split, test_split, recipe, seed=2, stage="one", start_epoch=first, mask=mask,
                       progress=False)
        singles.append((model.state_dict(), result))
    states, results = train_tickets(net(name), masks, train_split, test_split, recipe, seed=2, stage="stacked",
                                    start_epoch=first, progress=False)
    for k, ((single_state, single), state, result, mask) in enumerate(zip(singles, states, results, masks,
                                                                            strict=True)):
        assert list(state) == list(single_state)
        for key, value in single_state.items():
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=f"ticket {k}: {key}")
        for n, keep in mask.items():
            assert not state[n][~keep].any(), f"ticket {k}: pruned weights of {n} are not zero"
        assert [r["epoch"] for r in result.history] == [r["epoch"] for r in single.history]
        for mine, theirs in zip(result.history, single.history, strict=True):
            assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
            assert mine["train_accuracy"] == pytest.approx(theirs["train_accuracy"], abs=100 / len(train_split) + 1e-9)
            assert ("test_accuracy" in mine) == ("test_accuracy" in theirs)
            if "test_accuracy" in mine:
                assert mine["test_accuracy"] == pytest.approx(theirs["test_accuracy"], abs=100 / len(test_split) + 1e-9)
            assert mine["shared_by"] == 3


def test_stacked_retraining_resumes_from_its_checkpoint(digits, tmp_path):
    from cts_pipeline.core.artifacts.checkpoints import Checkpoint

    train_split, test_split = digits
    recipe = TrainRecipe(epochs=3, batch_size=64, lr=0.1)
    masks = random_masks(net(), [0.5, 0.1])
    straight, _ = train_tickets(net(), masks, train_split, None, recipe, seed=1, stage="s", progress=False)
    checkpoint = Checkpoint(tmp_path / "c.pt", "key")
    two = TrainRecipe(epochs=3, batch_size=64, lr=0.1)

    real = bt.iterate_batches
    calls = []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during epoch 3: epochs 1 and 2 are checkpointed
        return real(*args, **kwargs)

    bt.iterate_batches = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            train_tickets(net(), masks, train_split, None, two, seed=1, stage="s", checkpoint=checkpoint,
                          progress=False)
    finally:
        bt.iterate_batches = real
    resumed, results = train_tickets(net(), masks, train_split, None, two, seed=1, stage="s", checkpoint=checkpoint,
                                     progress=False)
    assert results[0].resumed_at == 2 and len(results[0].history) == 3
    for a, b in zip(straight, resumed, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert not (tmp_path / "c.pt").exists()


def test_models_the_stacked_layout_does_not_know_are_declined(digits):
    zeropad = build_model("resnet20", image_shape=(3, 16, 16), num_classes=10, width=4, shortcut="zeropad")
    cpu = torch.device("cpu")
    assert not supports(zeropad, TrainRecipe(epochs=1, batch_size=8, lr=0.1), cpu)
    assert supports(net(), TrainRecipe(epochs=1, batch_size=8, lr=0.1), cpu)
    with pytest.raises(ValueError, match="cannot train stacked"):
        train_tickets(zeropad, [], digits[0], None, TrainRecipe(epochs=1, batch_size=8, lr=0.1), seed=0, stage="x")


def test_the_stacking_probe_trains_nothing_of_the_model(digits):
    """``stacked_training_ratio`` trains copies: the start weights are untouched."""
    model = net()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    ratio = bt.stacked_training_ratio(model, random_masks(model, [0.5, 0.1]), digits[0],
                                      TrainRecipe(epochs=3, batch_size=64, lr=0.1, milestones=[2]), seed=0)
    assert 0.0 < ratio < float("inf")
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_tickets_stack_under_virtual_ranks_only_where_the_ranks_run_in_one_pass():
    """Stacked, a ticket's ranks run in one pass: the pipeline stacks them where
    runtime.virtual_rank_passes chooses one pass on the device (auto: a GPU), never one rank after another."""
    from cts_pipeline.core.train.batched import stacks_ranks

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    ranks, plain = TrainRecipe(epochs=1, batch_size=8, lr=0.1, virtual_ranks=4), TrainRecipe(epochs=1, batch_size=8, lr=0.1)
    assert [stacks_ranks(ranks, "auto", d) for d in (cpu, cuda)] == [False, True]
    assert [stacks_ranks(ranks, p, cpu) for p in ("one", "sequential")] == [True, False]
    assert not stacks_ranks(ranks, "sequential", cuda)
    assert all(stacks_ranks(plain, p, d) for p in ("auto", "sequential") for d in (cpu, cuda))

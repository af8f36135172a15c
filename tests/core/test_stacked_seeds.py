"""Seeds as rows (``runtime.stack_seeds``): the dense runs of S seeds, and the S × K retrainings of
their tickets, trained as one stacked network, against the plain training loop run per seed and
ticket: the same weights, running statistics, snapshots, losses and accuracies up to float
rounding. Each row has its own initialisation and its own data order (its seed's batches)."""

from __future__ import annotations

import pytest
import torch

import cts_pipeline.core.train.batched as bt
from cts_pipeline.core.artifacts.checkpoints import Checkpoint
from cts_pipeline.core.data.splits import load_splits
from cts_pipeline.core.nets.masks import global_topk_mask, prunable_parameters
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.train.batched import train_tickets
from cts_pipeline.core.train.loop import state_on_cpu, train
from cts_pipeline.core.train.recipe import TrainRecipe


@pytest.fixture(scope="module")
def digits():
    train_split, test_split = load_splits("digits")
    return train_split.subset(256), test_split.subset(128)


def net(name: str, seed: int):
    options = {"width": 4} if name == "convnet" else {}
    return build_model(name, image_shape=(1, 8, 8), num_classes=10, generator=torch.Generator().manual_seed(seed),
                       **options)


def assert_states_close(mine: dict, theirs: dict, what: str) -> None:
    assert list(mine) == list(theirs)
    for key, value in theirs.items():
        torch.testing.assert_close(mine[key], value, rtol=1e-4, atol=1e-5, msg=f"{what}: {key}")


def assert_histories_close(mine, theirs, samples: int, test_samples: int) -> None:
    assert [r["epoch"] for r in mine] == [r["epoch"] for r in theirs]
    for a, b in zip(mine, theirs, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["train_accuracy"] == pytest.approx(b["train_accuracy"], abs=100 / samples + 1e-9)
        assert ("test_accuracy" in a) == ("test_accuracy" in b)
        if "test_accuracy" in a:
            assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=100 / test_samples + 1e-9)


@pytest.mark.cross_path
@pytest.mark.parametrize(("name", "recipe"), [
    ("convnet", TrainRecipe(epochs=3, batch_size=64, lr=0.1, rewind_epoch=1, milestones=[2], weight_decay=5e-4)),
    # augmentation (each seed its own crops and flips), a summed loss clipped per row
    ("convnet", TrainRecipe(epochs=2, batch_size=48, lr=0.05, loss_reduction="sum", grad_clip_norm=2.0,
                            augment=True, rewind_epoch=1)),
    # a linear first layer: each row's flattened input through its own weights
    ("lenet_300_100", TrainRecipe(epochs=2, batch_size=64, lr=0.1, rewind_epoch=1, eval_every=2)),
    # 3 virtual ranks in one pass, with a padded last batch (256 samples pad to 258)
    ("convnet", TrainRecipe(epochs=2, batch_size=48, lr=0.05, weight_decay=5e-4, virtual_ranks=3, rewind_epoch=1)),
])
def test_dense_runs_of_three_seeds_as_rows_equal_three_runs(digits, name, recipe):
    train_split, test_split = digits
    seeds = [0, 1, 2]
    k = recipe.rewind_epoch
    singles = []
    for seed in seeds:
        model = net(name, seed)
        result = train(model, train_split, test_split, recipe, seed=seed, stage="one", snapshot_epochs={0, k},
                       progress=False)
        singles.append((state_on_cpu(model), result))
    starts = [state_on_cpu(net(name, seed)) for seed in seeds]
    states, results = train_tickets(net(name, 99), [None] * 3, train_split, test_split, recipe, seed=seeds,
                                    starts=starts, snapshot_epochs={0, k}, stage="stacked", progress=False)
    for seed, (single_state, single), state, result in zip(seeds, singles, states, results, strict=True):
        assert_states_close(state, single_state, f"seed {seed}")
        assert_states_close(result.snapshots[0], single.snapshots[0], f"seed {seed}, θ_0")
        assert_states_close(result.snapshots[k], single.snapshots[k], f"seed {seed}, θ_{k}")
        assert_histories_close(result.history, single.history, len(train_split), len(test_split))


@pytest.mark.cross_path
def test_tickets_of_two_seeds_retrain_as_rows_from_their_own_start_weights(digits):
    """2 seeds × 2 masks: each row from its seed's θ_k, on its seed's batches."""
    train_split, test_split = digits
    recipe = TrainRecipe(epochs=3, batch_size=64, lr=0.1, rewind_epoch=1, milestones=[2], weight_decay=5e-4,
                         augment=True)
    rows = []
    for seed in (3, 4):
        start = net("convnet", seed)
        g = torch.Generator().manual_seed(seed)
        scores = {n: torch.rand(w.shape, generator=g) for n, w in prunable_parameters(start).items()}
        rows += [(seed, state_on_cpu(start), global_topk_mask(scores, density)) for density in (0.3, 0.05)]
    states, results = train_tickets(net("convnet", 99), [mask for _, _, mask in rows], train_split, test_split, recipe,
                                    seed=[seed for seed, _, _ in rows], starts=[start for _, start, _ in rows],
                                    start_epoch=1, stage="stacked", progress=False)
    for (seed, start, mask), state, result in zip(rows, states, results, strict=True):
        model = net("convnet", 99)
        model.load_state_dict(start)
        single = train(model, train_split, test_split, recipe, seed=seed, stage="one", start_epoch=1, mask=mask,
                       progress=False)
        assert_states_close(state, state_on_cpu(model), f"seed {seed}")
        assert_histories_close(result.history, single.history, len(train_split), len(test_split))
        for n, keep in mask.items():
            assert not state[n][~keep].any(), f"seed {seed}: pruned weights of {n} are not zero"


def test_a_killed_run_of_seeds_as_rows_resumes_to_the_same_weights_and_snapshots(digits, tmp_path, monkeypatch):
    train_split, _ = digits
    recipe = TrainRecipe(epochs=3, batch_size=64, lr=0.1, rewind_epoch=1)
    seeds = [0, 1]

    def run(checkpoint=None):
        starts = [state_on_cpu(net("convnet", seed)) for seed in seeds]
        return train_tickets(net("convnet", 99), [None, None], train_split, None, recipe, seed=seeds, starts=starts,
                             snapshot_epochs={1}, stage="s", checkpoint=checkpoint, progress=False)

    straight, straight_results = run()
    real, calls = bt.iterate_batches, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # two streams an epoch: killed as epoch 3 begins, after epochs 1 and 2 are saved
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    checkpoint = Checkpoint(tmp_path / "c.pt", "key")
    monkeypatch.setattr(bt, "iterate_batches", dying)
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint)
    monkeypatch.setattr(bt, "iterate_batches", real)
    resumed, results = run(checkpoint)
    assert results[0].resumed_at == 2 and len(results[0].history) == 3
    for a, b, a_result, b_result in zip(straight, resumed, straight_results, results, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key
            assert torch.equal(a_result.snapshots[1][key], b_result.snapshots[1][key]), key
    assert not (tmp_path / "c.pt").exists()


def test_rows_must_all_have_a_mask_or_none(digits):
    model = net("convnet", 0)
    mask = global_topk_mask({n: torch.rand(w.shape) for n, w in prunable_parameters(model).items()}, 0.5)
    with pytest.raises(ValueError, match="every row has a mask or none"):
        train_tickets(model, [mask, None], digits[0], None, TrainRecipe(epochs=1, batch_size=64, lr=0.1),
                      seed=[0, 1], stage="x", progress=False)
    with pytest.raises(ValueError, match="2 rows but 3 seeds"):
        train_tickets(model, [None, None], digits[0], None, TrainRecipe(epochs=1, batch_size=64, lr=0.1),
                      seed=[0, 1, 2], stage="x", progress=False)

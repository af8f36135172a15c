"""Lottery ticket rewinding: the density grid, exact nested magnitude masks, a short run on digits."""

from __future__ import annotations

import copy

import pytest
import torch

from cts_pipeline.core.data.splits import load_splits
from cts_pipeline.core.nets.masks import count_prunable, prunable_parameters
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.prune import ltr
from cts_pipeline.core.prune.ltr import (
    LevelRecord,
    level_density,
    level_for_sparsity,
    lottery_ticket_rewinding,
    magnitude_mask,
)
from cts_pipeline.core.train.loop import train
from cts_pipeline.core.train.recipe import TrainRecipe

DIGITS_SHAPE = (1, 8, 8)
RECIPE = TrainRecipe(epochs=2, batch_size=128, lr=0.05, rewind_epoch=1)

# --------------------------------------------------------------------------------------------
# The grid


def test_level_density_is_0_8_to_the_level():
    assert level_density(0) == 1.0
    assert level_density(1) == 0.8
    assert level_density(22) == pytest.approx(0.0073787, rel=1e-4)
    for level in range(40):
        assert level_density(level) == 0.8**level


@pytest.mark.parametrize("level", [-1, 1.5, True])
def test_level_density_refuses_what_is_not_a_level(level):
    with pytest.raises(ValueError, match="non-negative integer"):
        level_density(level)


@pytest.mark.parametrize(
    ("sparsity", "level"),
    [(0.2, 1), (0.36, 2), (0.982, 18), (0.9885, 20), (0.9926, 22), (0.9953, 24), (0.9981, 28)],
)
def test_level_for_sparsity_on_the_grid(sparsity, level):
    assert level_for_sparsity(sparsity) == level


def test_level_for_sparsity_inverts_the_grid_exactly_and_as_printed():
    for level in range(31):
        assert level_for_sparsity(1 - 0.8**level) == level
        assert level_for_sparsity(round(1 - 0.8**level, 4)) == level
    # Between two levels, the next one up is the first to reach the request.
    assert level_for_sparsity(0.99) == 21  # level 20 is 98.85 %, level 21 is 99.08 %
    assert level_for_sparsity(0.0) == 0


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_level_for_sparsity_refuses_out_of_range(sparsity):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        level_for_sparsity(sparsity)


# --------------------------------------------------------------------------------------------
# Magnitude masks


def test_magnitude_mask_keeps_the_largest_absolute_values_globally():
    weights = {
        "a": torch.tensor([[0.5, -3.0], [0.1, 2.0]]),
        "b": torch.tensor([-0.2, 1.0, -0.05, -0.7]),
    }
    mask = magnitude_mask(weights, 0.5)  # 4 of 8: |-3.0|, 2.0, 1.0, |-0.7|
    assert mask["a"].tolist() == [[False, True], [False, True]]
    assert mask["b"].tolist() == [False, True, False, True]


def test_magnitude_mask_within_prefers_kept_zeros_over_pruned_zeros():
    # Pruned weights are 0; so is one kept weight. Keeping 3 of 6 forces a zero in: it must be the
    # kept one, or the masks would stop being nested.
    weights = {"w": torch.tensor([0.0, 0.0, 0.9, 0.0, -0.4, 0.0])}
    within = {"w": torch.tensor([False, False, True, True, True, False])}
    mask = magnitude_mask(weights, 0.5, within=within)
    assert mask["w"].tolist() == [False, False, True, True, True, False]


def test_magnitude_mask_within_refuses_to_grow():
    weights = {"w": torch.arange(1.0, 11.0)}
    within = {"w": torch.arange(10) < 4}
    with pytest.raises(ValueError, match="cannot keep 5 weights within a mask that keeps only 4"):
        magnitude_mask(weights, 0.5, within=within)


def test_thirty_levels_keep_exact_counts_and_nest():
    """d = 21,487 (not a multiple of 5): 0.8**L · d is never whole, so rounding is exercised."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"fc1.weight": (301, 67), "fc2.weight": (101, 13), "fc3.weight": (7,)}
    weights = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    d = sum(w.numel() for w in weights.values())
    assert d == 21_487 and d % 5 != 0

    previous = None
    for level in range(1, 31):
        mask = magnitude_mask(weights, level_density(level), within=previous)
        assert sum(int(m.sum()) for m in mask.values()) == round(0.8**level * d), level
        if previous is not None:
            for n in mask:
                assert not (mask[n] & ~previous[n]).any(), f"level {level} revives weights in {n}"
        # "Train" the survivors: new values, pruned ones exactly 0, and 30 % of the survivors
        # exactly 0 too, so the next level (which keeps 80 %) must break ties at zero.
        weights = {}
        for n, keep in mask.items():
            values = torch.randn(keep.shape, generator=gen) * keep
            dead = torch.rand(keep.shape, generator=gen) < 0.3
            weights[n] = values.masked_fill(dead, 0.0)
        previous = mask


# --------------------------------------------------------------------------------------------
# A short run on digits


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits")


@pytest.fixture(scope="module")
def dense(digits):
    """LeNet trained densely on digits: (θ_k at epoch 1, final state, training seconds)."""
    train_split, test_split = digits
    model = build_model("lenet_300_100", image_shape=DIGITS_SHAPE, num_classes=10,
                        generator=torch.Generator().manual_seed(0))
    rewind = {}

    def keep_rewind(done, m):
        if done == RECIPE.rewind_epoch:
            rewind.update(copy.deepcopy(m.state_dict()))

    result = train(model, train_split, test_split, RECIPE, seed=0, stage="dense",
                   on_epoch_end=keep_rewind, progress=False)
    return rewind, copy.deepcopy(model.state_dict()), result.seconds


def make_model_from(state):
    def make_model():
        model = build_model("lenet_300_100", image_shape=DIGITS_SHAPE, num_classes=10)
        model.load_state_dict(state)
        return model

    return make_model


def run_ltr(digits, dense, **kwargs):
    rewind, final, dense_seconds = dense
    train_split, test_split = digits
    return lottery_ticket_rewinding(
        make_model_from(rewind), final, train_split, test_split, RECIPE, seed=0,
        start_epoch=RECIPE.rewind_epoch, dense_seconds=dense_seconds, progress=False, **kwargs,
    )


@pytest.fixture(scope="module")
def ltr_run(digits, dense):
    """Three levels, every call to ``train`` intercepted: (masks, records, calls)."""
    calls = []
    real_train = ltr.train

    def spy(model, *args, mask, **kwargs):
        start = {n: p.detach().clone() for n, p in model.state_dict().items()}
        result = real_train(model, *args, mask=mask, **kwargs)
        weights = {n: p.detach().clone() for n, p in prunable_parameters(model).items()}
        calls.append({"start": start, "mask": mask, "weights": weights, "kwargs": kwargs,
                      "seconds": result.seconds})
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ltr, "train", spy)
        masks, records = run_ltr(digits, dense, max_level=3, keep_levels=(1, 2, 3))
    return masks, records, calls


def test_ltr_masks_have_exact_counts_and_nest(ltr_run):
    masks, records, _ = ltr_run
    d = count_prunable(build_model("lenet_300_100", image_shape=DIGITS_SHAPE, num_classes=10))
    assert d == 50_200  # 64·300 + 300·100 + 100·10
    assert sorted(masks) == [1, 2, 3]
    for level, mask in masks.items():
        assert sum(int(m.sum()) for m in mask.values()) == round(0.8**level * d)
        assert all(m.dtype == torch.bool and m.device.type == "cpu" for m in mask.values())
    for level in (2, 3):
        for n in masks[level]:
            assert not (masks[level][n] & ~masks[level - 1][n]).any()
    assert [r.kept for r in records] == [round(0.8**level * d) for level in (1, 2, 3)]
    assert [r.density for r in records] == [0.8, 0.8**2, 0.8**3]


def test_ltr_trains_each_level_but_the_last_from_the_rewind_point(ltr_run, dense):
    masks, _, calls = ltr_run
    rewind, _, _ = dense
    assert len(calls) == 2  # levels 1 and 2; level 3's ticket is retrained by the pipeline
    for level, call in enumerate(calls, start=1):
        assert call["kwargs"]["start_epoch"] == RECIPE.rewind_epoch
        assert call["kwargs"]["stage"] == f"ltr level {level}/3"  # the levels to go are in sight
        assert call["mask"] is masks[level]
        for n, value in call["start"].items():  # a fresh θ_k, not the previous level's weights
            assert torch.equal(value, rewind[n]), n
        for n, keep in call["mask"].items():  # pruned weights stayed exactly zero
            assert (call["weights"][n][~keep] == 0).all(), n
            assert (call["weights"][n][keep] != 0).any(), n


def test_ltr_ranks_each_level_by_the_previous_levels_trained_weights(ltr_run, dense):
    masks, _, calls = ltr_run
    _, final, _ = dense
    first = magnitude_mask({n: final[n] for n in masks[1]}, 0.8)
    for n in masks[1]:
        assert torch.equal(masks[1][n], first[n]), n
    for level in (2, 3):
        expected = magnitude_mask(calls[level - 2]["weights"], 0.8**level, within=masks[level - 1])
        for n in masks[level]:
            assert torch.equal(masks[level][n], expected[n]), (level, n)


def test_ltr_records_cost_to_find_each_mask(ltr_run, dense):
    _, records, calls = ltr_run
    _, _, dense_seconds = dense
    assert all(isinstance(r, LevelRecord) for r in records)
    assert [r.level for r in records] == [1, 2, 3]
    assert [r.seconds for r in records] == [calls[0]["seconds"], calls[1]["seconds"], 0.0]
    assert all(r.seconds > 0 for r in records[:2])
    assert records[0].cumulative_seconds == dense_seconds
    assert records[1].cumulative_seconds == pytest.approx(dense_seconds + records[0].seconds)
    assert records[2].cumulative_seconds == pytest.approx(
        dense_seconds + records[0].seconds + records[1].seconds)
    cumulative = [r.cumulative_seconds for r in records]
    assert cumulative == sorted(set(cumulative))  # strictly increasing
    assert all(20.0 < r.test_accuracy <= 100.0 for r in records[:2])  # trained, better than chance
    assert records[2].test_accuracy is None


def test_ltr_is_deterministic_and_returns_only_the_levels_asked_for(ltr_run, digits, dense):
    masks, records, _ = ltr_run
    again, again_records = run_ltr(digits, dense, max_level=3, keep_levels=[3])
    assert list(again) == [3]
    for n in masks[3]:
        assert torch.equal(again[3][n], masks[3][n])
    assert [r.kept for r in again_records] == [r.kept for r in records]


@pytest.mark.parametrize(("max_level", "keep", "message"),
                         [(0, (), "max_level"), (2, (3,), r"keep_levels \[3\]")])
def test_ltr_refuses_bad_levels(digits, dense, max_level, keep, message):
    with pytest.raises(ValueError, match=message):
        run_ltr(digits, dense, max_level=max_level, keep_levels=keep)

"""Sanity checks: layerwise shuffle, inversion, reinitialisation and the pass/fail verdict."""

from __future__ import annotations

import statistics

import pytest
import torch

from cts_pipeline.core.device.runtime import generator
from cts_pipeline.core.nets.masks import global_topk_mask, prunable_parameters
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.prune.sanity import invert, layerwise_shuffle, passes, reinitialised


def random_mask(seed: int = 0) -> dict[str, torch.Tensor]:
    """Three layers at different densities, one of them fully kept and one fully pruned."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.rand(8, 3, 3, 3, generator=gen) < 0.3,
        "fc.weight": torch.rand(10, 50, generator=gen) < 0.05,
        "dense.weight": torch.ones(4, 4, dtype=torch.bool),
        "gone.weight": torch.zeros(6, dtype=torch.bool),
    }


# --------------------------------------------------------------------------------------------
# Layerwise shuffle


def test_layerwise_shuffle_keeps_every_layers_count_and_shape():
    mask = random_mask()
    shuffled = layerwise_shuffle(mask, torch.Generator().manual_seed(1))
    assert list(shuffled) == list(mask)
    for name, keep in mask.items():
        assert shuffled[name].shape == keep.shape and shuffled[name].dtype == torch.bool
        assert int(shuffled[name].sum()) == int(keep.sum()), name


def test_layerwise_shuffle_moves_the_kept_weights():
    mask = random_mask()
    shuffled = layerwise_shuffle(mask, torch.Generator().manual_seed(1))
    for name in ("conv.weight", "fc.weight"):
        kept = int(mask[name].sum())
        overlap = int((shuffled[name] & mask[name]).sum())
        # Random positions overlap the originals about in proportion to the density, far from all.
        assert overlap < kept / 2, name


def test_layerwise_shuffle_is_deterministic_per_seed():
    mask = random_mask()
    a = layerwise_shuffle(mask, generator("cpu", 0, "shuffle"))
    b = layerwise_shuffle(mask, generator("cpu", 0, "shuffle"))
    c = layerwise_shuffle(mask, generator("cpu", 1, "shuffle"))
    assert all(torch.equal(a[n], b[n]) for n in mask)
    assert not all(torch.equal(a[n], c[n]) for n in mask)


# --------------------------------------------------------------------------------------------
# Inversion


def test_invert_keeps_exactly_the_lowest_scores():
    scores = {
        "a": torch.tensor([[0.5, -3.0], [0.1, 2.0]]),
        "b": torch.tensor([-0.2, 1.0, -0.05, 0.7, 4.0]),
    }
    mask = invert(scores, 0.3)  # round(0.3 · 9) = 3 lowest: -3.0, -0.2, -0.05 (signs matter)
    assert mask["a"].tolist() == [[False, True], [False, False]]
    assert mask["b"].tolist() == [True, False, True, False, False]


@pytest.mark.parametrize("density", [0.1, 0.37, 0.5])
def test_invert_has_the_exact_count_and_is_disjoint_from_the_top_k(density):
    gen = torch.Generator().manual_seed(0)
    scores = {"x": torch.randn(31, 7, generator=gen), "y": torch.randn(101, generator=gen)}
    d = 31 * 7 + 101
    low, high = invert(scores, density), global_topk_mask(scores, density)
    assert sum(int(m.sum()) for m in low.values()) == round(density * d)
    for name in scores:
        assert not (low[name] & high[name]).any(), name
        if low[name].any():  # every kept score is at most every pruned score
            pruned = torch.cat([scores[n][~low[n]] for n in scores])
            assert scores[name][low[name]].max() <= pruned.min()


# --------------------------------------------------------------------------------------------
# Reinitialisation


def make_lenet(gen: torch.Generator):
    return build_model("lenet_300_100", image_shape=(1, 8, 8), num_classes=10, generator=gen)


def test_reinitialised_is_a_new_draw_of_the_same_architecture():
    original = make_lenet(generator("cpu", 0, "model-init"))
    fresh = reinitialised(make_lenet, seed=0)
    before, after = original.state_dict(), fresh.state_dict()
    assert list(before) == list(after)
    for name in before:
        assert before[name].shape == after[name].shape, name
    for name in prunable_parameters(original):
        assert not torch.equal(before[name], after[name]), name
        # Same distribution (Kaiming normal), different values: scales agree within a few %.
        assert after[name].std().item() == pytest.approx(before[name].std().item(), rel=0.1)


def test_reinitialised_is_reproducible():
    a = reinitialised(make_lenet, seed=3).state_dict()
    b = reinitialised(make_lenet, seed=3).state_dict()
    c = reinitialised(make_lenet, seed=4).state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["fc1.weight"], c["fc1.weight"])


# --------------------------------------------------------------------------------------------
# Verdict


def test_a_clear_drop_passes():
    reference = [90.0, 91.0, 92.0]  # spread 1.0
    result = passes([80.0, 81.0, 79.0], reference)
    assert result["accuracy_change"] == pytest.approx(-11.0)
    assert result["spread"] == pytest.approx(statistics.stdev(reference)) == pytest.approx(1.0)
    assert result["passes"] is True


@pytest.mark.parametrize("check", [[90.5, 90.5, 90.5], [91.5, 91.0], [93.0, 94.0]])
def test_a_change_within_the_spread_or_a_gain_fails(check):
    result = passes(check, [90.0, 91.0, 92.0])
    assert result["passes"] is False
    assert result["accuracy_change"] > -1.0


def test_the_drop_must_exceed_the_spread_strictly():
    reference = [89.0, 90.0, 91.0]  # mean 90, spread exactly 1
    assert passes([89.0], reference)["passes"] is False  # drop 1.0 == spread
    assert passes([88.9], reference)["passes"] is True


def test_a_single_reference_seed_passes_on_any_drop():
    assert passes([89.9], [90.0]) == {"accuracy_change": pytest.approx(-0.1), "spread": 0.0,
                                      "passes": True}
    assert passes([90.0], [90.0])["passes"] is False
    assert passes([85.0, 95.0], [90.0])["passes"] is False  # the mean did not drop


def test_passes_needs_accuracies():
    with pytest.raises(ValueError, match="at least one accuracy"):
        passes([], [90.0])
    with pytest.raises(ValueError, match="at least one accuracy"):
        passes([90.0], [])

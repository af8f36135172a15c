"""Masks: what is prunable, exact global top-k, applying and checking masks, and their payload."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cts_pipeline.core.nets.masks import (
    MASK_FORMAT,
    apply_mask,
    check_mask_matches,
    collapsed_layers,
    count_prunable,
    global_topk_mask,
    kept_count,
    layer_report,
    mask_to_payload,
    payload_to_mask,
    prunable_parameters,
    thin_layers,
)


class TinyNet(nn.Module):
    """Every kind of layer ``prunable_parameters`` has to sort: conv1d/2d, linear, BN, nested dense."""

    keep_dense = ("head",)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)  # 54 weights
        self.bn = nn.BatchNorm2d(3)
        self.seq = nn.Sequential(nn.Conv1d(3, 4, 2), nn.ReLU())  # 24 weights
        self.header = nn.Linear(5, 6)  # 30 weights: "head" is a prefix of the *name*, not a module
        self.head = nn.Sequential(nn.Linear(6, 7), nn.Linear(7, 2))  # kept dense, nested


def tiny_net(seed: int = 0) -> TinyNet:
    with torch.random.fork_rng():  # seeded init without disturbing the global RNG
        torch.manual_seed(seed)
        return TinyNet()


TINY_SHAPES = {"conv.weight": (3, 2, 3, 3), "seq.0.weight": (4, 3, 2), "header.weight": (6, 5)}


def random_mask(model: nn.Module, keep_fraction: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < keep_fraction
            for n, p in prunable_parameters(model).items()}


# --------------------------------------------------------------------------------------------
# prunable_parameters / kept_count


def test_prunable_parameters_respects_keep_dense_and_skips_biases_and_batchnorm():
    model = tiny_net()
    prunable = prunable_parameters(model)
    assert {n: tuple(p.shape) for n, p in prunable.items()} == TINY_SHAPES
    assert list(prunable) == list(TINY_SHAPES), "prunable weights must come in module order"
    assert prunable["conv.weight"] is model.conv.weight, "must hand back the live parameters"
    assert count_prunable(model) == 54 + 24 + 30


def test_prunable_parameters_without_keep_dense_includes_every_linear():
    model = tiny_net()
    model.keep_dense = ()
    assert set(prunable_parameters(model)) == set(TINY_SHAPES) | {"head.0.weight", "head.1.weight"}


@pytest.mark.parametrize(
    ("density", "total", "kept"),
    [(0.1, 1000, 100), (0.0123, 50_200, 617), (0.12345, 50_200, 6197), (1.0, 10, 10),
     (0.05, 56_224, 2811), (0.3, 7, 2)],
)
def test_kept_count_is_round_density_times_total(density, total, kept):
    assert kept_count(density, total) == kept


@pytest.mark.parametrize("density", [0.0, -0.1, 1.0001, 2.0, float("nan")])
def test_kept_count_rejects_density_outside_unit_interval(density):
    with pytest.raises(ValueError, match="density must be in"):
        kept_count(density, 1000)


def test_kept_count_refuses_to_keep_nothing():
    with pytest.raises(ValueError, match=r"keeps round\(0.001 x 100\) = 0 of 100"):
        kept_count(0.001, 100)


# --------------------------------------------------------------------------------------------
# global_topk_mask


def test_global_topk_has_no_per_layer_quota():
    # Layer "b" holds every one of the top scores: a global ranking gives it everything.
    scores = {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),  # 0..11
        "b": 100.0 + torch.arange(5, dtype=torch.float32),  # 100..104
        "c": torch.full((2, 2, 2), -1.0),
    }
    mask = global_topk_mask(scores, 5 / 25)
    assert {n: tuple(m.shape) for n, m in mask.items()} == {"a": (3, 4), "b": (5,), "c": (2, 2, 2)}
    assert all(m.dtype == torch.bool for m in mask.values())
    assert bool(mask["b"].all()), "the layer with all the top scores must keep all of them"
    assert not bool(mask["a"].any()) and not bool(mask["c"].any())

    mask = global_topk_mask(scores, 7 / 25)  # then the two best of "a": 11 and 10
    assert bool(mask["b"].all())
    assert mask["a"].reshape(-1).nonzero().flatten().tolist() == [10, 11]
    assert not bool(mask["c"].any())


@pytest.mark.parametrize("density", [0.05, 0.0123, 0.3333, 0.5, 0.999])
def test_global_topk_keeps_exactly_round_density_times_d_highest(density):
    g = torch.Generator().manual_seed(1)
    scores = {"x": torch.randn(40, 30, generator=g), "y": torch.randn(7, 3, 3, generator=g),
              "z": torch.randn(11, generator=g)}
    d = 40 * 30 + 7 * 9 + 11  # 1274
    mask = global_topk_mask(scores, density)
    kept = sum(int(m.sum()) for m in mask.values())
    assert kept == round(density * d), f"density {density}: kept {kept} of {d}"
    flat_scores = torch.cat([s.reshape(-1) for s in scores.values()])
    flat_keep = torch.cat([m.reshape(-1) for m in mask.values()])
    if kept < d:
        assert flat_scores[flat_keep].min() > flat_scores[~flat_keep].max(), "kept must be the top"


def test_layer_floor_reserves_each_layers_best_then_ranks_the_rest_globally():
    # The ablation cts.min_kept_per_layer: "a" and "c" would get nothing from the global ranking.
    scores = {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),  # 0..11
        "b": 100.0 + torch.arange(5, dtype=torch.float32),  # 100..104
        "c": torch.tensor([-3.0, -1.0, -2.0]),
    }
    mask = global_topk_mask(scores, 7 / 20, min_per_layer=2)
    assert sum(int(m.sum()) for m in mask.values()) == 7, "the floor never changes the kept count"
    assert mask["a"].reshape(-1).nonzero().flatten().tolist() == [10, 11], "a's two best"
    assert mask["c"].tolist() == [False, True, True], "c's two best: -1 and -2"
    assert mask["b"].tolist() == [False, False, True, True, True], "the other 3 from the global ranking"
    # A floor above a layer's size keeps the whole layer; 0 is the plain global top-k.
    small = global_topk_mask(scores, 12 / 20, min_per_layer=4)  # floors 4 + 4 + 3, then b's last one
    assert bool(small["c"].all()) and int(small["a"].sum()) == 4 and bool(small["b"].all())
    assert all(torch.equal(global_topk_mask(scores, 7 / 20, min_per_layer=0)[n], global_topk_mask(scores, 7 / 20)[n])
               for n in scores)


def test_layer_floor_that_needs_more_than_the_budget_is_refused():
    scores = {"a": torch.randn(10), "b": torch.randn(10)}
    with pytest.raises(ValueError, match="a floor of 3 weights in each of 2 layers needs 6 weights, but density 0.25 keeps only 5"):
        global_topk_mask(scores, 0.25, min_per_layer=3)
    with pytest.raises(ValueError, match="min_per_layer must be a non-negative integer"):
        global_topk_mask(scores, 0.5, min_per_layer=-1)


def test_thin_layers_are_those_near_collapse():
    mask = {"dead": torch.zeros(50, dtype=torch.bool), "thin": torch.tensor([True] * 3 + [False] * 40),
            "small": torch.ones(4, dtype=torch.bool), "fine": torch.tensor([True] * 8 + [False] * 90)}
    assert thin_layers(mask) == {"thin": 3}, "collapse is reported apart; a layer kept whole is not thin"
    assert thin_layers(mask, fewer_than=9) == {"thin": 3, "fine": 8}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_global_topk_refuses_non_finite_scores_and_names_the_layer(bad):
    scores = {"good": torch.randn(10), "broken": torch.randn(3, 3)}
    scores["broken"][1, 1] = bad
    with pytest.raises(ValueError, match=r"not finite in \['broken'\]"):
        global_topk_mask(scores, 0.5)


# --------------------------------------------------------------------------------------------
# apply_mask / check_mask_matches


def test_apply_mask_zeros_exactly_the_pruned_weights():
    model = tiny_net()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = random_mask(model, 0.3, seed=2)
    apply_mask(model, mask)
    params = dict(model.named_parameters())
    for name, keep in mask.items():
        w = params[name].detach()
        assert bool((w[~keep] == 0).all()), f"{name}: a pruned weight is not zero"
        assert torch.equal(w[keep], before[name][keep]), f"{name}: a kept weight changed"
        assert bool((before[name][~keep] != 0).all()), "test needs non-zero weights to prune"
    for name, p in params.items():
        if name not in mask:
            assert torch.equal(p.detach(), before[name]), f"{name} is not masked but changed"


def test_check_mask_matches_accepts_a_fitting_mask():
    model = tiny_net()
    check_mask_matches(model, random_mask(model, 0.5, seed=0))


def test_check_mask_matches_names_missing_and_unexpected_layers():
    model = tiny_net()
    mask = random_mask(model, 0.5, seed=0)
    del mask["seq.0.weight"]
    mask["head.0.weight"] = torch.ones(7, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"missing \['seq.0.weight'\], unexpected \['head.0.weight'\]"):
        check_mask_matches(model, mask)


def test_check_mask_matches_names_the_layer_with_the_wrong_shape():
    model = tiny_net()
    mask = random_mask(model, 0.5, seed=0)
    mask["header.weight"] = torch.ones(5, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"header\.weight has shape \(5, 6\), the weight has \(6, 5\)"):
        check_mask_matches(model, mask)


# --------------------------------------------------------------------------------------------
# layer_report / collapsed_layers / payload


def hand_mask() -> dict[str, torch.Tensor]:
    return {
        "first": torch.tensor([[True, False], [False, False]]),
        "dead": torch.zeros(3, dtype=torch.bool),
        "full": torch.ones(2, 3, dtype=torch.bool),
    }


def test_layer_report_and_collapsed_layers_on_a_hand_made_mask():
    report = layer_report(hand_mask())
    assert list(report) == ["first", "dead", "full"]
    assert report["first"] == {"kept": 1, "total": 4, "density": 0.25}
    assert report["dead"] == {"kept": 0, "total": 3, "density": 0.0}
    assert report["full"] == {"kept": 6, "total": 6, "density": 1.0}
    assert collapsed_layers(hand_mask()) == ["dead"]
    assert collapsed_layers({"a": torch.ones(2, dtype=torch.bool)}) == []


def test_mask_payload_round_trips_through_torch_save_weights_only(tmp_path):
    mask = hand_mask()
    payload = mask_to_payload(mask, target_density=0.5)
    assert payload["format"] == MASK_FORMAT
    assert payload["kept"] == {"first": 1, "dead": 0, "full": 6}
    assert payload["total"] == {"first": 4, "dead": 3, "full": 6}
    assert payload["kept_weights"] == 7 and payload["prunable_weights"] == 13
    assert payload["density"] == pytest.approx(7 / 13) and payload["sparsity"] == pytest.approx(6 / 13)
    assert payload["target_density"] == 0.5 and payload["target_sparsity"] == 0.5

    path = tmp_path / "mask.pt"
    torch.save(payload, path)
    loaded = torch.load(path, weights_only=True)
    back = payload_to_mask(loaded)
    assert list(back) == list(mask)
    for name in mask:
        assert back[name].dtype == torch.bool
        assert torch.equal(back[name], mask[name]), f"{name} changed on the round trip"


def test_mask_payload_with_an_edited_kept_count_is_refused():
    payload = mask_to_payload(hand_mask(), target_density=0.5)
    payload["kept"]["full"] = 5
    with pytest.raises(ValueError, match="layer full keeps 6, its header says 5"):
        payload_to_mask(payload)


def test_payload_of_another_format_is_refused():
    payload = mask_to_payload(hand_mask(), target_density=0.5)
    payload["format"] = "something-else"
    with pytest.raises(ValueError, match="not a mask payload"):
        payload_to_mask(payload)

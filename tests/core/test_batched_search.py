"""The batched search (K densities on one θ_k at once) against K plain single searches, and the
stacked forward it runs on, against ``torch.func.vmap`` over ``functional_call``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from cts_pipeline.core import cts
from cts_pipeline.core.cts import (
    GradBalance,
    Lagrangian,
    SearchConfig,
    batch_statistics,
    concrete_search,
)
from cts_pipeline.core.data.splits import load_splits
from cts_pipeline.core.nets.masks import global_topk_mask, prunable_parameters, unflatten
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.train.recipe import TrainRecipe
from cts_pipeline.core.train.stacked import stacked_forward, supports

DENSITIES = [0.2, 0.05, 0.011]


@pytest.fixture(scope="module")
def digits_train():
    return load_splits("digits")[0]


def convnet(width: int = 4) -> nn.Module:
    return build_model("convnet", image_shape=(1, 8, 8), num_classes=10, width=width,
                       generator=torch.Generator().manual_seed(0))


def run(model, split, density, epochs=1, batch_size=64, **config):
    return concrete_search(model, split, density=density, config=SearchConfig(epochs=epochs, **config),
                           recipe=TrainRecipe(epochs=epochs, batch_size=batch_size, lr=0.1), seed=4,
                           progress=False)


def recorded_task_gradients(monkeypatch, balancer_cls):
    seen = []
    real = balancer_cls.combine

    def combine(self, logits, task_grad, rank_norms=None):
        seen.append(task_grad.clone())
        return real(self, logits, task_grad, rank_norms)

    monkeypatch.setattr(balancer_cls, "combine", combine)
    return seen


@pytest.mark.cross_path
@pytest.mark.parametrize(("objective", "balance"), [("kl", "gradbalance"), ("ce", "gradbalance"),
                                                    ("fkl", "lagrangian")])
def test_first_step_gradients_of_each_row_are_the_single_searches(digits_train, monkeypatch, objective, balance):
    split = digits_train.subset(64)  # one step
    seen = recorded_task_gradients(monkeypatch, GradBalance if balance == "gradbalance" else Lagrangian)
    singles = [run(convnet(), split, k, objective=objective, balance=balance) for k in DENSITIES]
    batched = run(convnet(), split, DENSITIES, objective=objective, balance=balance)
    assert len(seen) == len(DENSITIES) + 1
    rows = seen[-1]
    assert rows.shape == (len(DENSITIES), seen[0].numel())
    for k, single in enumerate(seen[:-1]):
        rel = ((rows[k] - single).norm() / single.norm()).item()
        assert rel < 1e-5, f"row {k}: relative gradient difference {rel:.2e}"
    for single, row in zip(singles, batched, strict=True):
        assert row.budget == pytest.approx(single.budget, rel=1e-12)
        assert row.history[0]["multiplier"] == pytest.approx(single.history[0]["multiplier"], rel=1e-4, abs=1e-12)
        assert row.history[0]["expected_kept"] == pytest.approx(single.history[0]["expected_kept"], rel=1e-5)


@pytest.mark.cross_path
def test_short_batched_search_gives_the_single_searches_masks(digits_train):
    """Same noise, same data order: the same masks and exactly the same kept counts.

    Adam normalises every logit's gradient, so float-rounding differences in gradients near
    zero grow over many steps; over a short search the masks agree to the last few near-ties.
    """
    split = digits_train.subset(192)
    singles = [run(convnet(), split, k, epochs=2) for k in DENSITIES]
    batched = run(convnet(), split, DENSITIES, epochs=2)
    assert [r.shared_by for r in batched] == [3, 3, 3] and singles[0].shared_by == 1
    for k, single, row in zip(DENSITIES, singles, batched, strict=True):
        a, b = global_topk_mask(single.scores, k), global_topk_mask(row.scores, k)
        assert [int(m.sum()) for m in a.values()] == pytest.approx([int(m.sum()) for m in b.values()], abs=2)
        assert sum(int(m.sum()) for m in a.values()) == sum(int(m.sum()) for m in b.values()) == round(k * 980)
        differ = sum(int((a[n] != b[n]).sum()) for n in a)
        assert differ <= 4, f"density {k}: {differ} weights differ"
        for name in single.scores:
            torch.testing.assert_close(row.scores[name], single.scores[name], rtol=0, atol=2e-3)
        assert [r["epoch"] for r in row.history] == [1, 2]
        assert row.seconds == pytest.approx(row.group_seconds / 3)


def test_batched_search_refuses_bad_densities(digits_train):
    with pytest.raises(ValueError, match="density must be in"):
        run(convnet(), digits_train.subset(64), [0.1, 1.0])
    with pytest.raises(ValueError, match="empty"):
        run(convnet(), digits_train.subset(64), [])


def test_network_objectives_fall_back_to_one_search_per_density(digits_train):
    results = run(convnet(), digits_train.subset(64), [0.2, 0.05], objective="feature_mse")
    assert [r.shared_by for r in results] == [1, 1]
    single = run(convnet(), digits_train.subset(64), 0.05, objective="feature_mse")
    for name in single.scores:
        assert torch.equal(results[1].scores[name], single.scores[name])


# --------------------------------------------------------------------------------------------
# The stacked forward


def models():
    yield "convnet", build_model("convnet", image_shape=(1, 8, 8), num_classes=10, width=4), (6, 1, 8, 8)
    yield "lenet", build_model("lenet_300_100", image_shape=(1, 8, 8), num_classes=10), (6, 1, 8, 8)
    for shortcut in ("conv1x1", "conv3x3"):
        yield (f"resnet20 {shortcut}",
               build_model("resnet20", image_shape=(3, 16, 16), num_classes=10, width=4, shortcut=shortcut),
               (4, 3, 16, 16))
    vgg = build_model("vgg16", image_shape=(3, 32, 32), num_classes=10)
    yield "vgg16", vgg, (2, 3, 32, 32)


@pytest.mark.cross_path
@pytest.mark.parametrize("name", ["convnet", "lenet", "resnet20 conv1x1", "resnet20 conv3x3", "vgg16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_stacked_forward_equals_vmap_of_functional_call(name, channels_last):
    _, model, shape = next(m for m in models() if m[0] == name)
    assert supports(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen)
    if channels_last and x.dim() == 4:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    weights = prunable_parameters(model)
    rows = 3
    stacked = {n: w.detach() * torch.rand(rows, *w.shape, generator=gen) for n, w in weights.items()}
    with torch.no_grad(), batch_statistics(model):
        fast = stacked_forward(model, stacked, x)
        reference = torch.vmap(lambda *ws: functional_call(model, dict(zip(stacked, ws, strict=True)), (x,)))(
            *stacked.values())
        per_row = torch.stack([functional_call(model, {n: w[k] for n, w in stacked.items()}, (x,))
                               for k in range(rows)])
    assert fast.shape == (rows, shape[0], 10)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast, per_row, rtol=1e-4, atol=1e-5)
    assert all("forward" not in vars(m) for m in model.modules()), "the model's forwards are restored"


def test_stacked_forward_is_declined_for_layers_it_does_not_know():
    zeropad = build_model("resnet20", image_shape=(3, 16, 16), num_classes=10, width=4, shortcut="zeropad")
    assert not supports(zeropad)  # pads channels: the stacked layout would put zeros in the wrong rows
    assert not supports(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)))
    assert not supports(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))


def test_unsupported_models_search_through_vmap(digits_train, monkeypatch):
    used = []
    real = cts.forwards.stacked_forward
    monkeypatch.setattr(cts.forwards, "stacked_forward", lambda *a: used.append(1) or real(*a))
    monkeypatch.setattr(cts.forwards, "stacked_supports", lambda model: False)
    results = run(convnet(), digits_train.subset(64), [0.2, 0.05])
    assert not used and len(results) == 2
    monkeypatch.setattr(cts.forwards, "stacked_supports", lambda model: True)
    run(convnet(), digits_train.subset(64), [0.2, 0.05])
    assert used


def test_row_weights_split_a_batch_of_flat_weights_per_layer():
    model = convnet()
    relaxation = cts.ConcreteMask(prunable_parameters(model), [0.1, 0.2])
    flat = torch.arange(2 * relaxation.num_weights, dtype=torch.float32).view(2, -1)
    rows = relaxation.row_weights(flat)
    for k in range(2):
        expected = unflatten(flat[k], relaxation.shapes)
        for name in relaxation.shapes:
            assert torch.equal(rows[name][k], expected[name])
    assert relaxation.logits.shape == (2, relaxation.num_weights)
    assert torch.allclose(torch.sigmoid(relaxation.logits[:, 0]), torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_stacking_probe_leaves_the_search_as_it_was(digits_train, channels_last):
    """``stacked_search_ratio`` times both layouts on state of its own: the model, its gradients
    flags and memory format, and the search that follows are exactly what they were without it."""
    model = convnet()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    reference = run(model, digits_train, DENSITIES, batch_size=128)
    ratio = cts.stacked_search_ratio(model, digits_train, DENSITIES, SearchConfig(epochs=1),
                                     TrainRecipe(epochs=1, batch_size=128, lr=0.1), seed=4,
                                     channels_last=channels_last)
    assert 0.0 < ratio < float("inf")
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.is_contiguous() for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    after = run(model, digits_train, DENSITIES, batch_size=128)
    for a, b in zip(reference, after, strict=True):
        assert all(torch.equal(a.scores[n], b.scores[n]) for n in a.scores)

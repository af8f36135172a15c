"""Pruning-at-initialisation scorers, each checked against an independent computation.

SNIP and GraSP against plain autograd on a copy of the network (GraSP's Hessian-gradient product
through ``torch.autograd.functional.hvp``), SynFlow against the closed-form path products of small
linear networks, magnitude against a mask picked by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from cts_pipeline.core.data.registry import DatasetInfo
from cts_pipeline.core.data.splits import Split, load_splits
from cts_pipeline.core.data.transforms import normalize
from cts_pipeline.core.nets.masks import global_topk_mask, layer_report, prunable_parameters
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.prune.saliency import (
    PRUNED_SCORE,
    SCORERS,
    ScoringInputs,
    class_balanced_batch,
    score,
    synflow,
    synflow_flow,
)

T = 200.0  # GraSP's temperature, written out independently of the module
PER_CLASS = 10  # SNIP's and GraSP's images per class


def toy_split(image_shape=(1, 2, 2), classes: int = 3, per_class: int = 12, seed: int = 0) -> Split:
    """A small labelled split of random pixels, ``per_class`` images of every class."""
    info = DatasetInfo("toy", image_shape, classes, (0.5,), (0.25,), 255.0, "test")
    labels = torch.arange(classes).repeat(per_class)
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (len(labels), *image_shape), generator=g, dtype=torch.uint8)
    return Split(images, labels, info)


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter drawn from N(0, 1) with its own generator, so no test touches the global RNG."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def mlp_with_bn(seed: int = 0) -> nn.Module:
    """4 -> 6 -> BatchNorm -> ReLU -> 3: small enough to check by hand, with batch statistics."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    return randomise(model, seed).eval()  # eval: the scorers must switch to train mode themselves


MLP_WEIGHTS = ("1.weight", "4.weight")


@pytest.fixture(scope="module")
def digits_train() -> Split:
    return load_splits("digits")[0]


# --------------------------------------------------------------------------------------------
# The scoring batch


def test_class_balanced_batch_takes_per_class_images_of_every_class(digits_train):
    x, y = class_balanced_batch(digits_train, 7, seed=3)
    assert x.dtype == torch.float32 and tuple(x.shape) == (70, 1, 8, 8)
    assert torch.bincount(y, minlength=10).tolist() == [7] * 10
    # Each image is a normalised training image carrying its own label.
    all_images = normalize(digits_train.images, digits_train.info).flatten(1)
    matches = (x.flatten(1)[:, None, :] == all_images[None, :, :]).all(dim=2)  # [70, N]
    assert matches.any(dim=1).all()
    same_label = y[:, None] == digits_train.labels[None, :]
    assert not (matches & ~same_label).any()
    # No image twice.
    assert len(torch.unique(x.flatten(1), dim=0)) == 70


def test_class_balanced_batch_is_deterministic_per_seed(digits_train):
    x1, y1 = class_balanced_batch(digits_train, PER_CLASS, seed=0)
    x2, y2 = class_balanced_batch(digits_train, PER_CLASS, seed=0)
    x3, _ = class_balanced_batch(digits_train, PER_CLASS, seed=1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


def test_class_balanced_batch_refuses_too_few_images_of_a_class():
    with pytest.raises(ValueError, match="fewer than the 13 per class"):
        class_balanced_batch(toy_split(per_class=12), 13, seed=0)


# --------------------------------------------------------------------------------------------
# SNIP


def test_snip_is_weight_times_gradient_of_the_train_mode_loss():
    data, model = toy_split(), mlp_with_bn()
    scores = score("snip", ScoringInputs(model, data, density=0.5, seed=4))
    x, y = class_balanced_batch(data, PER_CLASS, seed=4)

    def expected_in(mode_train: bool) -> dict[str, torch.Tensor]:
        ref = copy.deepcopy(model).train(mode_train)
        F.cross_entropy(ref(x), y).backward()
        return {n: (ref.get_parameter(n) * ref.get_parameter(n).grad).abs() for n in MLP_WEIGHTS}

    expected = expected_in(True)
    assert list(scores) == list(MLP_WEIGHTS)
    for n in MLP_WEIGHTS:
        torch.testing.assert_close(scores[n], expected[n])
    # The batch statistics matter here, so a scorer left in eval mode would fail the check above.
    assert not torch.allclose(expected_in(False)["1.weight"], expected["1.weight"], rtol=1e-2)


# --------------------------------------------------------------------------------------------
# GraSP


def test_grasp_keeps_the_highest_theta_times_hessian_gradient():
    data, model = toy_split(), mlp_with_bn(seed=1)
    scores = score("grasp", ScoringInputs(model, data, density=0.5, seed=2))
    x, y = class_balanced_batch(data, PER_CLASS, seed=2)

    ref = copy.deepcopy(model).train()
    theta = tuple(ref.get_parameter(n).detach().clone() for n in MLP_WEIGHTS)

    def loss(*weights: torch.Tensor) -> torch.Tensor:
        buffers = {n: b.clone() for n, b in ref.named_buffers()}
        logits = functional_call(ref, {**buffers, **dict(zip(MLP_WEIGHTS, weights, strict=True))}, (x,))
        return F.cross_entropy(logits / T, y)

    leaves = [t.clone().requires_grad_(True) for t in theta]
    g = torch.autograd.grad(loss(*leaves), leaves)
    _, hg = torch.autograd.functional.hvp(loss, theta, g)
    for n, w, h in zip(MLP_WEIGHTS, theta, hg, strict=True):
        expected = w * h  # keep-score: the reference removes the highest -θ ⊙ Hg
        torch.testing.assert_close(scores[n], expected, rtol=1e-3, atol=1e-4 * expected.abs().max())
    # Signed, not a magnitude: an accidental abs() or negation would fail the comparison above,
    # and both signs occur here so the comparison can tell.
    flat = torch.cat([s.flatten() for s in scores.values()])
    assert (flat > 0).any() and (flat < 0).any()


class _ClampedHardActivations(nn.Module):
    """Hard-sigmoid gating a hard-swish, written by hand as clamps (twice differentiable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        swish = x * torch.clamp(x + 3, 0, 6) / 6
        return swish * torch.clamp(swish + 3, 0, 6) / 6


class _HardActivations(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        swish = F.hardswish(x)
        return swish * F.hardsigmoid(swish)


def test_grasp_scores_mobilenet_activations_as_their_clamps():
    """MobileNetV3's hard-swish and hard-sigmoid have fused backward kernels without a derivative;
    GraSP gives the scores of the same network written with clamps."""

    def net(activation: nn.Module) -> nn.Module:
        return randomise(nn.Sequential(nn.Flatten(), nn.Linear(4, 6), activation, nn.Linear(6, 3)), seed=3)

    data = toy_split()
    hard = score("grasp", ScoringInputs(net(_HardActivations()), data, density=0.5, seed=2))
    clamped = score("grasp", ScoringInputs(net(_ClampedHardActivations()), data, density=0.5, seed=2))
    for name in ("1.weight", "3.weight"):
        torch.testing.assert_close(hard[name], clamped[name])
    assert hard["1.weight"].abs().sum() > 0


# --------------------------------------------------------------------------------------------
# SynFlow


def linear_net(d_in: int, hidden: int, d_out: int, seed: int) -> nn.Module:
    """Two bias-free linear layers with a ReLU: R = 1ᵀ|W2||W1|1 once linearised."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(d_in, hidden, bias=False), nn.ReLU(),
                          nn.Linear(hidden, d_out, bias=False))
    return randomise(model, seed)


def path_products(w1: torch.Tensor, w2: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor):
    """SynFlow scores of a masked 2-layer linear net, by hand: R = Σ_kij |W2_ki| |W1_ij|.

    ∂R/∂W1_ij = Σ_k |W2_ki| (column sum of |W2|) and ∂R/∂W2_ki = Σ_j |W1_ij| (row sum of |W1|).
    """
    a1, a2 = w1.abs().double() * m1, w2.abs().double() * m2
    return a1 * a2.sum(dim=0)[:, None], a2 * a1.sum(dim=1)[None, :]


def test_synflow_first_round_is_the_path_product_formula():
    model = linear_net(4, 5, 3, seed=0)
    w1, w2 = model[1].weight.detach(), model[3].weight.detach()
    full = {n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_parameters(model).items()}
    flow = synflow_flow(model, full, (1, 2, 2))
    e1, e2 = path_products(w1, w2, 1.0, 1.0)
    torch.testing.assert_close(flow["1.weight"], e1)
    torch.testing.assert_close(flow["3.weight"], e2)

    # Under a mask, the pruned weights carry no flow and cut the paths through them.
    g = torch.Generator().manual_seed(5)
    mask = {n: torch.rand(p.shape, generator=g) < 0.6 for n, p in full.items()}
    flow = synflow_flow(model, mask, (1, 2, 2))
    e1, e2 = path_products(w1, w2, mask["1.weight"], mask["3.weight"])
    torch.testing.assert_close(flow["1.weight"], e1)
    torch.testing.assert_close(flow["3.weight"], e2)


def test_synflow_linearises_batchnorm_in_eval_mode_with_absolute_statistics():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3),
                          nn.Linear(3, 2, bias=False))
    randomise(model, seed=2)
    bn = model[2]
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([-0.5, 0.2, 1.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
        bn.weight.copy_(torch.tensor([-2.0, 0.5, 1.5]))
        bn.bias.copy_(torch.tensor([0.3, -0.1, 0.0]))
    model.train()  # a train-mode BatchNorm on one image would raise: SynFlow must use eval mode
    full = {n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_parameters(model).items()}
    flow = synflow_flow(model, full, (1, 2, 2))

    a1, a2 = model[1].weight.detach().abs().double(), model[3].weight.detach().abs().double()
    gamma, beta = bn.weight.detach().abs().double(), bn.bias.detach().abs().double()
    mean, std = bn.running_mean.abs().double(), (bn.running_var.abs().double() + bn.eps).sqrt()
    bn_out = gamma * (a1.sum(dim=1) - mean) / std + beta  # BN of |W1|·1 with every entry made positive
    torch.testing.assert_close(flow["1.weight"], a1 * (a2.sum(dim=0) * gamma / std)[:, None])
    torch.testing.assert_close(flow["3.weight"], (a2 * bn_out[None, :]).abs())


def test_synflow_iterates_the_exponential_schedule_and_returns_its_final_mask():
    density, rounds = 0.05, 100
    model = linear_net(12, 20, 10, seed=3)
    data = toy_split(image_shape=(1, 3, 4))
    scores = synflow(ScoringInputs(model, data, density=density, seed=0))

    # The same schedule run on the closed-form scores, pruned weights ranked below every other.
    w1, w2 = model[1].weight.detach(), model[3].weight.detach()
    mask = {"1.weight": torch.ones_like(w1, dtype=torch.bool),
            "3.weight": torch.ones_like(w2, dtype=torch.bool)}
    for i in range(1, rounds + 1):
        s1, s2 = path_products(w1, w2, mask["1.weight"], mask["3.weight"])
        if i == 1:
            one_shot = global_topk_mask({"1.weight": s1, "3.weight": s2}, density)
        previous = mask
        mask = global_topk_mask({"1.weight": torch.where(mask["1.weight"], s1, -1.0),
                                 "3.weight": torch.where(mask["3.weight"], s2, -1.0)},
                                density ** (i / rounds))

    d = w1.numel() + w2.numel()
    final = global_topk_mask(scores, density)
    assert sum(int(m.sum()) for m in final.values()) == round(density * d)
    for n in final:
        assert torch.equal(final[n], mask[n])
        # Weights pruned before the last round sit at the sentinel; the rest are normalised flows.
        assert torch.equal(scores[n] == PRUNED_SCORE, ~previous[n])
        assert (scores[n][previous[n]] >= 0).all() and (scores[n] <= 1).all()
    assert sum(int((s == PRUNED_SCORE).sum()) for s in scores.values()) == (
        d - round(density ** ((rounds - 1) / rounds) * d)
    )
    # The iteration matters on this network, so a one-shot SynFlow would have failed above.
    assert any(not torch.equal(one_shot[n], mask[n]) for n in mask)
    # Stable: the same scores again, and the network's weights (and signs) untouched.
    again = synflow(ScoringInputs(model, data, density=density, seed=9))
    assert all(torch.equal(scores[n], again[n]) for n in scores)
    assert torch.equal(model[1].weight.detach(), w1) and (w1 < 0).any()


def test_synflow_never_revives_a_pruned_weight_among_zero_flow_ties():
    """Dead hidden units give many weights zero flow; they outnumber the kept budget, so a pruned
    weight scored like them (0) could be picked again. Pruned weights must rank below all."""
    density, rounds = 0.2, 100
    model = linear_net(12, 20, 10, seed=4)
    with torch.no_grad():
        model[3].weight[:, 1:] = 0.0  # only hidden unit 0 reaches the output: 22 weights carry flow
    scores = synflow(ScoringInputs(model, toy_split(image_shape=(1, 3, 4)), density, seed=0))
    d = 440
    pruned_before_last = sum(int((s == PRUNED_SCORE).sum()) for s in scores.values())
    assert pruned_before_last == d - round(density ** ((rounds - 1) / rounds) * d)
    assert sum(int((s > 0).sum()) for s in scores.values()) == 22  # the live paths, kept
    final = global_topk_mask(scores, density)
    assert all(not (final[n] & (scores[n] == PRUNED_SCORE)).any() for n in final)


# --------------------------------------------------------------------------------------------
# Magnitude and random


def test_magnitude_keeps_the_largest_weights_by_hand():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.1, -0.9, 0.3], [-0.5, 0.05, 0.7]]))
        model[2].weight.copy_(torch.tensor([[-0.2, 0.6]]))
    data = toy_split(image_shape=(1, 1, 3))
    mask = global_topk_mask(score("magnitude", ScoringInputs(model, data, 0.5, 0)), 0.5)
    assert mask["1.weight"].tolist() == [[False, True, False], [True, False, True]]
    assert mask["2.weight"].tolist() == [[False, True]]


def test_random_keeps_the_exact_count_and_depends_only_on_the_seed():
    model = linear_net(12, 20, 10, seed=0)
    data = toy_split(image_shape=(1, 3, 4))
    a = score("random", ScoringInputs(model, data, 0.3, seed=1))
    b = score("random", ScoringInputs(model, data, 0.3, seed=1))
    c = score("random", ScoringInputs(model, data, 0.3, seed=2))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)
    flat = torch.cat([s.flatten() for s in a.values()])
    assert flat.min() >= 0 and flat.max() < 1 and len(torch.unique(flat)) == len(flat)
    mask = global_topk_mask(a, 0.3)
    assert sum(int(m.sum()) for m in mask.values()) == round(0.3 * 440)


@pytest.mark.parametrize("image_shape", [(1, 8, 8), (1, 28, 28)])
def test_magnitude_at_init_prunes_layers_with_larger_fan_in_harder(digits_train, image_shape):
    """Kaiming scaling: std ∝ 1/√fan_in, so a global magnitude cut thins high-fan-in layers most.

    LeNet-300-100's fan-ins are (pixels, 300, 100): on 28x28 MNIST the first layer is pruned far
    more than the last; on 8x8 digits (fan-in 64) the first layer is pruned the LEAST and the
    middle one the most. Magnitude needs no data, so the digits split serves both shapes.
    """
    model = build_model("lenet_300_100", image_shape=image_shape, num_classes=10,
                        generator=torch.Generator().manual_seed(0))
    mask = global_topk_mask(score("magnitude", ScoringInputs(model, digits_train, 0.02, 0)), 0.02)
    density = {n: r["density"] for n, r in layer_report(mask).items()}
    fan_in = {n: p.shape[1] for n, p in prunable_parameters(model).items()}
    by_fan_in = sorted(density, key=lambda n: fan_in[n], reverse=True)
    assert [density[n] for n in by_fan_in] == sorted(density.values())
    if image_shape == (1, 28, 28):
        assert density["fc1.weight"] < density["fc3.weight"] / 10
    else:
        assert density["fc2.weight"] < density["fc3.weight"] < density["fc1.weight"]


# --------------------------------------------------------------------------------------------
# Every scorer: shapes, exact counts, and a model left exactly as it was


@pytest.mark.parametrize("method", sorted(SCORERS))
def test_scorer_leaves_the_model_unchanged(digits_train, method):
    model = build_model("convnet", image_shape=(1, 8, 8), num_classes=10,
                        generator=torch.Generator().manual_seed(0))
    model.train()
    model.block2.eval()  # mixed modes must come back module by module
    model.block1[0].weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}

    scores = score(method, ScoringInputs(model, digits_train, density=0.05, seed=0))

    prunable = prunable_parameters(model)
    assert list(scores) == list(prunable)
    for n, p in prunable.items():
        assert scores[n].shape == p.shape and torch.isfinite(scores[n]).all()
    mask = global_topk_mask(scores, 0.05)
    assert sum(int(m.sum()) for m in mask.values()) == round(0.05 * sum(p.numel() for p in prunable.values()))

    for k, v in model.state_dict().items():  # weights, BatchNorm running statistics and counters
        assert torch.equal(v, state[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())


def test_unknown_method_names_the_known_ones(digits_train):
    model = build_model("lenet_300_100", image_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ValueError, match=r"unknown pruning method 'snipp' \(pai.methods\); known: "
                                         r"grasp, magnitude, random, snip, synflow"):
        score("snipp", ScoringInputs(model, digits_train, 0.1, 0))


def test_scoring_inputs_refuse_a_density_outside_zero_one(digits_train):
    model = build_model("lenet_300_100", image_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ValueError, match="density"):
        ScoringInputs(model, digits_train, 1.5, 0)

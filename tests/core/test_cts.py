"""Concrete Ticket Search: the relaxation, the objectives, sparsity control and the search loop.

Checked against ``docs/method.md`` of the shared notes ("The relaxation", "Objectives",
"GradBalance", "Search settings") with hand computations, not against the code's own helpers.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from cts_pipeline.core import cts
from cts_pipeline.core.cts import (
    OBJECTIVES,
    ConcreteMask,
    GradBalance,
    Lagrangian,
    Objective,
    SearchConfig,
    batch_statistics,
    concrete_noise,
    concrete_search,
    cross_entropy,
    forward_kl,
    loss_ratio,
    reverse_kl,
    soft_mask,
)
from cts_pipeline.core.data.splits import iterate_batches, load_splits
from cts_pipeline.core.device.runtime import UniformNoise
from cts_pipeline.core.nets.masks import global_topk_mask, prunable_parameters
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.train.loop import NonFiniteLossError
from cts_pipeline.core.train.recipe import TrainRecipe

TAU = 2.0 / 3.0  # the method's fixed temperature, written out independently of the module
DIGITS_SHAPE = (1, 8, 8)
CPU = torch.device("cpu")


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


@pytest.fixture(scope="module")
def digits_train():
    return load_splits("digits")[0]


def lenet(seed: int = 0) -> nn.Module:
    return build_model("lenet_300_100", image_shape=DIGITS_SHAPE, num_classes=10,
                       generator=torch.Generator().manual_seed(seed))


def convnet(seed: int = 0, width: int = 4) -> nn.Module:
    return build_model("convnet", image_shape=DIGITS_SHAPE, num_classes=10, width=width,
                       generator=torch.Generator().manual_seed(seed))


def search(model, split, *, density=0.1, epochs=1, batch_size=64, lr=0.1, seed=0, **config):
    return concrete_search(
        model, split, density=density, config=SearchConfig(epochs=epochs, **config),
        recipe=TrainRecipe(epochs=epochs, batch_size=batch_size, lr=lr), seed=seed, progress=False,
    )


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# The relaxation


def test_temperature_is_fixed_at_two_thirds():
    assert cts.TEMPERATURE == pytest.approx(TAU, rel=1e-15)


@pytest.mark.parametrize("s", [-2.0, 0.0, 1.5])
def test_concrete_sample_has_the_binary_concrete_distribution(s):
    n = 300_000
    noise = concrete_noise(n, UniformNoise(CPU, int(10 * s) + 100, "t"), CPU)
    m = soft_mask(torch.full((n,), s), noise).double().numpy()
    assert m.shape == (n,) and bool(((m >= 0) & (m <= 1)).all())
    for point in (0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98):
        empirical = float((m <= point).mean())
        analytic = float(sigmoid(TAU * (math.log(point / (1 - point)) - s)))
        assert empirical == pytest.approx(analytic, abs=0.005), (
            f"s={s}: P(m <= {point}) is {empirical:.4f}, Binary Concrete gives {analytic:.4f}")
    assert float((m > 0.5).mean()) == pytest.approx(float(sigmoid(TAU * s)), abs=0.005)


def test_concrete_noise_is_standard_logistic():
    noise = concrete_noise(1_000_000, UniformNoise(CPU, 0, "t"), CPU).double()
    assert noise.shape == (1_000_000,)
    assert noise.mean().item() == pytest.approx(0.0, abs=0.01)
    assert noise.var().item() == pytest.approx(math.pi ** 2 / 3, rel=0.01)
    # logistic CDF at a few points
    for x in (-3.0, -1.0, 0.5, 2.0):
        assert (noise <= x).double().mean().item() == pytest.approx(sigmoid(x), abs=0.003)


def test_concrete_noise_stays_finite_when_the_uniform_draw_is_zero():
    drawn = torch.tensor([0.0, 0.5, 1.0 - 2.0 ** -24, 1e-30], dtype=torch.float32)
    calls = []

    class FixedDraws:
        def fill_(self, out):
            calls.append(out.numel())
            return out.copy_(drawn)

    noise = concrete_noise(4, FixedDraws(), CPU)
    assert calls == [4], "one uniform per weight"
    assert bool(torch.isfinite(noise).all()), noise
    floor = math.log(cts.NOISE_EPS)
    assert noise[0].item() == pytest.approx(floor, rel=1e-5), "u = 0 must be clamped to the floor"
    assert noise[3].item() == pytest.approx(floor, rel=1e-5)
    assert noise[1].item() == pytest.approx(0.0, abs=1e-7)
    assert noise[2].item() == pytest.approx(math.log((1 - 2.0 ** -24) / 2.0 ** -24), rel=1e-5)
    mask = soft_mask(torch.zeros(4), noise)
    assert bool(torch.isfinite(mask).all())


# --------------------------------------------------------------------------------------------
# Objectives


SPARSE = np.array([[1.0, -0.5, 2.0, 0.0], [0.3, 0.3, -1.0, 4.0], [-2.0, 1.0, 0.5, 0.1]])
DENSE = np.array([[0.2, 0.1, 1.0, -1.0], [1.5, -0.2, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
LABELS = np.array([2, 0, 3])


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def hand_kl(p_logits, q_logits):
    """mean over rows of sum_c p (log p - log q)."""
    p, q = softmax(p_logits), softmax(q_logits)
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))


def hand_ce(logits, labels):
    p = softmax(logits)
    return float(np.mean(-np.log(p[np.arange(len(labels)), labels])))


def as_torch(a):
    return torch.tensor(a, dtype=torch.float32)


def test_reverse_kl_matches_a_hand_computation():
    got = reverse_kl(as_torch(SPARSE), as_torch(DENSE), torch.tensor(LABELS)).item()
    assert got == pytest.approx(hand_kl(SPARSE, DENSE), abs=1e-6)


def test_forward_kl_matches_a_hand_computation():
    got = forward_kl(as_torch(SPARSE), as_torch(DENSE), torch.tensor(LABELS)).item()
    assert got == pytest.approx(hand_kl(DENSE, SPARSE), abs=1e-6)


def test_kl_of_identical_logits_is_zero_and_the_two_directions_differ():
    y = torch.tensor(LABELS)
    for fn in (reverse_kl, forward_kl):
        assert abs(fn(as_torch(DENSE), as_torch(DENSE), y).item()) < 1e-7
    rev = reverse_kl(as_torch(SPARSE), as_torch(DENSE), y).item()
    fwd = forward_kl(as_torch(SPARSE), as_torch(DENSE), y).item()
    assert abs(rev - fwd) > 1e-2, f"reverse {rev} and forward {fwd} KL should differ here"
    assert rev > 0 and fwd > 0


def test_loss_ratio_and_cross_entropy_match_hand_computations():
    y = torch.tensor(LABELS)
    expected = abs(hand_ce(SPARSE, LABELS) / hand_ce(DENSE, LABELS) - 1)
    assert loss_ratio(as_torch(SPARSE), as_torch(DENSE), y).item() == pytest.approx(expected, abs=1e-6)
    assert cross_entropy(as_torch(SPARSE), None, y).item() == pytest.approx(hand_ce(SPARSE, LABELS), abs=1e-6)
    # a sparse loss below the dense one is penalised just as much: |ratio - 1|
    better = abs(hand_ce(DENSE, LABELS) / hand_ce(SPARSE, LABELS) - 1)
    assert loss_ratio(as_torch(DENSE), as_torch(SPARSE), y).item() == pytest.approx(better, abs=1e-6)


def test_objective_registry():
    assert sorted(OBJECTIVES) == ["ce", "dloss", "feature_mse", "fkl", "grad_mse", "gradnorm", "kl"]
    assert {k for k, o in OBJECTIVES.items() if o.kind == "network"} == {"feature_mse", "grad_mse", "gradnorm"}
    assert OBJECTIVES["kl"].fn is reverse_kl and OBJECTIVES["fkl"].fn is forward_kl
    assert OBJECTIVES["ce"].needs_teacher is False
    assert all(OBJECTIVES[k].needs_teacher for k in ("kl", "fkl", "dloss"))


# --------------------------------------------------------------------------------------------
# GradBalance


def hand_gradbalance(logits, task_grad, budget):
    """(lambda*, g_sp, expected) from docs/method.md, in float64 numpy."""
    sig = sigmoid(logits)
    expected = sig.sum()
    g_sp = (100.0 / budget) * sig * (1 - sig)
    over = 100.0 * (expected / budget - 1) > 0
    target = np.linalg.norm(task_grad) / np.linalg.norm(g_sp) if over else 0.0
    return target, g_sp, expected


def test_gradbalance_budget_is_ten_percent_over_the_kept_count():
    assert GradBalance(0.1, 1000).budget == pytest.approx(110.0, rel=1e-14)
    assert GradBalance(0.05, 266_200).budget == pytest.approx(1.1 * 0.05 * 266_200, rel=1e-14)
    assert GradBalance(0.05, 266_200).multiplier is None


def test_gradbalance_under_budget_passes_the_task_gradient_through():
    balance = GradBalance(0.1, 1000)
    logits = torch.full((1000,), -5.0, dtype=torch.float64)  # sum sigma = 6.69 < 110
    g = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out, expected = balance.combine(logits, g)
    assert balance.multiplier.item() == 0.0
    assert torch.equal(out, g)
    assert expected.item() == pytest.approx(1000 * sigmoid(-5.0), rel=1e-12)


def test_gradbalance_multiplier_and_moving_average_by_hand():
    d, density = 1000, 0.1
    budget = 1.1 * density * d
    gen = torch.Generator().manual_seed(1)
    steps = [  # (logits, task gradient): over, over, under budget
        (torch.linspace(-3, 3, d, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)),
        (torch.linspace(-4, 1, d, dtype=torch.float64), 0.1 * torch.randn(d, generator=gen, dtype=torch.float64)),
        (torch.full((d,), -4.0, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)),
    ]
    balance = GradBalance(density, d)
    lam = None
    for i, (logits, g) in enumerate(steps):
        target, g_sp, expected = hand_gradbalance(logits.numpy(), g.numpy(), budget)
        assert (target > 0) == (i < 2), "the test's steps must be over, over, then under budget"
        lam = target if lam is None else lam + 0.01 * (target - lam)
        out, got_expected = balance.combine(logits, g)
        assert balance.multiplier.item() == pytest.approx(lam, rel=1e-10), f"step {i + 1}"
        np.testing.assert_allclose(out.numpy(), g.numpy() + lam * g_sp, rtol=1e-10, atol=1e-14,
                                   err_msg=f"step {i + 1}: gradient handed to Adam")
        assert got_expected.item() == pytest.approx(expected, rel=1e-12)


def test_gradbalance_moving_average_starts_from_a_zero_first_target():
    d = 1000
    balance = GradBalance(0.1, d)
    g = torch.ones(d, dtype=torch.float64)
    balance.combine(torch.full((d,), -5.0, dtype=torch.float64), g)  # under: lambda = 0
    over = torch.zeros(d, dtype=torch.float64)  # sum sigma = 500
    target, _, _ = hand_gradbalance(over.numpy(), g.numpy(), 110.0)
    balance.combine(over, g)
    assert balance.multiplier.item() == pytest.approx(0.01 * target, rel=1e-10)
    balance.drop_lr(0.1)  # no rate of its own: nothing changes
    assert balance.multiplier.item() == pytest.approx(0.01 * target, rel=1e-10)


def test_gradbalance_keeps_the_expected_count_under_budget_in_a_search(digits_train):
    # LeNet at initialisation, CTS-KL at 5 % density: without the balancer the expected kept
    # count climbs to ~3x the budget on this problem.
    result = search(lenet(), digits_train, density=0.05, epochs=10, batch_size=32, objective="kl")
    over = [r["expected_over_budget"] for r in result.history]
    multipliers = [r["multiplier"] for r in result.history]
    assert result.steps == 450
    assert result.budget == pytest.approx(1.1 * 0.05 * 50_200)
    assert result.peak_expected_over_budget > 1.0, f"budget never reached: {over}"
    assert result.final_expected_over_budget <= 1.02, (
        f"final expected/budget {result.final_expected_over_budget:.4f}; per epoch {over}")
    assert result.peak_expected_over_budget < 1.2, over
    assert max(multipliers) > 0, multipliers
    kept = sum(int(torch.sigmoid(s).sum().round()) for s in result.scores.values())
    assert kept <= 1.02 * result.budget


# --------------------------------------------------------------------------------------------
# Lagrangian


def test_lagrangian_multiplier_rises_over_and_falls_under_the_kept_count():
    d, density, mask_lr = 1000, 0.1, 0.2
    lag = Lagrangian(density, d, mask_lr)
    assert lag.budget == pytest.approx(100.0)  # no slack
    assert lag.lr == pytest.approx(0.01 * mask_lr, rel=1e-14)
    g = torch.full((d,), 0.5, dtype=torch.float64)
    over = torch.zeros(d, dtype=torch.float64)  # sum sigma = 500: c = 100 * (5 - 1) = 400
    out, expected = lag.combine(over, g)
    assert torch.equal(out, g), "lambda starts at 0"
    assert expected.item() == pytest.approx(500.0)
    assert lag.multiplier.item() == pytest.approx(0.002 * 400, rel=1e-12)
    out, _ = lag.combine(over, g)
    np.testing.assert_allclose(out.numpy(), 0.5 + 0.8 * (100 / 100) * 0.25, rtol=1e-12)
    assert lag.multiplier.item() == pytest.approx(1.6, rel=1e-12)

    under = torch.full((d,), -5.0, dtype=torch.float64)
    c_under = 100 * (1000 * sigmoid(-5.0) / 100 - 1)  # about -93.3
    lam = 1.6
    for _ in range(10):
        lag.combine(under, g)
        lam += 0.002 * c_under
        assert lag.multiplier.item() == pytest.approx(lam, rel=1e-10)
    assert lag.multiplier.item() < 0, "the multiplier may go negative"

    lag.drop_lr(0.1)
    assert lag.lr == pytest.approx(0.0002, rel=1e-12)
    lag.combine(under, g)
    assert lag.multiplier.item() == pytest.approx(lam + 0.0002 * c_under, rel=1e-10)


def test_lagrangian_rate_is_dropped_with_the_mask_rate_in_a_search(digits_train, monkeypatch):
    made = []
    real = cts.make_balancer

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(cts.search, "make_balancer", recording)
    result = search(lenet(), digits_train.subset(320), epochs=2, batch_size=64, lr=0.05,
                    balance="lagrangian")
    assert len(made) == 1 and isinstance(made[0], Lagrangian)
    assert made[0].lr == pytest.approx(0.01 * 0.05 * 0.1, rel=1e-12)
    assert result.history[-1]["lr"] == pytest.approx(0.005)
    assert result.history[-1]["multiplier"] != 0.0


# --------------------------------------------------------------------------------------------
# Exact count, determinism, frozen weights


@pytest.fixture(scope="module")
def lenet_search(digits_train):
    return search(lenet(), digits_train.subset(256), density=0.05, epochs=2, batch_size=64, seed=3)


@pytest.mark.parametrize(("density", "kept"), [(0.05, 2510), (0.0123, 617), (0.12345, 6197),
                                               (0.33333, 16733), (0.0101, 507)])
def test_search_scores_give_a_mask_of_exactly_round_kd(lenet_search, density, kept):
    assert round(density * 50_200) == kept  # the literal is the hand computation
    mask = global_topk_mask(lenet_search.scores, density)
    assert sum(int(m.sum()) for m in mask.values()) == kept
    shapes = {n: tuple(p.shape) for n, p in prunable_parameters(lenet()).items()}
    assert {n: tuple(m.shape) for n, m in mask.items()} == shapes


def test_same_seed_same_scores_other_seed_other_scores(digits_train, lenet_search):
    again = search(lenet(), digits_train.subset(256), density=0.05, epochs=2, batch_size=64, seed=3)
    other = search(lenet(), digits_train.subset(256), density=0.05, epochs=2, batch_size=64, seed=4)
    for name, scores in lenet_search.scores.items():
        assert torch.equal(again.scores[name], scores), f"{name}: same seed, different scores"
    assert any(not torch.equal(other.scores[n], s) for n, s in lenet_search.scores.items())
    a, b = (global_topk_mask(r.scores, 0.05) for r in (lenet_search, again))
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("train_mode", [True, False])
def test_search_leaves_every_parameter_and_buffer_and_the_mode_untouched(digits_train, train_mode):
    model = convnet()
    with torch.no_grad():  # give BN non-trivial state so "unchanged" means something
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(17)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.train(train_mode)
    before = snapshot(model)
    result = search(model, digits_train.subset(192), epochs=2, batch_size=64)
    assert result.steps == 6
    after = snapshot(model)
    assert list(after) == list(before)
    for name in before:
        assert torch.equal(after[name], before[name]), f"{name} changed during the search"
    assert model.training is train_mode
    assert all(m.training is train_mode for m in model.modules())


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_search_that_fails_midway_leaves_the_model_as_it_was(digits_train, monkeypatch, channels_last):
    """The weights are frozen and put in NHWC only while the search runs: an error (or an
    interrupt) in the loop must not leave the caller's model frozen or in another layout."""
    model = convnet()
    before = snapshot(model)
    calls = []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    real_step = cts.search_step
    monkeypatch.setattr(cts.search, "search_step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        cts.concrete_search(model, digits_train.subset(192), density=0.1, config=SearchConfig(epochs=2),
                            recipe=TrainRecipe(epochs=2, batch_size=64, lr=0.1), seed=0, channels_last=channels_last,
                            progress=False)
    assert all(p.requires_grad for p in model.parameters()), "the weights are trainable again"
    assert all(p.is_contiguous() for p in model.parameters()), "the usual layout is back"
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())


# --------------------------------------------------------------------------------------------
# BatchNorm


def absurd_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(50.0)
                m.running_var.fill_(1e4)
    return model


def manual_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    w, b = bn.weight.view(1, -1, 1, 1), bn.bias.view(1, -1, 1, 1)
    return (x - mean) / torch.sqrt(var + bn.eps) * w + b


@pytest.mark.parametrize("train_mode", [True, False])
def test_batch_statistics_normalises_with_the_batch(digits_train, train_mode):
    model = absurd_bn(convnet())
    x, _ = next(iterate_batches(digits_train, 64, shuffle=False))
    model.train(train_mode)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    reference = copy.deepcopy(model).train()  # train mode: batch statistics
    with torch.no_grad():
        expected = reference(x)
        with_running = copy.deepcopy(model).eval()(x)
        with batch_statistics(model):
            got = model(x)
            got_again = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_again, got, rtol=0, atol=0)
    assert (got - with_running).abs().max().item() > 1.0, "running statistics must not be used"
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), f"{name} changed under batch_statistics"
    assert model.training is train_mode


def test_both_search_forwards_use_batch_statistics(digits_train):
    model = absurd_bn(convnet())
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 3
    calls = []

    def check(module, inputs, output):
        (x,) = inputs
        with torch.no_grad():
            expected = manual_batch_norm(module, x.detach())
        calls.append((output.requires_grad,
                      torch.allclose(output.detach(), expected, rtol=1e-4, atol=1e-4)))

    handles = [m.register_forward_hook(check) for m in norms]
    try:
        result = search(model, digits_train.subset(128), epochs=1, batch_size=64, objective="kl")
    finally:
        for h in handles:
            h.remove()
    assert result.steps == 2
    assert len(calls) == 2 * 3 * 2, "one teacher and one masked forward per step, 3 BN layers each"
    assert all(ok for _, ok in calls), "a forward was normalised with the running statistics"
    # the teacher runs without gradient, the masked network with it: both kinds were seen
    assert sorted({req for req, _ in calls}) == [False, True]


# --------------------------------------------------------------------------------------------
# Masked network and teacher


def test_dense_teacher_is_the_same_network_with_the_mask_off(digits_train):
    model = convnet()
    x, _ = next(iterate_batches(digits_train, 64, shuffle=False))
    relaxation = ConcreteMask(prunable_parameters(model), density=0.1)
    noise = concrete_noise(relaxation.num_weights, UniformNoise(CPU, 0, "t"), CPU)
    with torch.no_grad(), batch_statistics(model):
        dense = model(x)
        low = functional_call(model, relaxation.masked_weights(soft_mask(relaxation.logits, noise)), (x,))
        relaxation.logits.fill_(30.0)
        high = functional_call(model, relaxation.masked_weights(soft_mask(relaxation.logits, noise)), (x,))
    torch.testing.assert_close(high, dense, rtol=1e-5, atol=1e-5)
    assert reverse_kl(high, dense, None).item() < 1e-6
    assert reverse_kl(low, dense, None).item() > 1e-2, "at 10 % the masked network must differ"


def test_masked_weights_are_theta_times_the_soft_mask_in_layer_shapes():
    model = convnet()
    weights = prunable_parameters(model)
    relaxation = ConcreteMask(weights, density=0.2)
    assert relaxation.num_weights == sum(w.numel() for w in weights.values())
    assert torch.allclose(torch.sigmoid(relaxation.logits), torch.tensor(0.2))
    soft = torch.rand(relaxation.num_weights, generator=torch.Generator().manual_seed(0))
    masked = relaxation.masked_weights(soft)
    offset = 0
    for name, w in weights.items():
        part = soft[offset: offset + w.numel()].view(w.shape)
        assert torch.equal(masked[name], w.detach() * part), name
        offset += w.numel()


# --------------------------------------------------------------------------------------------
# One step of the search against a naive reference


class MultiplyBy(nn.Module):
    def __init__(self, factor: torch.Tensor) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.factor


@pytest.mark.parametrize(("objective", "loss_scale", "expected_scale"),
                         [("kl", None, 100.0), ("ce", None, 100.0), ("dloss", None, 10_000.0),
                          ("kl", 1.0, 1.0), ("fkl", 7.0, 7.0)])
def test_search_gradient_matches_a_naive_reference(digits_train, monkeypatch, objective, loss_scale,
                                                   expected_scale):
    """The gradient handed to GradBalance is ``loss_scale × ∂objective/∂s``; null is the authors' factor."""
    model = convnet(width=4)
    model.fc.bias.data.normal_(generator=torch.Generator().manual_seed(9))
    reference_model = copy.deepcopy(model)
    split = digits_train.subset(64)
    density = 0.2
    seen = {"noise": [], "batches": [], "grads": []}

    real_noise, real_batches, real_combine = cts.concrete_noise, cts.search.iterate_batches, GradBalance.combine

    def noise(num, generator, device, out=None):
        drawn = real_noise(num, generator, device, out=out)
        seen["noise"].append(drawn.clone())
        return drawn

    def batches(*args, **kwargs):
        for x, y in real_batches(*args, **kwargs):
            seen["batches"].append((x, y))
            yield x, y

    def combine(self, logits, task_grad, rank_norms=None):
        seen["grads"].append(task_grad.clone())
        return real_combine(self, logits, task_grad, rank_norms)

    monkeypatch.setattr(cts.relaxation, "concrete_noise", noise)
    monkeypatch.setattr(cts.search, "iterate_batches", batches)
    monkeypatch.setattr(GradBalance, "combine", combine)
    search(model, split, density=density, epochs=1, batch_size=64, objective=objective, loss_scale=loss_scale)
    assert len(seen["noise"]) == len(seen["batches"]) == len(seen["grads"]) == 1
    (x, y), noise_flat, project_grad = seen["batches"][0], seen["noise"][0], seen["grads"][0]

    # Reference: a copy of the network whose prunable weights are parametrised as weight * m,
    # m = sigmoid(s + L / tau) per layer, BatchNorm in train mode (batch statistics).
    reference_model.train()
    logits, offset = {}, 0
    modules = dict(reference_model.named_modules())
    for name, w in prunable_parameters(reference_model).items():
        w.requires_grad_(False)
        layer_noise = noise_flat[offset: offset + w.numel()].view(w.shape)
        offset += w.numel()
        logits[name] = torch.full(w.shape, math.log(density / (1 - density)), requires_grad=True)
        m = torch.sigmoid(logits[name] + layer_noise / TAU)
        parametrize.register_parametrization(modules[name.removesuffix(".weight")], "weight",
                                             MultiplyBy(m))
    teacher = copy.deepcopy(model).train()
    with torch.no_grad():
        dense = teacher(x)
    sparse = reference_model(x)
    log_ps, log_pd = F.log_softmax(sparse, 1), F.log_softmax(dense, 1)
    if objective == "kl":
        loss = (log_ps.exp() * (log_ps - log_pd)).sum(1).mean()
    elif objective == "fkl":
        loss = (log_pd.exp() * (log_pd - log_ps)).sum(1).mean()
    elif objective == "ce":
        loss = F.nll_loss(log_ps, y)
    else:
        loss = (F.nll_loss(log_ps, y) / F.nll_loss(log_pd, y) - 1).abs()
    grads = torch.autograd.grad(loss, list(logits.values()))
    reference_grad = expected_scale * torch.cat([g.reshape(-1) for g in grads])

    assert project_grad.shape == reference_grad.shape
    rel = ((project_grad - reference_grad).norm() / reference_grad.norm()).item()
    assert reference_grad.norm().item() > 0
    assert rel < 5e-6, f"{objective}: relative gradient difference {rel:.2e}"  # float32 rounding


def test_noise_is_drawn_once_per_weight_per_step_and_shared_by_the_batch(digits_train, monkeypatch):
    model = convnet()
    d = sum(w.numel() for w in prunable_parameters(model).values())
    noise_calls, soft_shapes = [], []
    real_noise, real_masked = cts.concrete_noise, ConcreteMask.masked_weights

    def noise(num, generator, device, out=None):
        drawn = real_noise(num, generator, device, out=out)
        noise_calls.append((num, drawn.clone()))  # the buffer is reused: keep a copy
        return drawn

    def masked(self, soft):
        soft_shapes.append(tuple(soft.shape))
        out = real_masked(self, soft)
        assert all(out[n].shape == s for n, s in self.shapes.items()), "no batch dimension"
        return out

    monkeypatch.setattr(cts.relaxation, "concrete_noise", noise)
    monkeypatch.setattr(ConcreteMask, "masked_weights", masked)
    result = search(model, digits_train.subset(200), epochs=2, batch_size=64)
    assert result.steps == 8  # 4 batches (the last of 8) x 2 epochs
    assert [num for num, _ in noise_calls] == [d] * 8, "one draw of d uniforms per step"
    assert soft_shapes == [(d,)] * 8, "one soft mask value per weight, for the whole batch"
    assert not torch.equal(noise_calls[0][1], noise_calls[1][1]), "fresh noise every step"


# --------------------------------------------------------------------------------------------
# Schedule and length


@pytest.mark.parametrize(("subset", "batch_size", "epochs", "drop_step"),
                         [(160, 32, 5, 22), (128, 64, 5, 9), (96, 32, 3, 8), (160, 32, 10, 44), (32, 32, 50, 44)])
def test_adam_rate_drops_tenfold_once_at_88_percent(digits_train, monkeypatch, subset, batch_size,
                                                    epochs, drop_step):
    total = epochs * math.ceil(subset / batch_size)
    assert round(0.88 * total) == drop_step
    rates = []
    real_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    result = concrete_search(
        lenet(), digits_train.subset(subset), density=0.1, config=SearchConfig(epochs=epochs, lr=0.05),
        recipe=TrainRecipe(epochs=7, batch_size=batch_size, lr=0.3), seed=0, progress=False,
    )
    assert len(rates) == total == result.steps
    assert rates[:drop_step] == [0.05] * drop_step, "cts.lr must override the training rate"
    assert rates[drop_step:] == pytest.approx([0.005] * (total - drop_step), rel=1e-12)
    per_epoch = total // epochs
    expected_history = [0.05 if (e + 1) * per_epoch <= drop_step else 0.005 for e in range(epochs)]
    assert [r["lr"] for r in result.history] == pytest.approx(expected_history, rel=1e-12)
    assert [r["epoch"] for r in result.history] == list(range(1, epochs + 1))


def test_search_optimizer_and_data_follow_the_search_settings(digits_train, monkeypatch):
    groups, batch_calls = [], []
    real_step, real_batches = torch.optim.Adam.step, cts.search.iterate_batches

    def step(self, *args, **kwargs):
        groups.append({k: v for k, v in self.param_groups[0].items() if k != "params"})
        groups[-1]["n_params"] = len(self.param_groups[0]["params"])
        return real_step(self, *args, **kwargs)

    def batches(split, batch_size, **kwargs):
        batch_calls.append((len(split), batch_size, kwargs))
        return real_batches(split, batch_size, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    monkeypatch.setattr(cts.search, "iterate_batches", batches)
    concrete_search(  # a recipe that augments and decays weights: the search must do neither
        lenet(), digits_train.subset(96), density=0.1, config=SearchConfig(epochs=2),
        recipe=TrainRecipe(epochs=2, batch_size=48, lr=0.3, augment=True, weight_decay=5e-4),
        seed=0, progress=False,
    )
    assert [g["lr"] for g in groups] == [0.3] * 4, "the search rate defaults to the training rate"
    assert all(g["betas"] == (0.9, 0.999) and g["weight_decay"] == 0 for g in groups), groups[0]
    assert all(g["n_params"] == 1 for g in groups), "Adam must optimise the logits only"
    assert [(n, b) for n, b, _ in batch_calls] == [(96, 48), (96, 48)]
    assert all(kw.get("shuffle") is True and not kw.get("augment", False) for _, _, kw in batch_calls)


def test_loss_scale_defaults_to_the_authors_factor_per_objective():
    # TLAB search/concrete.py: _loss_scaler_constant *= 100 (loss, KL both ways, features, gradient
    # matching), *= 10000 (deltaloss), unscaled for gradnorm.
    expected = {"kl": 100.0, "fkl": 100.0, "ce": 100.0, "dloss": 10_000.0, "feature_mse": 100.0,
                "grad_mse": 100.0, "gradnorm": 1.0}
    assert {name: SearchConfig(objective=name).effective_loss_scale for name in OBJECTIVES} == expected
    assert SearchConfig(objective="dloss", loss_scale=1).effective_loss_scale == 1.0


def test_search_length():
    assert SearchConfig().search_epochs(160) == 160
    assert SearchConfig(search_length="short").search_epochs(160) == 20
    assert SearchConfig(search_length="short").search_epochs(20) == 3
    assert SearchConfig(search_length="short").search_epochs(17) == 3
    assert SearchConfig(search_length="short").search_epochs(3) == 1
    assert SearchConfig(search_length="short", epochs=7).search_epochs(160) == 7
    assert SearchConfig(epochs=5).search_epochs(160) == 5


@pytest.mark.parametrize(
    ("field", "value"),
    [("objective", "mse"), ("objective", "KL"), ("search_length", "medium"), ("balance", "penalty"),
     ("search_at", "end"), ("lr", 0.0), ("lr", -1.0), ("lr", float("nan")), ("epochs", 0),
     ("epochs", -2), ("epochs", 2.5), ("loss_scale", 0.0), ("loss_scale", -100.0), ("loss_scale", "big"),
     ("loss_scale", float("inf")), ("loss_scale", True), ("min_kept_per_layer", -1), ("min_kept_per_layer", 2.5)],
)
def test_search_config_rejects_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=rf"^cts\.{field} must be"):
        SearchConfig(**{field: value})


def test_search_refuses_a_density_outside_the_open_unit_interval(digits_train):
    for density in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="density must be in"):
            search(lenet(), digits_train.subset(64), density=density)


@pytest.mark.parametrize(("bad_call", "where"), [(3, "epoch 1/2, step 3/4"), (6, "epoch 2/2, step 2/4")])
def test_non_finite_objective_names_stage_epoch_and_step(digits_train, monkeypatch, bad_call, where):
    calls = []

    def poisoned(sparse, dense, labels):
        calls.append(1)
        loss = reverse_kl(sparse, dense, labels)
        return loss * float("nan") if len(calls) == bad_call else loss

    monkeypatch.setitem(OBJECTIVES, "kl", Objective(poisoned, needs_teacher=True))
    with pytest.raises(NonFiniteLossError, match=rf"^cts-probe: the loss became nan at {where};"):
        concrete_search(lenet(), digits_train.subset(256), density=0.1, config=SearchConfig(epochs=2),
                        recipe=TrainRecipe(epochs=2, batch_size=64, lr=0.1), seed=0,
                        stage="cts-probe", progress=False)


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_uniform_noise_is_uniform_deterministic_and_fresh(engine):
    a, b = torch.empty(200_000), torch.empty(200_000)
    first = UniformNoise(CPU, 5, "s", 0, engine=engine)
    first.fill_(a)
    UniformNoise(CPU, 5, "s", 0, engine=engine).fill_(b)
    assert torch.equal(a, b), "same seed and stream, same draws"
    assert 0.0 <= a.min().item() and a.max().item() < 1.0
    assert abs(a.mean().item() - 0.5) < 0.005 and abs(a.var().item() - 1 / 12) < 0.002
    first.fill_(b)
    assert not torch.equal(a, b), "each fill draws anew"
    UniformNoise(CPU, 5, "s", 1, engine=engine).fill_(b)
    assert not torch.equal(a, b), "another stream, other draws"

"""The SGD loop: recipe validation, learning, masks, resuming, non-finite losses and evaluation."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from cts_pipeline.core.data.splits import iterate_batches, load_splits
from cts_pipeline.core.nets.masks import prunable_parameters
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.train import loop as training
from cts_pipeline.core.train.loop import NonFiniteLossError, check_finite, evaluate, train
from cts_pipeline.core.train.recipe import TrainRecipe

DIGITS_SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits")


def lenet(seed: int = 0):
    return build_model("lenet_300_100", image_shape=DIGITS_SHAPE, num_classes=10,
                       generator=torch.Generator().manual_seed(seed))


def convnet(seed: int = 0):
    return build_model("convnet", image_shape=DIGITS_SHAPE, num_classes=10, width=8,
                       generator=torch.Generator().manual_seed(seed))


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_states_equal(a: dict, b: dict, what: str) -> None:
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{what}: {name} differs"


RECIPE = TrainRecipe(epochs=3, batch_size=64, lr=0.05)


@pytest.fixture(scope="module")
def trained(digits):
    """LeNet trained 3 epochs on digits: (model, result, initial state, on_epoch_end calls)."""
    train_split, test_split = digits
    model = lenet()
    initial = state(model)
    calls = []
    result = train(model, train_split, test_split, RECIPE, seed=0, stage="dense",
                   on_epoch_end=lambda done, m: calls.append((done, m)), progress=False)
    return model, result, initial, calls


# --------------------------------------------------------------------------------------------
# TrainRecipe


GOOD = {"epochs": 6, "batch_size": 8, "lr": 0.1}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("epochs", -3),
        ("epochs", 2.5),
        ("batch_size", 0),
        ("lr", 0.0),
        ("lr", -0.1),
        ("rewind_epoch", -1),
        ("rewind_epoch", 6),  # == epochs: theta_k must exist before the end
        ("rewind_epoch", 9),
        ("milestones", [4, 2]),
        ("milestones", [2, 7]),  # past the last epoch
        ("milestones", [0, 3]),
        ("loss_reduction", "none"),
        ("precision", "fp64"),
    ],
)
def test_recipe_rejects_each_bad_field_by_name(field, value):
    with pytest.raises(ValueError, match=rf"^training\.{field} must be"):
        TrainRecipe(**{**GOOD, field: value})


def test_recipe_accepts_boundary_values():
    recipe = TrainRecipe(**GOOD, rewind_epoch=5, milestones=[3, 6], loss_reduction="sum",
                         precision="bf16")
    assert recipe.milestones == (3, 6)
    assert recipe.as_dict()["milestones"] == [3, 6]


def test_lr_at_applies_milestones_at_absolute_epochs():
    recipe = TrainRecipe(**{**GOOD, "milestones": [2, 4]})
    got = [recipe.lr_at(e) for e in range(6)]
    assert got == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rel=1e-12), got
    assert TrainRecipe(**GOOD, gamma=0.5, milestones=[1]).lr_at(3) == pytest.approx(0.05)


# --------------------------------------------------------------------------------------------
# train


def test_train_lowers_the_loss_and_learns(trained):
    _, result, _, _ = trained
    losses = [r["train_loss"] for r in result.history]
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert losses[-1] < 0.5 * losses[0], f"training loss did not fall: {losses}"
    assert result.history[-1]["test_accuracy"] > 80.0, result.history[-1]
    assert result.history[-1]["train_accuracy"] > 80.0, result.history[-1]


def test_train_calls_on_epoch_end_with_epochs_done(trained):
    model, _, _, calls = trained
    assert [done for done, _ in calls] == [1, 2, 3]
    assert all(m is model for _, m in calls)


def test_train_is_bitwise_reproducible_with_the_same_seed(digits, trained):
    model, _, initial, _ = trained
    again = lenet()
    assert_states_equal(state(again), initial, "initialisation")
    train(again, digits[0], None, RECIPE, seed=0, stage="dense", progress=False)
    assert_states_equal(state(again), state(model), "same seed")

    other = lenet()
    train(other, digits[0], None, RECIPE, seed=1, stage="dense", progress=False)
    assert not torch.equal(other.fc1.weight, model.fc1.weight), "the seed must drive the data order"


def test_masked_training_keeps_pruned_weights_exactly_zero(digits):
    model = lenet()
    g = torch.Generator().manual_seed(3)
    mask = {n: torch.rand(p.shape, generator=g) < 0.1 for n, p in prunable_parameters(model).items()}
    before = {n: p.detach().clone() for n, p in prunable_parameters(model).items()}
    result = train(model, digits[0], None, TrainRecipe(epochs=1, batch_size=64, lr=0.05),
                   seed=0, stage="sparse", mask=mask, progress=False)
    for name, w in prunable_parameters(model).items():
        keep = mask[name]
        assert bool((w.detach()[~keep] == 0.0).all()), f"{name}: a pruned weight is not 0.0"
        moved = (w.detach()[keep] != before[name][keep]).float().mean().item()
        assert moved > 0.95, f"{name}: only {moved:.1%} of the kept weights moved"
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))


def test_train_refuses_a_mask_that_does_not_fit(digits):
    model = lenet()
    mask = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in prunable_parameters(model).items()}
    mask["fc2.weight"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="fc2.weight"):
        train(model, digits[0], None, RECIPE, seed=0, stage="sparse", mask=mask, progress=False)


def test_resume_uses_the_schedule_at_absolute_epochs(digits):
    recipe = TrainRecipe(epochs=4, batch_size=128, lr=0.1, milestones=[1, 3])
    start = lenet()
    runs = []
    for _ in range(2):
        model = lenet()
        model.load_state_dict(start.state_dict())
        result = train(model, digits[0].subset(512), None, recipe, seed=5, stage="retrain",
                       start_epoch=2, progress=False)
        runs.append((model, result))
    (a, ra), (b, rb) = runs
    assert [r["epoch"] for r in ra.history] == [3, 4]
    assert [r["lr"] for r in ra.history] == pytest.approx([0.01, 0.001], rel=1e-12)
    assert_states_equal(state(a), state(b), "two resumes from the same state and seed")


def test_resumed_data_order_depends_only_on_seed_and_epoch(digits, monkeypatch):
    seen: list[tuple[int, torch.Tensor]] = []
    real = training.iterate_batches

    def recording(split, batch_size, **kwargs):
        batches = list(real(split, batch_size, **kwargs))
        seen.append(torch.cat([y for _, y in batches]))
        yield from batches

    monkeypatch.setattr(training, "iterate_batches", recording)
    recipe = TrainRecipe(epochs=4, batch_size=128, lr=0.05)
    split = digits[0].subset(384)
    train(lenet(), split, None, recipe, seed=7, stage="a", start_epoch=1, end_epoch=3, progress=False)
    first = list(seen)
    seen.clear()
    train(lenet(1), split, None, recipe, seed=7, stage="b", start_epoch=2, end_epoch=3, progress=False)
    assert len(first) == 2 and len(seen) == 1
    assert torch.equal(seen[0], first[1]), "epoch 2's data order changed with where the run started"
    assert not torch.equal(first[0], first[1]), "epochs must be shuffled differently"


# --------------------------------------------------------------------------------------------
# Non-finite losses


def test_absurd_learning_rate_raises_naming_stage_epoch_and_step(digits):
    recipe = TrainRecipe(epochs=2, batch_size=64, lr=1e6)
    with pytest.raises(NonFiniteLossError,
                       match=r"^blowup: the loss became (nan|inf|-inf) at epoch 1/2, step \d+/23;"):
        train(lenet(), digits[0], None, recipe, seed=0, stage="blowup", progress=False)


def test_injected_nan_is_reported_at_its_exact_epoch_and_step(digits, monkeypatch):
    real = training.iterate_batches
    epochs_started = []

    def poisoned(split, batch_size, **kwargs):
        epochs_started.append(1)
        for i, (x, y) in enumerate(real(split, batch_size, **kwargs)):
            if len(epochs_started) == 2 and i == 2:  # epoch 2, step 3
                x = x.clone()
                x[0, 0, 0, 0] = float("nan")
            yield x, y

    monkeypatch.setattr(training, "iterate_batches", poisoned)
    recipe = TrainRecipe(epochs=3, batch_size=64, lr=0.05)
    with pytest.raises(NonFiniteLossError, match=r"^dense-7: the loss became nan at epoch 2/3, step 3/5;"):
        train(lenet(), digits[0].subset(300), None, recipe, seed=0, stage="dense-7", progress=False)


def test_check_finite_names_the_first_bad_step():
    with pytest.raises(NonFiniteLossError, match=r"^s: the loss became nan at epoch 2/5, step 3/4;"):
        check_finite(torch.tensor([1.0, 2.0, float("nan"), float("inf")]), stage="s", epoch=1, epochs=5)
    with pytest.raises(NonFiniteLossError, match=r"became inf at epoch 1/1, step 2/3;"):
        check_finite(torch.tensor([0.5, float("inf"), float("nan")]), stage="s", epoch=0, epochs=1)
    check_finite(torch.tensor([0.0, 1e30, -5.0]), stage="s", epoch=0, epochs=1)  # finite: no error


# --------------------------------------------------------------------------------------------
# evaluate


@pytest.fixture(scope="module")
def bn_model(digits):
    """A convnet (has BatchNorm) trained one epoch, so eval and train mode give different outputs."""
    model = convnet()
    train(model, digits[0], None, TrainRecipe(epochs=1, batch_size=64, lr=0.05), seed=0,
          stage="dense", progress=False)
    return model


@pytest.mark.parametrize("start_in_train_mode", [True, False])
def test_evaluate_matches_a_manual_computation_in_eval_mode(digits, bn_model, start_in_train_mode):
    test_split = digits[1]
    bn_model.train(start_in_train_mode)
    with torch.no_grad():
        bn_model.eval()
        x, y = next(iterate_batches(test_split, len(test_split), shuffle=False))
        logits = bn_model(x)
        manual_acc = 100.0 * (logits.argmax(1) == y).sum().item() / len(test_split)
        manual_loss = F.cross_entropy(logits, y).item()
        train_mode_logits = copy.deepcopy(bn_model).train()(x)  # a copy: this updates BN stats
    assert not torch.allclose(train_mode_logits, logits, atol=1e-3), "test needs BN to matter"

    bn_model.train(start_in_train_mode)
    before = state(bn_model)
    result = evaluate(bn_model, test_split, batch_size=100)  # several batches, last one short
    assert result["accuracy"] == pytest.approx(manual_acc, abs=1e-9)
    assert result["loss"] == pytest.approx(manual_loss, rel=1e-5)
    assert bn_model.training is start_in_train_mode, "evaluate must restore the train/eval mode"
    assert_states_equal(state(bn_model), before, "evaluate changed the model")


def test_evaluate_runs_without_autograd(digits, bn_model):
    seen = []
    handle = bn_model.fc.register_forward_hook(
        lambda m, i, out: seen.append((torch.is_inference_mode_enabled(), out.requires_grad,
                                       out.grad_fn)))
    try:
        for p in bn_model.parameters():
            p.grad = None
        evaluate(bn_model, digits[1], batch_size=200)
    finally:
        handle.remove()
    assert len(seen) == 2
    assert all(inference and not req and fn is None for inference, req, fn in seen), seen
    assert all(p.grad is None for p in bn_model.parameters())


# --------------------------------------------------------------------------------------------
# Precision


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_on_cpu_falls_back_to_fp32_with_a_warning(digits, precision, caplog):
    split = digits[0].subset(256)
    fp32 = lenet()
    train(fp32, split, None, TrainRecipe(epochs=1, batch_size=64, lr=0.05), seed=0, stage="a",
          progress=False)
    model = lenet()
    with caplog.at_level(logging.WARNING, logger="cts_pipeline.core.train.loop"):
        result = train(model, split, None, TrainRecipe(epochs=1, batch_size=64, lr=0.05,
                                                        precision=precision),
                       seed=0, stage="b", progress=False)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"training.precision={precision}" in r.getMessage() and "fp32" in r.getMessage()
               for r in warnings), [r.getMessage() for r in warnings]
    assert result.history and torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
    assert_states_equal(state(model), state(fp32), f"{precision} on CPU must train exactly as fp32")


def test_warmup_rises_linearly_per_step_then_follows_the_schedule(digits):
    from cts_pipeline.core.train.batched import train_tickets

    recipe = TrainRecipe(epochs=4, batch_size=10, lr=0.4, warmup_epochs=2, milestones=[3])
    assert [recipe.warmup_lr(e, s, 5) for e in range(2) for s in range(5)] == pytest.approx(
        [0.4 * i / 10 for i in range(1, 11)]), "the i-th of the warm-up's n steps at lr · i / n"
    assert recipe.warmup_lr(2, 0, 5) is None
    with pytest.raises(ValueError, match="training.warmup_epochs"):
        TrainRecipe(epochs=4, batch_size=10, lr=0.4, warmup_epochs=5)
    train_split = digits[0].subset(50)  # 5 steps an epoch: an epoch's lr is that of its last step
    history = train(lenet(), train_split, None, recipe, seed=0, stage="warm", progress=False).history
    assert [r["lr"] for r in history] == pytest.approx([0.2, 0.4, 0.4, 0.04])
    mask = {name: torch.ones_like(w) for name, w in prunable_parameters(lenet()).items()}
    _, (stacked,) = train_tickets(lenet(), [mask], train_split, None, recipe, seed=0, stage="warm", progress=False)
    assert [r["lr"] for r in stacked.history] == pytest.approx([0.2, 0.4, 0.4, 0.04])

"""The ablation objectives that need more than logits, each against an independent computation on
an explicitly masked copy of the network: feature_mse, grad_mse, gradnorm."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cts_pipeline.core import cts
from cts_pipeline.core.cts import ConcreteMask, SearchConfig, batch_statistics, concrete_search
from cts_pipeline.core.data.splits import iterate_batches, load_splits
from cts_pipeline.core.device.runtime import UniformNoise
from cts_pipeline.core.nets.masks import global_topk_mask, prunable_parameters
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.train.recipe import TrainRecipe


@pytest.fixture(scope="module")
def batch():
    train, _ = load_splits("digits")
    return next(iterate_batches(train.subset(64), 64, shuffle=False))


def setup(density=0.3):
    model = build_model("convnet", image_shape=(1, 8, 8), num_classes=10, generator=torch.Generator().manual_seed(0),
                        width=4)
    for p in model.parameters():
        p.requires_grad_(False)
    relaxation = ConcreteMask(prunable_parameters(model), density)
    soft = relaxation.sample(UniformNoise("cpu", 0, "t"))
    return model, relaxation, soft


def masked_copy(model, relaxation, soft):
    """The network with its prunable weights replaced by θ ⊙ m̃ (plain tensors), train-mode BN without
    running statistics: the straightforward reference."""
    ref = copy.deepcopy(model)
    masked = relaxation.masked_weights(soft.detach())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in masked:
                p.copy_(masked[name])
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    return ref.train()


def outputs_of_prunable_layers(model, x):
    names = {n.rsplit(".", 1)[0] for n in prunable_parameters(model)}
    outs = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o.flatten(1))) for n, m in model.named_modules()
             if n in names]
    model(x)
    for h in hooks:
        h.remove()
    return outs


def standardise(t, dim=None):
    if dim is None:
        return (t - t.mean()) / (t.std() + 1e-9)
    return (t - t.mean(dim, keepdim=True)) / (t.std(dim, keepdim=True) + 1e-9)


def test_feature_mse_matches_hand_computation(batch):
    _matches_its_features(batch, cts.feature_mse, outputs_of_prunable_layers)  # three convolutions, the classifier


def _matches_its_features(batch, objective, features) -> None:
    """``objective`` against the mean MSE of per-sample standardised ``features`` of explicitly
    masked copies of the network (four of them on the convnet)."""
    x, y = batch
    model, relaxation, soft = setup()
    with batch_statistics(model):
        value = objective(model, relaxation, soft, x, y)
    dense_ref, sparse_ref = masked_copy(model, relaxation, torch.ones_like(soft)), masked_copy(model, relaxation, soft)
    with torch.no_grad():
        dense, sparse = features(dense_ref, x), features(sparse_ref, x)
    expected = torch.stack([F.mse_loss(standardise(s, 1), standardise(d, 1)) for s, d in zip(sparse, dense, strict=True)]).mean()
    assert len(dense) == 4
    torch.testing.assert_close(value.detach(), expected, rtol=1e-4, atol=1e-6)


def weight_grads(ref, soft_layers, x, y, params=None):
    """∂CE/∂θ = ∂CE/∂w̃ ⊙ m̃ for prunable weights, ∂CE/∂p for the others (when ``params`` asks)."""
    for p in ref.parameters():
        p.requires_grad_(True)
    loss = F.cross_entropy(ref(x), y)
    names = list(params or soft_layers)
    grads = torch.autograd.grad(loss, [dict(ref.named_parameters())[n] for n in names])
    return {n: g * soft_layers[n] if n in soft_layers else g for n, g in zip(names, grads, strict=True)}


def test_grad_mse_matches_hand_computation(batch):
    x, y = batch
    model, relaxation, soft = setup()
    with batch_statistics(model):
        value = cts.grad_mse(model, relaxation, soft, x, y)
    layers = {n: t for n, t in relaxation.masked_weights(soft.detach()).items()}
    soft_layers = {n: layers[n] / relaxation.masked_weights(torch.ones_like(soft))[n] for n in layers}
    sparse = weight_grads(masked_copy(model, relaxation, soft), soft_layers, x, y)
    dense = weight_grads(masked_copy(model, relaxation, torch.ones_like(soft)), {n: 1.0 for n in layers}, x, y)
    expected = torch.stack([F.mse_loss(standardise(sparse[n]), standardise(dense[n])) for n in layers]).mean()
    torch.testing.assert_close(value.detach(), expected, rtol=1e-3, atol=1e-6)


def test_gradient_norm_matches_hand_computation(batch):
    x, y = batch
    model, relaxation, soft = setup()
    with batch_statistics(model):
        value = cts.gradient_norm(model, relaxation, soft, x, y)
    layers = relaxation.masked_weights(soft.detach())
    ones = relaxation.masked_weights(torch.ones_like(soft))
    soft_layers = {n: layers[n] / ones[n] for n in layers}
    grads = weight_grads(masked_copy(model, relaxation, soft), soft_layers, x, y,
                         params=[n for n, _ in model.named_parameters()])
    expected = -torch.sqrt(sum((g * g).sum() for g in grads.values()))
    torch.testing.assert_close(value.detach(), expected, rtol=1e-4, atol=1e-6)
    assert not any(p.requires_grad for p in model.parameters()), "the frozen weights stay frozen"


@pytest.mark.parametrize("name", ["feature_mse", "grad_mse"])
def test_matching_objectives_vanish_when_nothing_is_masked(batch, name):
    x, y = batch
    model, relaxation, _ = setup()
    with torch.no_grad():
        relaxation.logits.fill_(30.0)
    soft = relaxation.sample(UniformNoise("cpu", 1, "t"))
    with batch_statistics(model):
        assert cts.OBJECTIVES[name].fn(model, relaxation, soft, x, y).item() < 1e-6


@pytest.mark.parametrize("name", ["feature_mse", "grad_mse", "gradnorm"])
def test_network_objectives_drive_a_search(batch, name):
    x, y = batch
    model, relaxation, soft = setup()
    with batch_statistics(model):
        loss = cts.OBJECTIVES[name].fn(model, relaxation, soft, x, y)
    (grad,) = torch.autograd.grad(loss, relaxation.logits)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0, "the gradient must reach the mask logits"
    train, _ = load_splits("digits")
    result = concrete_search(setup()[0], train.subset(128), density=0.2, config=SearchConfig(objective=name, epochs=1),
                             recipe=TrainRecipe(epochs=2, batch_size=64, lr=0.05), seed=0, progress=False)
    mask = global_topk_mask(result.scores, 0.2)
    assert sum(int(m.sum()) for m in mask.values()) == round(0.2 * relaxation.num_weights)


# --- feature_mse as the authors' code runs it (cts.feature_capture: activations) ------------------


def relu_outputs_and_softmax(model, x):
    """Every ReLU module's output (the convnet's are modules), then softmax(logits)."""
    outs = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o.flatten(1).clone()))
             for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    logits = model(x)
    for h in hooks:
        h.remove()
    return [*outs, torch.softmax(logits, dim=1)]


def test_activation_mse_matches_hand_computation(batch):
    _matches_its_features(batch, cts.activation_mse, relu_outputs_and_softmax)  # three ReLUs, softmax(logits)
    x, y = batch
    model, relaxation, soft = setup()
    with batch_statistics(model):
        authors = cts.activation_mse(model, relaxation, soft, x, y).item()
        assert authors != pytest.approx(cts.feature_mse(model, relaxation, soft, x, y).item(), rel=1e-3)


def test_activations_are_the_authors_captures_on_resnet20():
    """Their msefeature captures every block's ReLU modules and softmax(fc) (TLAB 68c9740,
    training/concrete_training.py:117-125): on ResNet-20 the stem's ReLU, two per residual block
    (the second after the addition), and the logits. Ours calls F.relu, which the capture sees."""
    from cts_pipeline.core.cts.objectives import _activations

    model = build_model("resnet20", image_shape=(3, 8, 8), num_classes=10, generator=torch.Generator().manual_seed(0))
    captured = _activations(lambda: model(torch.randn(4, 3, 8, 8)))
    assert len(captured) == 1 + 9 * 2 + 1
    assert all(t.shape[0] == 4 for t in captured) and all((t >= 0).all() for t in captured)
    assert torch.allclose(captured[-1].sum(1), torch.ones(4))


class MethodFormRelus(torch.nn.Module):
    """ReLUs written as tensor methods (``x.relu()``, ``x.relu_()``), as users' models do; with
    ``edit``, a ReLU output edited in place after it was applied (which only a forward without
    autograd, such as the search's teacher, can do: the ReLU's backward needs its output)."""

    def __init__(self, edit: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(64, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 10)
        self.edit = edit

    def forward(self, x):
        h = self.fc1(x.flatten(1)).relu()
        g = self.fc2(h).relu_()
        if self.edit:
            g.mul_(2.0)  # the capture must keep what the ReLU gave
        return self.fc3(g)


def test_activations_capture_method_form_relus_as_they_were_applied():
    from cts_pipeline.core.cts.objectives import _activations

    model = MethodFormRelus(edit=True)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # as the teacher runs
        captured = _activations(lambda: model(x))
    assert len(captured) == 2 + 1, "two ReLUs (method form) and the softmax"
    h = torch.relu(model.fc1(x.flatten(1)))
    assert torch.allclose(captured[0], h)
    assert torch.allclose(captured[1], torch.relu(model.fc2(h))), "as the ReLU gave it, before the in-place edit"


def test_activation_mse_on_method_form_relus_has_gradients(batch):
    x, y = batch
    model = MethodFormRelus()
    for p in model.parameters():
        p.requires_grad_(False)
    relaxation = ConcreteMask(prunable_parameters(model), 0.3)
    soft = relaxation.sample(UniformNoise("cpu", 0, "t"))
    loss = cts.activation_mse(model, relaxation, soft, x, y)
    (grad,) = torch.autograd.grad(loss, relaxation.logits)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_feature_capture_chooses_the_objective_and_the_lagrangian_rate(batch, monkeypatch):
    from cts_pipeline.config.identity import cts_method_name
    from cts_pipeline.core.cts import search

    assert SearchConfig(objective="feature_mse").resolved_objective.fn is cts.feature_mse
    authors = SearchConfig(objective="feature_mse", feature_capture="activations", balance="lagrangian", epochs=1)
    assert authors.resolved_objective.fn is cts.activation_mse and authors.effective_loss_scale == 100.0
    assert SearchConfig(objective="kl", feature_capture="activations").resolved_objective.fn is cts.reverse_kl
    with pytest.raises(ValueError, match=r"cts.feature_capture must be one of \('layer_outputs', 'activations'\)"):
        SearchConfig(feature_capture="relu")
    assert cts_method_name({"objective": "feature_mse", "feature_capture": "activations"}) == \
        "cts_feature_mse_activations"
    assert cts_method_name({"objective": "kl", "feature_capture": "activations"}) == "cts_kl"

    made = []
    real = search.make_balancer
    monkeypatch.setattr(search, "make_balancer", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    train, _ = load_splits("digits")
    model = setup()[0]
    result = concrete_search(model, train.subset(128), density=0.2, config=authors,
                             recipe=TrainRecipe(epochs=2, batch_size=64, lr=0.05), seed=0, progress=False)
    assert made[0].lr == pytest.approx(0.01 * 0.05 / 10)  # the authors' ÷ 10 on the Lagrangian's rate
    mask = global_topk_mask(result.scores, 0.2)
    assert sum(int(m.sum()) for m in mask.values()) == round(0.2 * sum(p.numel() for p in
                                                                       prunable_parameters(model).values()))

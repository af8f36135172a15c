"""The fast paths compute what the plain ones do: NHWC layout, the compile switch."""

from __future__ import annotations

import pytest
import torch

from cts_pipeline.core.data.splits import iterate_batches, load_splits
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.train import loop as training
from cts_pipeline.core.train.loop import train
from cts_pipeline.core.train.recipe import TrainRecipe


@pytest.fixture(scope="module")
def digits():
    train_split, test_split = load_splits("digits")
    return train_split.subset(256), test_split.subset(100)


def convnet():
    return build_model("convnet", image_shape=(1, 8, 8), num_classes=10, generator=torch.Generator().manual_seed(0),
                       width=4)


@pytest.mark.cross_path
@pytest.mark.parametrize("name,shape", [("convnet", (1, 8, 8)), ("resnet20", (3, 32, 32))])
def test_channels_last_gives_the_same_outputs(name, shape):
    net = build_model(name, image_shape=shape, num_classes=10, generator=torch.Generator().manual_seed(0)).eval()
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = net(x)
        net = net.to(memory_format=torch.channels_last)
        nhwc = net(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(nhwc, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.cross_path
def test_training_in_channels_last_matches_the_default_layout(digits):
    train_split, test_split = digits
    recipe = TrainRecipe(epochs=2, batch_size=32, lr=0.05)
    plain, nhwc = convnet(), convnet()
    a = train(plain, train_split, test_split, recipe, seed=0, stage="plain", progress=False)
    b = train(nhwc, train_split, test_split, recipe, seed=0, stage="nhwc", channels_last=True, progress=False)
    for (name, p), q in zip(plain.state_dict().items(), nhwc.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4, msg=name)
    assert b.final["test_accuracy"] == pytest.approx(a.final["test_accuracy"], abs=1.0)
    conv = nhwc.block1[0].weight
    assert conv.is_contiguous(), "the caller gets the usual layout back"


def test_compile_switch_wraps_the_forward_only(digits, monkeypatch):
    compiled = []

    def fake_compile(model, **kwargs):
        compiled.append(model)
        return model

    monkeypatch.setattr(training.torch, "compile", fake_compile)
    net = convnet()
    train(net, *digits, TrainRecipe(epochs=1, batch_size=64, lr=0.05), seed=0, stage="c", compile_model=True,
          progress=False)
    assert compiled == [net]
    compiled.clear()
    train(net, *digits, TrainRecipe(epochs=1, batch_size=64, lr=0.05), seed=0, stage="c", progress=False)
    assert compiled == []


def test_batches_are_normalised_on_the_split_device(digits):
    x, y = next(iterate_batches(digits[0], 64, shuffle=False))
    assert x.dtype == torch.float32 and x.device == digits[0].images.device and y.dtype == torch.int64


@pytest.mark.cross_path
def test_search_in_channels_last_learns_the_same_logits(digits):
    from cts_pipeline.core.cts import SearchConfig, concrete_search

    recipe = TrainRecipe(epochs=2, batch_size=64, lr=0.05)
    a = concrete_search(convnet(), digits[0], density=0.2, config=SearchConfig(epochs=2), recipe=recipe, seed=0,
                        progress=False)
    b = concrete_search(convnet(), digits[0], density=0.2, config=SearchConfig(epochs=2), recipe=recipe, seed=0,
                        channels_last=True, progress=False)
    for name, scores in a.scores.items():
        torch.testing.assert_close(b.scores[name], scores, rtol=1e-3, atol=1e-3, msg=name)

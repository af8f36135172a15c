"""Model registry: exact sizes, what is prunable, shapes, deterministic init and config errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cts_pipeline.core.nets.masks import count_prunable, prunable_parameters
from cts_pipeline.core.nets.registry import MODELS, build_model, check_model_fits, count_parameters

DIGITS, MNIST, CIFAR = (1, 8, 8), (1, 28, 28), (3, 32, 32)


def build(name: str, image_shape=CIFAR, seed: int = 0, **options) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    return build_model(name, image_shape=image_shape, num_classes=10, generator=generator,
                       **options)


def test_registry_lists_the_models():
    assert sorted(MODELS) == ["convnet", "lenet_300_100", "resnet18", "resnet20", "resnet50", "vgg16"]


# Published sizes (OpenLTH / the papers); a change here changes every sparsity in the results.
@pytest.mark.parametrize(
    ("name", "image_shape", "options", "total", "prunable"),
    [
        ("lenet_300_100", MNIST, {}, 266_610, 266_200),
        ("lenet_300_100", DIGITS, {}, 50_610, 50_200),
        ("convnet", DIGITS, {}, 56_554, 56_224),
        ("convnet", MNIST, {}, 56_554, 56_224),
        ("convnet", CIFAR, {}, 57_130, 56_800),
        ("resnet20", CIFAR, {}, 272_474, 270_896),
        ("resnet20", CIFAR, {"shortcut": "conv1x1"}, 272_474, 270_896),
        ("resnet20", CIFAR, {"shortcut": "conv3x3"}, 292_954, 291_376),
        ("resnet20", CIFAR, {"shortcut": "zeropad"}, 269_722, 268_336),
        ("vgg16", CIFAR, {}, 14_728_266, 14_710_464),
    ],
    ids=lambda v: ("x".join(map(str, v)) if isinstance(v, tuple)
                   else v.get("shortcut", "default") if isinstance(v, dict) else None),
)
def test_exact_sizes(name, image_shape, options, total, prunable):
    model = build(name, image_shape, **options)
    assert count_parameters(model) == total
    assert count_prunable(model) == prunable


def test_convnet_width_scales_channels():
    model = build("convnet", DIGITS, width=8)
    shapes = [tuple(p.shape) for p in prunable_parameters(model).values()]
    assert shapes == [(8, 1, 3, 3), (16, 8, 3, 3), (16, 16, 3, 3), (10, 16)]


def test_lenet_prunes_all_three_linear_weights():
    prunable = prunable_parameters(build("lenet_300_100", MNIST))
    assert {n: tuple(p.shape) for n, p in prunable.items()} == {
        "fc1.weight": (300, 784),
        "fc2.weight": (100, 300),
        "fc3.weight": (10, 100),
    }


def _modules_of(model: nn.Module, names) -> list[type]:
    modules = dict(model.named_modules())
    return [type(modules[n.removesuffix(".weight")]) for n in names]


def test_convnet_prunes_convs_and_fc_only():
    model = build("convnet", DIGITS)
    prunable = prunable_parameters(model)
    assert _modules_of(model, prunable) == [nn.Conv2d] * 3 + [nn.Linear]
    assert list(prunable)[-1] == "fc.weight"
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the search needs BN


@pytest.mark.parametrize(
    ("shortcut", "shortcut_kernel"), [("conv1x1", 1), ("conv3x3", 3), ("zeropad", None)]
)
def test_resnet20_prunes_every_conv_and_the_fc(shortcut, shortcut_kernel):
    model = build("resnet20", shortcut=shortcut)
    prunable = prunable_parameters(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert list(prunable) == [f"{n}.weight" for n in convs] + ["fc.weight"]
    assert list(prunable)[0] == "conv.weight"  # the first conv is pruned too
    assert len(convs) == 1 + 18 + (2 if shortcut_kernel else 0)
    shortcut_convs = [n for n in prunable if ".shortcut." in n]
    if shortcut_kernel is None:
        assert shortcut_convs == []
    else:
        assert shortcut_convs == ["blocks.3.shortcut.0.weight", "blocks.6.shortcut.0.weight"]
        assert {prunable[n].shape[-1] for n in shortcut_convs} == {shortcut_kernel}
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_vgg16_keeps_its_classifier_dense():
    model = build("vgg16")
    prunable = prunable_parameters(model)
    assert _modules_of(model, prunable) == [nn.Conv2d] * 13
    assert "classifier.weight" not in prunable
    assert model.classifier.weight.shape == (10, 512)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_nothing_but_conv_and_linear_weights_is_prunable(name):
    model = build(name, CIFAR)
    params = dict(model.named_parameters())
    for param_name, weight in prunable_parameters(model).items():
        assert param_name.endswith(".weight") and params[param_name] is weight
    bn_params = {f"{n}.{p}" for n, m in model.named_modules()
                 if isinstance(m, nn.BatchNorm2d) for p in ("weight", "bias")}
    assert not bn_params & set(prunable_parameters(model))
    assert not any(n.endswith(".bias") for n in prunable_parameters(model))


FITS = [
    ("lenet_300_100", {}, [DIGITS, MNIST, CIFAR]),
    ("convnet", {}, [DIGITS, MNIST, CIFAR]),
    ("resnet20", {}, [DIGITS, MNIST, CIFAR]),
    ("resnet20", {"shortcut": "zeropad"}, [DIGITS, MNIST, CIFAR]),
    ("resnet20", {"shortcut": "conv3x3"}, [DIGITS, MNIST, CIFAR]),
    ("vgg16", {}, [CIFAR]),
]


@pytest.mark.parametrize(
    ("name", "options", "image_shape"),
    [(n, o, s) for n, o, shapes in FITS for s in shapes],
    ids=[f"{n}-{o.get('shortcut', 'default')}-{'x'.join(map(str, s))}"
         for n, o, shapes in FITS for s in shapes],
)
def test_forward_shape_where_it_fits(name, options, image_shape):
    check_model_fits(name, image_shape=image_shape, num_classes=10, **options)
    model = build(name, image_shape, **options)
    with torch.no_grad():
        assert model(torch.randn(2, *image_shape)).shape == (2, 10)


@pytest.mark.parametrize("image_shape", [DIGITS, MNIST])
def test_vgg16_refuses_small_inputs_clearly(image_shape):
    with pytest.raises(ValueError, match=r"model 'vgg16' \(model.name\) cannot take inputs of "
                       rf"shape \({image_shape[0]}, {image_shape[1]}, {image_shape[2]}\) from "
                       r"this dataset: .*too small"):
        check_model_fits("vgg16", image_shape=image_shape, num_classes=10)


def test_check_model_fits_refuses_wrong_output_and_tiny_inputs():
    with pytest.raises(ValueError, match="cannot take inputs of shape"):
        check_model_fits("vgg16", image_shape=(3, 64, 64), num_classes=10)  # classifier mismatch
    with pytest.raises(ValueError, match="cannot take inputs of shape"):
        check_model_fits("convnet", image_shape=(1, 1, 1), num_classes=10)


IMAGENET, TINY_IMAGENET = (3, 224, 224), (3, 64, 64)


# torchvision's published sizes for 1000 classes; Tiny-ImageNet's 200 classes shrink the classifier.
@pytest.mark.parametrize(("name", "image_shape", "classes", "total", "prunable"), [
    ("resnet18", IMAGENET, 1000, 11_689_512, 11_678_912),
    ("resnet50", IMAGENET, 1000, 25_557_032, 25_502_912),
    ("resnet18", TINY_IMAGENET, 200, 11_279_112, 11_269_312),
])
def test_imagenet_resnet_sizes(name, image_shape, classes, total, prunable):
    model = build_model(name, image_shape=image_shape, num_classes=classes, generator=torch.Generator().manual_seed(0))
    assert count_parameters(model) == total
    assert count_prunable(model) == prunable
    convs_and_fc = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(prunable_parameters(model)) == convs_and_fc, "every conv, the shortcuts' too, and the classifier"


def test_imagenet_resnets_are_seeded_and_take_any_channels():
    a = build_model("resnet18", image_shape=(1, 64, 64), num_classes=10, generator=torch.Generator().manual_seed(3))
    b = build_model("resnet18", image_shape=(1, 64, 64), num_classes=10, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert a.eval()(torch.zeros(2, 1, 64, 64)).shape == (2, 10)
    check_model_fits("resnet50", image_shape=IMAGENET, num_classes=1000)


def test_check_model_fits_draws_no_weights():
    # The check runs uninitialised storage: no random draw.
    before = torch.get_rng_state()
    check_model_fits("vgg16", image_shape=CIFAR, num_classes=100)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(("name", "options"), [("resnet20", {"shortcut": "zeropad"}),
                                               ("convnet", {}), ("lenet_300_100", {})])
def test_same_seed_same_weights_different_seed_different_weights(name, options):
    a = build(name, seed=1, **options).state_dict()
    b = build(name, seed=1, **options).state_dict()
    c = build(name, seed=2, **options).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    weights = [k for k in a if k.endswith("weight") and a[k].dim() > 1]
    assert weights and all(not torch.equal(a[k], c[k]) for k in weights)


def test_build_model_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    build("resnet20")
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("name", ["resnet20", "convnet", "lenet_300_100"])
def test_biases_zero_and_batchnorm_identity(name):
    model = build(name, DIGITS, seed=3)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            assert torch.count_nonzero(module.bias) == 0
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
            assert torch.all(module.running_mean == 0) and torch.all(module.running_var == 1)
            assert module.num_batches_tracked == 0


def test_vgg16_conv_biases_zero():
    model = build("vgg16")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.bias is not None and torch.count_nonzero(m.bias) == 0 for m in convs)
    assert torch.count_nonzero(model.classifier.bias) == 0


def test_kaiming_scale():
    model = build("lenet_300_100", MNIST)
    std = model.fc1.weight.std().item()  # 235,200 draws: sampling error well under 1 %
    assert std == pytest.approx(math.sqrt(2 / 784), rel=0.05)
    conv = build("resnet20").blocks[8].conv2.weight  # fan-in 64 * 9
    assert conv.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)
    assert abs(model.fc1.weight.mean().item()) < 0.01 * std


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'foo' \(model.name\); known: convnet, "
                                         r"lenet_300_100, resnet18, resnet20, resnet50, vgg16"):
        build_model("foo", image_shape=CIFAR, num_classes=10)
    with pytest.raises(ValueError, match="model.name"):
        check_model_fits("foo", image_shape=CIFAR, num_classes=10)


def test_unknown_option_names_option_and_model():
    with pytest.raises(ValueError, match="model option 'shortcut' is not accepted by "
                                         "lenet_300_100; it accepts: none"):
        build_model("lenet_300_100", image_shape=MNIST, num_classes=10, shortcut="zeropad")
    with pytest.raises(ValueError, match="'depth' is not accepted by resnet20; it accepts: "
                                         "shortcut, width"):
        check_model_fits("resnet20", image_shape=CIFAR, num_classes=10, depth=56)


def test_bad_shortcut_names_the_parameter_and_the_choices():
    with pytest.raises(ValueError, match=r"model\.shortcut .*conv1x1, conv3x3, zeropad.*'option_b'"):
        build_model("resnet20", image_shape=CIFAR, num_classes=10, shortcut="option_b")


@pytest.mark.parametrize("width", [0, -1, 2.5, True])
def test_bad_width(width):
    with pytest.raises(ValueError, match="model.width"):
        check_model_fits("convnet", image_shape=DIGITS, num_classes=10, width=width)


@pytest.mark.parametrize(("image_shape", "num_classes"), [((28, 28), 10), ((1, 0, 8), 10),
                                                          (DIGITS, 0)])
def test_bad_shape_or_class_count(image_shape, num_classes):
    with pytest.raises(ValueError, match="image_shape|num_classes"):
        check_model_fits("convnet", image_shape=image_shape, num_classes=num_classes)

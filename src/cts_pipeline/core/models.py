"""The networks the search prunes, and one registry to build them by name.

Adding a model is one factory function (keyword-only ``image_shape``, ``num_classes`` and its own
options) and one line in :data:`MODELS`. The factory's keyword options are what ``model.*`` in the
config may set; anything else is refused by name, so a typo cannot silently fall back to a default.

Initialisation is ours, not PyTorch's: every weight is drawn from the caller's generator, so one
seed gives bit-identical weights on any machine, and nothing touches the global RNG (models are
built on the meta device and only then given real storage).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

ImageShape = tuple[int, int, int]


class LeNet300100(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998): a fully connected 784-300-100-10 network, with biases.

    On MNIST (1, 28, 28) with 10 classes: 266,610 parameters, 266,200 prunable (the three weights).
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _conv_bn_relu(in_channels: int, out_channels: int, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ConvNet(nn.Module):
    """Three 3x3 conv-BN-ReLU blocks (widths w, 2w, 2w), a 2x2 max-pool after the second, global
    average pool and a linear classifier.

    Small enough to train in seconds on CPU, and the global pool lets the same network take 8x8
    digits and 28x28 MNIST. With w = 32 and 10 classes: 56,554 parameters (56,224 prunable) on one
    input channel, 57,130 (56,800 prunable) on three.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.block1 = _conv_bn_relu(in_channels, width)
        self.block2 = _conv_bn_relu(width, 2 * width)
        self.pool = nn.MaxPool2d(2)
        self.block3 = _conv_bn_relu(2 * width, 2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.pool(self.block2(self.block1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


RESNET_SHORTCUTS = ("conv1x1", "conv3x3", "zeropad")


class _ZeroPadShortcut(nn.Module):
    """He et al.'s option A: subsample, then append zero channels. Has no parameters to prune."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "zeropad":
            self.shortcut = _ZeroPadShortcut(stride, out_channels - in_channels)
        else:
            kernel = 1 if shortcut == "conv1x1" else 3
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2,
                          bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016) in OpenLTH's layout: stages of 3 blocks, widths w, 2w, 4w.

    On (3, 32, 32) with w = 16 and 10 classes, by shortcut:
    conv1x1 272,474 parameters (270,896 prunable), conv3x3 292,954 (291,376),
    zeropad 269,722 (268,336). Every convolution and the final linear layer are prunable.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16,
                 shortcut: str = "conv1x1") -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks, channels = [], width
        for stage, stage_width in enumerate((width, 2 * width, 4 * width)):
            for i in range(3):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(_BasicBlock(channels, stage_width, stride, shortcut))
                channels = stage_width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


VGG16_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class VGG16(nn.Module):
    """VGG-16 for CIFAR (OpenLTH): 13 conv-BN-ReLU layers (convs with bias), 4 max-pools, a final
    2x2 average pool and one linear classifier, which stays dense (``keep_dense``) as in OpenLTH.
    ``conv_bias=False`` drops the convolutions' biases, as the authors' ``models/vgg.py`` does
    (BatchNorm's shift makes them redundant; 4,224 parameters fewer, the same prunable count).

    Needs 32x32 inputs: smaller ones collapse to nothing before the classifier. On (3, 32, 32) with
    10 classes: 14,728,266 parameters, 14,710,464 prunable (the 13 conv weights).
    """

    keep_dense = ("classifier",)

    def __init__(self, in_channels: int, num_classes: int, conv_bias: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG16_PLAN:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.extend(_conv_bn_relu(channels, item, bias=conv_bias))
                channels = item
        layers.append(nn.AvgPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


# --- factories: the registry's entries; their keyword options are the model's config options ---


def _positive_int(option: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be a positive integer, got {value!r}")
    return value


def _bool(option: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{option} must be true or false, got {value!r}")
    return value


def lenet_300_100(*, image_shape: ImageShape, num_classes: int) -> nn.Module:
    channels, height, width = image_shape
    return LeNet300100(channels * height * width, num_classes)


def convnet(*, image_shape: ImageShape, num_classes: int, width: int = 32) -> nn.Module:
    return ConvNet(image_shape[0], num_classes, _positive_int("model.width", width))


def resnet20(*, image_shape: ImageShape, num_classes: int, width: int = 16,
             shortcut: str = "conv1x1") -> nn.Module:
    if shortcut not in RESNET_SHORTCUTS:
        raise ValueError(
            f"model.shortcut must be one of {', '.join(RESNET_SHORTCUTS)}; got {shortcut!r}"
        )
    return ResNet20(image_shape[0], num_classes, _positive_int("model.width", width), shortcut)


def vgg16(*, image_shape: ImageShape, num_classes: int, conv_bias: bool = True) -> nn.Module:
    return VGG16(image_shape[0], num_classes, _bool("model.options.conv_bias", conv_bias))


def _imagenet_resnet(depth: int, image_shape: ImageShape, num_classes: int) -> nn.Module:
    """torchvision's ImageNet ResNet (7x7 stem, max-pool, four stages, global pool, linear), with
    its first convolution taking ``image_shape``'s channels. torchvision's own initialisation is
    replaced by :func:`_initialise` (the model is built on the meta device)."""
    from torchvision.models import resnet18 as tv_resnet18  # ~1.5 s import: only when asked for
    from torchvision.models import resnet50 as tv_resnet50

    model = {18: tv_resnet18, 50: tv_resnet50}[depth](weights=None, num_classes=num_classes)
    if image_shape[0] != 3:
        model.conv1 = nn.Conv2d(image_shape[0], 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def resnet18(*, image_shape: ImageShape, num_classes: int) -> nn.Module:
    """ResNet-18 for ImageNet-sized inputs (224x224; Tiny-ImageNet's 64x64 works too): on 3x224x224
    with 1000 classes, 11,689,512 parameters, 11,678,912 prunable (every conv and the linear layer)."""
    return _imagenet_resnet(18, image_shape, num_classes)


def resnet50(*, image_shape: ImageShape, num_classes: int) -> nn.Module:
    """ResNet-50 (bottleneck blocks) for ImageNet-sized inputs: on 3x224x224 with 1000 classes,
    25,557,032 parameters, 25,502,912 prunable."""
    return _imagenet_resnet(50, image_shape, num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet_300_100": lenet_300_100,
    "convnet": convnet,
    "resnet20": resnet20,
    "vgg16": vgg16,
    "resnet18": resnet18,
    "resnet50": resnet50,
}


# BatchNorm options every model with BatchNorm accepts, besides its factory's own. Their defaults
# are PyTorch's and OpenLTH's; the authors' code (TLAB ``models/resnet.py``, ``models/vgg.py``)
# builds BatchNorm with ``track_running_stats=False`` and draws γ from U(0, 1).
BN_OPTIONS = {"bn_running_stats": True, "bn_weight_init": "ones"}
BN_WEIGHT_INITS = ("ones", "uniform")


def _norm_options(options: dict) -> tuple[dict, dict]:
    """``options`` split into the factory's own and the BatchNorm options (defaults filled in)."""
    norm = {k: options[k] for k in BN_OPTIONS if k in options}
    _bool("model.options.bn_running_stats", norm.get("bn_running_stats", True))
    if norm.get("bn_weight_init", "ones") not in BN_WEIGHT_INITS:
        raise ValueError(f"model.options.bn_weight_init must be one of {', '.join(BN_WEIGHT_INITS)}, "
                         f"got {norm['bn_weight_init']!r}")
    return {k: v for k, v in options.items() if k not in BN_OPTIONS}, {**BN_OPTIONS, **norm}


def _without_running_stats(model: nn.Module) -> None:
    """Every BatchNorm normalises with the batch's statistics, in training and in evaluation alike
    (``track_running_stats=False``): no running statistics exist to be used or updated."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
            module.running_mean = module.running_var = module.num_batches_tracked = None


@contextmanager
def neutral_statistics(model: nn.Module) -> Iterator[None]:
    """Within the block, BatchNorm layers built without running statistics have neutral ones
    (mean 0, variance 1), so in evaluation mode every BatchNorm is a fixed affine map, as the
    structural methods (SynFlow, the connectivity check) need: on their all-ones input, batch
    statistics would see no variance and cut every path. Layers with running statistics keep them."""
    bare = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None]
    for m in bare:
        like = m.weight if m.weight is not None else torch.empty(0)
        m.running_mean = torch.zeros(m.num_features, dtype=like.dtype, device=like.device)
        m.running_var = torch.ones(m.num_features, dtype=like.dtype, device=like.device)
    try:
        yield
    finally:
        for m in bare:
            m.running_mean = m.running_var = None


def _construct(
    name: str, image_shape: ImageShape, num_classes: int, options: dict
) -> tuple[nn.Module, ImageShape, dict]:
    """Validate everything the config controls, then run the factory (on whatever device is set).
    Returns the model, the image shape and the BatchNorm options."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (model.name); known: {', '.join(sorted(MODELS))}")
    factory = MODELS[name]
    options, norm = _norm_options(options)
    accepted = sorted(
        p.name for p in inspect.signature(factory).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name not in ("image_shape", "num_classes")
    )
    for option in sorted(options):
        if option not in accepted:
            raise ValueError(
                f"model option {option!r} is not accepted by {name}; "
                f"it accepts: {', '.join(accepted) or 'none'}"
                + (f" (and {', '.join(BN_OPTIONS)}, as every model with BatchNorm)" if option.startswith("bn") else "")
            )
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                  for s in shape):
        raise ValueError(f"image_shape must be three positive integers (C, H, W), got {image_shape!r}")
    _positive_int("num_classes", num_classes)
    model = factory(image_shape=shape, num_classes=num_classes, **options)
    has_norms = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for option, default in BN_OPTIONS.items():
        if norm[option] != default and not has_norms:
            raise ValueError(f"model option {option!r} needs BatchNorm layers, and {name} has none")
    if not norm["bn_running_stats"]:
        _without_running_stats(model)
    return model, shape, norm


@torch.no_grad()
def _initialise(model: nn.Module, generator: torch.Generator | None, bn_weight_init: str = "ones") -> None:
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            if bn_weight_init == "uniform":  # the authors' bn_init: γ ~ U(0, 1)
                nn.init.uniform_(module.weight, 0.0, 1.0, generator=generator)
            else:
                nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            module.reset_running_stats()
        elif list(module.parameters(recurse=False)) or list(module.buffers(recurse=False)):
            # After to_empty() its storage is garbage: refuse rather than train on it.
            raise TypeError(f"no initialisation for {module_name} ({type(module).__name__}); "
                            "add one to models._initialise")


def build_model(name: str, *, image_shape: ImageShape, num_classes: int,
                generator: torch.Generator | None = None, **options) -> nn.Module:
    """Build model ``name`` on the CPU with weights drawn from ``generator``.

    Kaiming-normal (fan-in, ReLU gain) for every conv and linear weight, zero biases, BatchNorm at
    the identity (γ ~ U(0, 1) with ``bn_weight_init: uniform``). The same generator state gives
    bit-identical weights; the global RNG is used only when ``generator`` is None.

    Every model with BatchNorm also takes ``bn_running_stats`` (default true; false: batch
    statistics in evaluation too, so the evaluation batch size is part of the recipe) and
    ``bn_weight_init`` (``ones`` or ``uniform``).
    """
    with torch.device("meta"):
        model, _, norm = _construct(name, image_shape, num_classes, options)
    model = model.to_empty(device="cpu")
    _initialise(model, generator, norm["bn_weight_init"])
    return model


def skeleton(name: str, *, image_shape: ImageShape, num_classes: int, **options) -> nn.Module:
    """Model ``name`` on the meta device: every shape, no storage, no initialisation (for counts)."""
    with torch.device("meta"):
        return _construct(name, image_shape, num_classes, options)[0]


def check_model_fits(name: str, *, image_shape: ImageShape, num_classes: int, **options) -> None:
    """Fail early, with a readable reason, when model ``name`` cannot take this dataset's images.

    Runs one forward pass of two blank images through the model's uninitialised weights, in eval
    mode. (A forward on the meta device computes shapes only, but its first BatchNorm goes through
    torch's Python decompositions and imports torch._dynamo: 1.5 s at every run start.)
    """
    with torch.device("meta"):
        model, shape, _ = _construct(name, image_shape, num_classes, options)
    model = model.to_empty(device="cpu").eval()
    # Remember the last module entered, so the reason can name the layer where shapes broke.
    # (The model is thrown away afterwards, so the hooks need no removing.)
    entered: list[str] = []
    for module_name, module in model.named_modules():
        if module_name:
            module.register_forward_pre_hook(
                lambda m, _x, n=module_name: entered.append(f"{n}, {type(m).__name__}")
            )
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *shape))
    except Exception as error:
        at = f" (at {entered[-1]})" if entered else ""
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"model {name!r} (model.name) cannot take inputs of shape {shape} "
                         f"from this dataset: {reason}{at}") from error
    if tuple(out.shape) != (2, num_classes):
        raise ValueError(f"model {name!r} (model.name) cannot take inputs of shape {shape} from "
                         f"this dataset: output has shape {tuple(out.shape)}, "
                         f"expected (2, {num_classes})")


def count_parameters(model: nn.Module) -> int:
    """All trainable parameters (weights, biases, BatchNorm affine), for the model-size table."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

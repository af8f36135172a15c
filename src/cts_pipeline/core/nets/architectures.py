"""The architectures the search prunes: LeNet-300-100, the digits convnet, ResNet-20 and VGG-16 for
CIFAR, and torchvision's ResNet-18 / ResNet-50 for ImageNet-sized inputs. Each has a factory
function (keyword-only ``image_shape``, ``num_classes`` and its own options) that
:mod:`.registry` registers by name, validates and initialises.
"""

from __future__ import annotations

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


def positive_int_option(option: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be a positive integer, got {value!r}")
    return value


def bool_option(option: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{option} must be true or false, got {value!r}")
    return value


def lenet_300_100(*, image_shape: ImageShape, num_classes: int) -> nn.Module:
    channels, height, width = image_shape
    return LeNet300100(channels * height * width, num_classes)


def convnet(*, image_shape: ImageShape, num_classes: int, width: int = 32) -> nn.Module:
    return ConvNet(image_shape[0], num_classes, positive_int_option("model.width", width))


def resnet20(*, image_shape: ImageShape, num_classes: int, width: int = 16,
             shortcut: str = "conv1x1") -> nn.Module:
    if shortcut not in RESNET_SHORTCUTS:
        raise ValueError(
            f"model.shortcut must be one of {', '.join(RESNET_SHORTCUTS)}; got {shortcut!r}"
        )
    return ResNet20(image_shape[0], num_classes, positive_int_option("model.width", width), shortcut)


def vgg16(*, image_shape: ImageShape, num_classes: int, conv_bias: bool = True) -> nn.Module:
    return VGG16(image_shape[0], num_classes, bool_option("model.options.conv_bias", conv_bias))


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

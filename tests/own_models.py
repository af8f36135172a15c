"""Networks the project has never seen, for the tests of ``model.name: "<module>:<callable>"``:
factories as a researcher writes them, with their own initialisation."""

from __future__ import annotations

import math

from torch import nn


def tiny_mlp(num_classes: int, image_shape: tuple[int, int, int], hidden: int = 32) -> nn.Module:
    """An MLP over the flattened image; takes the class count and the image shape."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(image_shape), hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def small_cnn(num_classes: int = 10, width: int = 8) -> nn.Module:
    """A convnet with BatchNorm for 1-channel 8×8 images; does not take the image shape."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def not_a_module(num_classes: int) -> dict:
    return {"classes": num_classes}


def three_outputs() -> nn.Module:
    """Ignores the class count: 3 outputs whatever the data has."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


def broken(num_classes: int) -> nn.Module:
    raise RuntimeError("this factory needs a file that is not there")

"""Networks the project has never seen, for the tests of ``model.name: "<module>:<callable>"``:
factories as a researcher writes them, with their own initialisation."""

from __future__ import annotations

import math

import torch
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


class _TinyTransformer(nn.Module):
    """Each image row is a token: a linear embedding, one self-attention block with a residual and
    LayerNorm, a mean over tokens and a linear head. Its attention's ``in_proj_weight`` is not any
    module's ``weight``: ``model.prunable`` has to name it."""

    def __init__(self, num_classes: int, image_shape: tuple[int, int, int], width: int, heads: int) -> None:
        super().__init__()
        channels, rows, columns = image_shape
        self.embed = nn.Linear(channels * columns, width)
        self.position = nn.Parameter(torch.zeros(rows, width))
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        tokens = self.embed(x.permute(0, 2, 1, 3).flatten(2)) + self.position
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.head(self.norm(tokens + attended).mean(dim=1))


def tiny_transformer(num_classes: int, image_shape: tuple[int, int, int], width: int = 16, heads: int = 2) -> nn.Module:
    return _TinyTransformer(num_classes, image_shape, width, heads)


def tabular_mlp(num_classes: int, image_shape: tuple[int], width: int = 32) -> nn.Module:
    """An MLP over a table's feature columns (``image_shape`` is ``(features,)``)."""
    return nn.Sequential(nn.Linear(image_shape[0], width), nn.ReLU(), nn.Linear(width, num_classes))

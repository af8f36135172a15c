"""Optional: the real MNIST files of ../shared/data load as torchvision lays them out."""

from __future__ import annotations

import pytest

from cts_pipeline.core.data.splits import load_splits

from ..conftest import SHARED_MNIST

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED_MNIST / "MNIST" / "raw").is_dir(), reason="no ../shared/data/MNIST/raw"),
]


def test_real_mnist_loads():
    train, test = load_splits("mnist", SHARED_MNIST)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.labels.bincount().tolist()[:3] == [5923, 6742, 5958]
    assert abs(train.images.float().div(255).mean().item() - 0.1307) < 1e-3

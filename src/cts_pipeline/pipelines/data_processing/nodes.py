"""Prepare the dataset: raw files (or scikit-learn's bundled digits) -> compact uint8 tensors."""

from __future__ import annotations

import logging

from ...config.sections import DataConfig
from ...core.data.splits import load_splits, raw_files_digest
from ..common import split_to_payload

logger = logging.getLogger(__name__)


def prepare_data(data: DataConfig) -> tuple[dict, dict]:
    """Train and test splits as ``{"dataset", "images" (uint8 NCHW), "labels"}``.

    Normalisation and augmentation happen per batch on the training device, so what is stored is
    the raw pixels: four times smaller than floats and exactly what torchvision would crop.
    """
    train, test = load_splits(data.name, data.root, data.download)
    if data.train_subset is not None:
        train = train.subset(data.train_subset)
    if data.test_subset is not None:
        test = test.subset(data.test_subset)
    logger.info("%s: %d training and %d test images of shape %s, %d classes",
                data.name, len(train), len(test), train.info.image_shape, train.info.num_classes)
    # What the splits were built from, so a rerun over other raw files is noticed (hooks.FreshnessHook).
    raw = {"raw_digest": raw_files_digest(data.name, data.root)}
    if data.mean is not None or data.std is not None:  # the recipe's own normalisation (data.mean, data.std)
        raw["normalization"] = {"mean": list(data.mean or train.info.mean), "std": list(data.std or train.info.std)}
    if data.resized_crop != "torchvision":  # the training crop of streamed images (data.resized_crop)
        raw["resized_crop"] = data.resized_crop
    return {**split_to_payload(train), **raw}, {**split_to_payload(test), **raw}

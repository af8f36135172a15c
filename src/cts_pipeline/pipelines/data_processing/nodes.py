"""Prepare the dataset: raw files (or scikit-learn's bundled digits), someone's image folder or
their Kedro catalog entries -> compact tensors and what the model needs to know of them."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch

from ...config.sections import DataConfig
from ...core.data import tables, user_folders
from ...core.data.splits import Split, load_splits, raw_files_digest
from ..common import split_to_payload

logger = logging.getLogger(__name__)


def prepare_data(data: DataConfig) -> tuple[dict, dict]:
    """Train and test splits as ``{"dataset", "images" (uint8 NCHW), "labels"}``.

    Normalisation and augmentation happen per batch on the training device, so what is stored is
    the raw pixels: four times smaller than floats and exactly what torchvision would crop.
    """
    if data.name == user_folders.NAME:
        return _prepare_folder(data)
    train, test = load_splits(data.name, data.root, data.download)
    train, test = _subsets(data, train, test)
    # What the splits were built from, so a rerun over other raw files is noticed (hooks.FreshnessHook).
    raw = {"raw_digest": raw_files_digest(data.name, data.root)}
    if data.mean is not None or data.std is not None:  # the recipe's own normalisation (data.mean, data.std)
        raw["normalization"] = {"mean": list(data.mean or train.info.mean), "std": list(data.std or train.info.std)}
    if data.resized_crop != "torchvision":  # the training crop of streamed images (data.resized_crop)
        raw["resized_crop"] = data.resized_crop
    return {**split_to_payload(train), **raw}, {**split_to_payload(test), **raw}


def prepare_catalog_data(data: DataConfig, train: Any, test: Any) -> tuple[dict, dict]:
    """Train and test splits of what the catalog entries ``data.train`` and ``data.test`` loaded:
    float32 inputs as they are, labels as class numbers, and the data's shape and class count."""
    (train_x, train_y), (test_x, test_y), info, classes = tables.load(train, test, data.label_column,
                                                                       (data.train, data.test))
    found = {"raw_digest": tables.contents_digest(train, test), "classes": [str(c) for c in classes]}
    return _own_payloads(data, Split(train_x, train_y, info), Split(test_x, test_y, info), found)


def _prepare_folder(data: DataConfig) -> tuple[dict, dict]:
    scan = user_folders.scan(data.root, data.image_size)
    if user_folders.streams(scan):
        info = user_folders.streamed_info(scan)
        logger.info("%s: %.1f GiB of pixels decoded, more than the %d GiB held in memory: streamed from its files",
                    scan.root, scan.pixel_bytes / 2**30, user_folders.IN_MEMORY_BYTES >> 30)
    else:
        (train_x, train_y), (test_x, test_y), info = user_folders.load(scan)
    if data.mean is not None or data.std is not None:  # the recipe's own normalisation
        channels = info.image_shape[0]
        for key in ("mean", "std"):
            value = getattr(data, key)
            if value is not None and len(value) != channels:
                raise ValueError(f"data.{key} must be null or {channels} numbers (one per channel of the images under "
                                 f"{data.root}), got {list(value)!r}")
        info = dataclasses.replace(info, mean=tuple(data.mean or info.mean), std=tuple(data.std or info.std))
    found = {"raw_digest": user_folders.folder_digest(scan.root), "classes": list(scan.classes),
             "test_folder": scan.test_folder}
    if info.streamed:
        train, test = (user_folders.open_streamed(info, scan.root, split) for split in ("train", "test"))
    else:
        train, test = Split(train_x, train_y, info), Split(test_x, test_y, info)
    return _own_payloads(data, train, test, found)


def _own_payloads(data: DataConfig, train: Split, test: Split, found: dict) -> tuple[dict, dict]:
    """Payloads of data the project has never seen: the split, and what was found of it (its
    :class:`~cts_pipeline.core.data.registry.DatasetInfo`, classes, digest)."""
    train, test = _subsets(data, train, test, evenly=True)
    described = {"info": dataclasses.asdict(train.info), **found}
    return {**split_to_payload(train), **described}, {**split_to_payload(test), **described}


def _subsets(data: DataConfig, train, test, *, evenly: bool = False):
    """``data.train_subset`` / ``test_subset``: the first N samples; ``evenly``, N evenly spaced
    samples (someone's folder or table may be sorted by class: the first N would miss classes)."""
    def cut(split, n):
        if n is None or n >= len(split):
            return split
        if not evenly or split.streamed:  # a streamed split's subset is evenly spaced already
            return split.subset(n)
        picked = torch.arange(n) * len(split) // n
        return dataclasses.replace(split, images=split.images[picked], labels=split.labels[picked])

    train, test = cut(train, data.train_subset), cut(test, data.test_subset)
    info = train.info
    logger.info("%s: %d training and %d test samples of shape %s, %d classes",
                data.name, len(train), len(test), info.image_shape, info.num_classes)
    return train, test


def current_raw_digest(data: DataConfig, load: Callable[[str], Any]) -> str | None:
    """The digest of what the data would be prepared from now (``load``: a catalog entry's data),
    for comparison with the one the prepared data record (``hooks.FreshnessHook``)."""
    if data.name == tables.NAME:
        return tables.contents_digest(load(data.train), load(data.test))
    if data.name == user_folders.NAME:
        return user_folders.folder_digest(data.root)
    return raw_files_digest(data.name, data.root)

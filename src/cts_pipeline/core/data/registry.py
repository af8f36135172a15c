"""Which datasets this project knows, what a model and the normaliser need to know about each
(:class:`DatasetInfo`), and the errors that mean "the data cannot be used". Both readers import
it: ``data`` (whole splits in memory) and ``image_folders`` (streamed JPEG folders)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and the normaliser need to know about a dataset, without loading it."""

    name: str
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale (pixel / max_value)
    std: tuple[float, ...]
    max_value: float  # 255.0 for uint8 image datasets, 16.0 for digits
    source: str  # "scikit-learn", "torchvision" (held in memory) or "image-folder" (streamed)
    # The inputs are already what the model takes (find_ticket's tensors, of any shape): batches are
    # handed over as float32, without scaling or normalisation.
    inputs_ready: bool = False

    @property
    def streamed(self) -> bool:
        return self.source == "image-folder"


DATASETS: dict[str, DatasetInfo] = {
    # Statistics of the fixed 1437-image train split (data._load_digits; pixel / 16, all pixels, population std).
    "digits": DatasetInfo("digits", (1, 8, 8), 10, (0.3054,), (0.3761,), 16.0, "scikit-learn"),
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, (0.1307,), (0.3081,), 255.0, "torchvision"),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", (1, 28, 28), 10, (0.2860,), (0.3530,), 255.0, "torchvision"
    ),
    # Per-pixel statistics of the CIFAR training sets. The widely copied CIFAR-10 std
    # (0.2023, 0.1994, 0.2010) is the std of per-image means, not of pixels, and under-scales inputs.
    "cifar10": DatasetInfo(
        "cifar10",
        (3, 32, 32),
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        255.0,
        "torchvision",
    ),
    "cifar100": DatasetInfo(
        "cifar100",
        (3, 32, 32),
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        255.0,
        "torchvision",
    ),
    # Read from JPEG folders batch by batch (core/data/image_folders.py): ImageNet's statistics, which
    # the folders' transforms apply themselves; max_value is the JPEGs' 8 bits.
    "tiny_imagenet": DatasetInfo(
        "tiny_imagenet", (3, 64, 64), 200, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 255.0, "image-folder"
    ),
    "imagenet": DatasetInfo(
        "imagenet", (3, 224, 224), 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 255.0, "image-folder"
    ),
}


# Data this project has never seen, found rather than registered: what ``data.name`` says to read.
OWN_DATA = {
    "image_folder": "a folder of class folders of images under data.root (core/data/user_folders.py)",
    "catalog": "Kedro catalog entries data.train and data.test: tables or dicts of tensors (core/data/tables.py)",
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not under ``data.root`` and ``data.download`` is off (or failed)."""


class DataFileError(ValueError):
    """A dataset's files are there but cannot be used as they are: malformed, poisoned, labels out
    of range, an empty folder. Found before any compute, so the CLI reports it as a problem with
    the run's input (exit 2), not as a failed node."""


def get_dataset_info(name: str) -> DatasetInfo:
    """Look up a dataset by its ``data.name``."""
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(sorted(DATASETS))
        raise ValueError(f"unknown dataset {name!r} (data.name); known: {known}") from None

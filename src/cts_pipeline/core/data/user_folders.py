"""Someone's own image folder (``data.name: image_folder``): ``data.root/train/<class>/*`` and
``data.root/val/<class>/*`` (or ``test/``), images of any size and any format PIL reads.

What the built-in datasets register is found here instead: the classes (the training folder's
class folders, sorted, as torchvision's ``ImageFolder`` numbers them), the image size
(``data.image_size``, or the most common size among the training images), the channels (one where
every image is greyscale, else three) and the per-channel normalisation statistics (of the
training images, on the [0, 1] scale, population std). Images are decoded once, resized where
their size differs (bilinear, antialiased) and held as uint8 tensors like CIFAR's, so augmentation
and batching are the in-memory datasets' own. A folder whose decoded pixels would exceed
:data:`IN_MEMORY_BYTES` is streamed instead, as Tiny-ImageNet and ImageNet are
(:class:`.image_folders.StreamedSplit`, DataLoader workers decoding per batch): resized as here
for evaluation, a random resized crop and flip for training, statistics from an evenly spaced
sample of :data:`STATISTICS_SAMPLE` training images.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .registry import DataFileError, DatasetInfo, DatasetNotFoundError

NAME = "image_folder"
TEST_FOLDERS = ("val", "test")  # the first that exists is the test split
IN_MEMORY_BYTES = 8 << 30  # the decoded uint8 pixels of both splits held in memory; above: streamed
STATISTICS_SAMPLE = 2048  # training images a streamed folder's statistics come from (evenly spaced)
SIZE_SAMPLE = 512  # training images whose sizes decide the most common size (evenly spaced)
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


def _image_suffixes() -> frozenset[str]:
    from PIL import Image

    return frozenset(Image.registered_extensions())


@dataclass(frozen=True)
class FolderScan:
    """What a folder holds, found without decoding its images."""

    root: Path
    classes: tuple[str, ...]
    train: tuple[tuple[Path, int], ...]
    test: tuple[tuple[Path, int], ...]
    test_folder: str
    image_shape: tuple[int, int, int]  # (C, H, W) every image is made

    @property
    def pixel_bytes(self) -> int:
        return (len(self.train) + len(self.test)) * int(np.prod(self.image_shape))


def _samples(folder: Path, classes: list[str], suffixes: frozenset[str]) -> list[tuple[Path, int]]:
    samples = []
    for label, name in enumerate(classes):
        directory = folder / name
        if not directory.is_dir():
            continue
        found = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        if not found and folder.name == "train":
            raise DataFileError(f"{directory}: the class folder holds no image (data.name: image_folder)")
        samples += [(p, label) for p in found]
    return samples


def scan(root: str | Path, image_size: int | tuple[int, int] | None = None) -> FolderScan:
    """The folder's classes, files and image shape; a one-line ``DatasetNotFoundError`` or
    ``DataFileError`` for a missing split, one class, no images, or test classes train lacks."""
    from PIL import Image, UnidentifiedImageError

    base = Path(root).expanduser().resolve()
    train_folder = base / "train"
    test_name = next((name for name in TEST_FOLDERS if (base / name).is_dir()), None)
    if not train_folder.is_dir() or test_name is None:
        raise DatasetNotFoundError(f"data.root {str(root)!r}: an image folder needs train/<class>/* and val/<class>/* "
                                   f"(or test/<class>/*) under it; found {sorted(p.name for p in base.iterdir()) if base.is_dir() else 'no folder'}")
    classes = sorted(p.name for p in train_folder.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataFileError(f"{train_folder}: an image folder needs at least two class folders, found {classes or 'none'}")
    test_classes = sorted(p.name for p in (base / test_name).iterdir() if p.is_dir())
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
        raise DataFileError(f"{base / test_name}: class folders {unknown[:5]} are not among train's classes")
    suffixes = _image_suffixes()
    train = _samples(train_folder, classes, suffixes)
    test = _samples(base / test_name, classes, suffixes)
    if not test:
        raise DataFileError(f"{base / test_name}: no images in its class folders")
    step = max(1, len(train) // SIZE_SAMPLE)
    sizes, modes = Counter(), set()
    for path, _ in train[::step]:
        try:
            with Image.open(path) as image:
                sizes[image.size] += 1  # (width, height), read from the header only
                modes.add(image.mode)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataFileError(f"{path}: not an image PIL can read ({exc})") from None
    if image_size is None:
        width, height = sizes.most_common(1)[0][0]
    elif isinstance(image_size, int):
        width = height = image_size
    else:
        height, width = image_size
    channels = 1 if modes <= GREY_MODES else 3
    return FolderScan(base, tuple(classes), tuple(train), tuple(test), test_name, (channels, height, width))


def _decode(samples: tuple[tuple[Path, int], ...], shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image, UnidentifiedImageError

    channels, height, width = shape
    images = torch.empty((len(samples), channels, height, width), dtype=torch.uint8)
    for i, (path, _) in enumerate(samples):
        try:
            with Image.open(path) as image:
                image = image.convert("L" if channels == 1 else "RGB")
                if image.size != (width, height):
                    image = image.resize((width, height), Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.uint8).reshape(height, width, channels)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataFileError(f"{path}: not an image PIL can read ({exc})") from None
        images[i] = torch.from_numpy(pixels.transpose(2, 0, 1).copy())
    return images, torch.tensor([label for _, label in samples], dtype=torch.int64)


def statistics(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images, on the [0, 1] scale."""
    pixels = images.transpose(0, 1).reshape(images.shape[1], -1).double() / 255.0
    return tuple(pixels.mean(1).tolist()), tuple(pixels.std(1, correction=0).tolist())


def streams(found: FolderScan) -> bool:
    """Whether the folder is read batch by batch from its files rather than held in memory."""
    return found.pixel_bytes > IN_MEMORY_BYTES


def load(found: FolderScan) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], DatasetInfo]:
    """Both splits' uint8 images ``[N, C, H, W]`` and labels, and what the model and normaliser need
    to know of them (the statistics of the training images)."""
    train = _decode(found.train, found.image_shape)
    test = _decode(found.test, found.image_shape)
    return train, test, _info(found, train[0], "user-folder")


def _info(found: FolderScan, images: torch.Tensor, source: str) -> DatasetInfo:
    mean, std = statistics(images)
    if not all(s > 0 for s in std):
        raise DataFileError(f"{found.root / 'train'}: a channel has the same value in every pixel (std 0): "
                            "nothing to normalise by")
    return DatasetInfo(NAME, found.image_shape, len(found.classes), mean, std, 255.0, source)


def streamed_info(found: FolderScan) -> DatasetInfo:
    """What the model and normaliser need to know of a streamed folder: its statistics from
    :data:`STATISTICS_SAMPLE` evenly spaced training images (all of them, where fewer)."""
    step = max(1, len(found.train) // STATISTICS_SAMPLE)
    sample = _decode(found.train[::step][:STATISTICS_SAMPLE], found.image_shape)[0]
    return _info(found, sample, "image-folder")


class FolderImages(Dataset):
    """A scanned split's images, decoded one at a time for a streamed folder: ``samples`` and
    ``transform`` as torchvision's ``ImageFolder`` has them, which is what
    :class:`.image_folders.StreamedSplit` reads. (``ImageFolder`` itself would number a test
    folder's classes by its own sub-folders, and always decodes to RGB.)"""

    def __init__(self, samples: tuple[tuple[Path, int], ...], channels: int, transform=None) -> None:
        self.samples = [(str(path), label) for path, label in samples]
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert(self.mode)
        return (self.transform(image) if self.transform is not None else image), label


def transforms(image_shape: tuple[int, int, int], stage: str):
    """A streamed folder's transforms, on the PIL image: ``eval`` resizes to ``image_shape`` as
    :func:`load` does (the same pixels); ``train`` takes torchvision's random resized crop of that
    size and a horizontal flip, as for the other streamed datasets."""
    from torchvision.transforms import v2

    size = list(image_shape[1:])
    if stage == "train":
        geometry = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    elif stage == "eval":
        geometry = [v2.Resize(size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)]
    else:
        raise ValueError(f"stage must be 'train' or 'eval', got {stage!r}")
    return v2.Compose([*geometry, v2.ToImage()])


def open_streamed(info: DatasetInfo, root: str | Path, split: str, *, indices: list[int] | None = None,
                  digest: str | None = None, workers: int = 4):
    """The ``split`` (``train`` or ``test``) of a streamed folder, as
    :func:`.image_folders.open_streamed` opens a registered one; with ``digest`` (from the prepared
    split), refuses a folder whose files or labels changed."""
    from .image_folders import StreamedSplit, samples_digest

    found = scan(root, info.image_shape[1:])
    folder = FolderImages(found.train if split == "train" else found.test, info.image_shape[0])
    samples = folder.samples if indices is None else [folder.samples[i] for i in indices]
    current = samples_digest(samples, found.root)
    if digest is not None and current != digest:
        raise DataFileError(f"the {split} images under {found.root} changed since the data were prepared "
                            "(files or labels differ); rerun the data node (or the whole run)")
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return StreamedSplit(info, found.root, split, labels, indices, current, workers=workers, folder=folder,
                         transforms=functools.partial(transforms, info.image_shape))


def folder_digest(root: Path) -> str:
    """A digest of the folder as it lies on disk: every file's path, size and modification time
    (``image_folders.tree_digest``). The prepared data record it (``hooks.FreshnessHook``)."""
    from .image_folders import tree_digest

    return tree_digest(Path(root).expanduser().resolve())

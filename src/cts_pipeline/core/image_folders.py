"""Image datasets too large for memory, read from JPEG folders and streamed through a DataLoader.

Two layouts under ``root``:
- ``tiny_imagenet``: Tiny-ImageNet-200 as distributed, ``tiny-imagenet-200/train/<wnid>/images/*.JPEG``
  and ``tiny-imagenet-200/val/images/*.JPEG`` with ``val/val_annotations.txt`` (file, wnid, box).
- ``imagenet``: torchvision's ImageFolder layout, ``imagenet/train/<wnid>/*.JPEG`` and
  ``imagenet/val/<wnid>/*.JPEG`` (what ``torchvision.datasets.ImageNet`` leaves after parsing the
  devkit, and the usual prepared layout).

Training uses RandomResizedCrop and a horizontal flip; evaluation, and the search (which sees
the training images as evaluation does, ``method.md``), Resize then CenterCrop. Both normalise
with ImageNet's mean and std. Everything is torchvision's: ``ImageFolder``, ``transforms.v2``,
``DataLoader``; only the Tiny-ImageNet validation annotations need a reader of their own, since
torchvision ships no Tiny-ImageNet dataset.

This is the data layer of the ImageNet-scale path (issue 12); the pipeline's nodes and the
search loop still take in-memory splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .data import DatasetNotFoundError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_RESIZE_RATIO = 256 / 224  # the standard Resize(256) before CenterCrop(224), at any size


@dataclass(frozen=True)
class FolderLayout:
    folder: str        # under root
    image_size: int    # the side of the crops the model sees
    num_classes: int


LAYOUTS = {
    "tiny_imagenet": FolderLayout("tiny-imagenet-200", 64, 200),
    "imagenet": FolderLayout("imagenet", 224, 1000),
}


def transforms_for(name: str, stage: str):
    """``stage``: ``train`` (random resized crop, flip) or ``eval`` (resize, center crop)."""
    from torchvision.transforms import v2

    size = LAYOUTS[name].image_size
    if stage == "train":
        geometry = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    elif stage == "eval":
        geometry = [v2.Resize(round(size * EVAL_RESIZE_RATIO), antialias=True), v2.CenterCrop(size)]
    else:
        raise ValueError(f"stage must be 'train' or 'eval', got {stage!r}")
    return v2.Compose([v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _missing(name: str, root: Path, expected: list[Path]) -> DatasetNotFoundError:
    listing = "\n".join(f"  {p}{'' if p.exists() else '  (missing)'}" for p in expected)
    return DatasetNotFoundError(f"dataset {name!r} not found under data.root = {root}; expected:\n{listing}\n"
                                "Point `data.root` at the folder that holds it (it is not downloaded).")


class _TinyImageNetVal(Dataset):
    """Tiny-ImageNet's validation images, labelled from ``val_annotations.txt``."""

    def __init__(self, folder: Path, class_to_idx: dict[str, int], transform) -> None:
        from torchvision.datasets.folder import default_loader

        self.loader, self.transform = default_loader, transform
        self.samples = []
        for number, line in enumerate((folder / "val_annotations.txt").read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in class_to_idx:
                raise ValueError(f"{folder / 'val_annotations.txt'} line {number}: expected "
                                 f"'<file>\\t<wnid>\\t...' with a wnid of the training set, got {line[:80]!r}")
            self.samples.append((folder / "images" / parts[0], class_to_idx[parts[1]]))
        absent = [str(path) for path, _ in self.samples if not path.is_file()]
        if absent:
            raise ValueError(f"{len(absent)} validation images listed in val_annotations.txt are missing, "
                             f"e.g. {absent[0]}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(self.loader(str(path))), label


def image_folder(name: str, root: str | Path, split: str, stage: str | None = None) -> Dataset:
    """The ``split`` (``train`` or ``val``) of dataset ``name`` under ``root``, with the transforms
    of ``stage`` (default: ``train`` for the training split, ``eval`` for validation; the search
    asks for ``train`` images with ``eval`` transforms)."""
    from torchvision.datasets import ImageFolder

    if name not in LAYOUTS:
        raise ValueError(f"unknown image-folder dataset {name!r}; known: {', '.join(sorted(LAYOUTS))}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(root).expanduser().resolve()
    base = root / LAYOUTS[name].folder
    transform = transforms_for(name, stage or ("train" if split == "train" else "eval"))
    expected = [base / "train"] + ([base / "val" / "images", base / "val" / "val_annotations.txt"]
                                   if name == "tiny_imagenet" else [base / "val"])
    if not all(p.exists() for p in expected):
        raise _missing(name, root, expected)
    train = ImageFolder(str(base / "train"), transform=transform)
    if split == "train":
        return train
    if name == "tiny_imagenet":
        return _TinyImageNetVal(base / "val", train.class_to_idx, transform)
    val = ImageFolder(str(base / "val"), transform=transform)
    if val.class_to_idx != train.class_to_idx:
        raise ValueError(f"{base / 'val'}: its class folders differ from train's")
    return val


def streaming_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int = 0, workers: int = 4,
                     pin_memory: bool | None = None) -> DataLoader:
    """A DataLoader with worker processes that stay up between epochs and pinned memory on CUDA
    machines; the order of a shuffled epoch is drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=workers,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                      persistent_workers=workers > 0, drop_last=shuffle)

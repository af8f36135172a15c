"""Image datasets too large for memory, read from JPEG folders and streamed through a DataLoader.

Two layouts under ``root``:
- ``tiny_imagenet``: Tiny-ImageNet-200 as distributed, ``tiny-imagenet-200/train/<wnid>/images/*.JPEG``
  and ``tiny-imagenet-200/val/images/*.JPEG`` with ``val/val_annotations.txt`` (file, wnid, box).
- ``imagenet``: torchvision's ImageFolder layout, ``imagenet/train/<wnid>/*.JPEG`` and
  ``imagenet/val/<wnid>/*.JPEG`` (what ``torchvision.datasets.ImageNet`` leaves after parsing the
  devkit, and the usual prepared layout).

Training uses RandomResizedCrop and a horizontal flip; evaluation, and the search (which sees
the training images as evaluation does, ``method.md``), Resize then CenterCrop. Both normalise
with ImageNet's mean and std (or ``data.mean`` / ``data.std``), on the device, from uint8 batches. Everything is torchvision's: ``ImageFolder``, ``transforms.v2``,
``DataLoader``; only the Tiny-ImageNet validation annotations need a reader of their own, since
torchvision ships no Tiny-ImageNet dataset.

:class:`StreamedSplit` is what the loops take in place of an in-memory ``Split``: batches come
from a ``DataLoader`` with persistent workers (pinned memory on CUDA), ordered by a
``DistributedSampler`` that also gives each rank its part of every global batch. Each sample's
random crop and flip is drawn from a seed of its own (the epoch's order seed and the sample's
index), so an epoch is the same whichever worker or rank loads a sample, and a resumed run
replays it exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import multiprocessing
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from ..device.distributed import rank_and_world
from ..device.virtual_ranks import padded_order, padded_size
from .registry import DataFileError, DatasetInfo, DatasetNotFoundError
from .shared_memory import fit_loader
from .transforms import normalize

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Batches each loader worker keeps ready (torch's default is 2): a GPU step on a bf16 ResNet-50
# takes less than one worker's decoding of a batch, so a deeper queue rides out slow JPEGs.
PREFETCH_BATCHES = 4
TAKE_BATCH = 64  # images per worker batch when a few hundred are taken at once (StreamedSplit.take)


@dataclass(frozen=True)
class FolderLayout:
    folder: str        # under root
    image_size: int    # the side of the crops the model sees
    num_classes: int
    # Evaluation's resize before the center crop, as a multiple of the crop: ImageNet's standard
    # Resize(256) before CenterCrop(224); 1 for Tiny-ImageNet, whose images are the model's 64
    # pixels already and are evaluated whole (the authors' CenterCrop there is the identity).
    eval_resize_ratio: float = 1.0


LAYOUTS = {
    "tiny_imagenet": FolderLayout("tiny-imagenet-200", 64, 200),
    "imagenet": FolderLayout("imagenet", 224, 1000, eval_resize_ratio=256 / 224),
}


# The training crop per dataset: torchvision's RandomResizedCrop defaults, or the authors' (TLAB
# 68c9740): on ImageNet the longer side resized to 500 pixels, then scale (0.1, 1) and aspect ratio
# (0.8, 1.25) (data/imagenet.py, ResizeMax and DataAugmentation); on Tiny-ImageNet scale (0.6, 1)
# and ratio (0.8, 1.25) (data/tiny_imagenet.py:72-73; its colour jitter is not reproduced, see
# docs/architecture.md, "The authors' recipe").
_TORCHVISION_CROP = {"max_side": None, "scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3)}
RESIZED_CROPS = {
    "torchvision": {"imagenet": _TORCHVISION_CROP, "tiny_imagenet": _TORCHVISION_CROP},
    "authors": {"imagenet": {"max_side": 500, "scale": (0.1, 1.0), "ratio": (0.8, 1.25)},
                "tiny_imagenet": {"max_side": None, "scale": (0.6, 1.0), "ratio": (0.8, 1.25)}},
}


def transforms_for(name: str, stage: str, *, resized_crop: str = "torchvision"):
    """``stage``: ``train`` (random resized crop as ``resized_crop`` says, flip) or ``eval``
    (resize, center crop), on uint8 pixels. Normalising is left to the device the batch goes to
    (:func:`.transforms.normalize`): a quarter of the bytes cross to it, and the loader workers' CPUs
    spend nothing on float arithmetic."""
    from torchvision.transforms import v2

    size = LAYOUTS[name].image_size
    if stage == "train":
        crop = RESIZED_CROPS[resized_crop][name]
        first = [v2.Resize(size=None, max_size=crop["max_side"], antialias=True)] if crop["max_side"] else []
        geometry = [*first, v2.RandomResizedCrop(size, scale=crop["scale"], ratio=crop["ratio"], antialias=True),
                    v2.RandomHorizontalFlip()]
    elif stage == "eval":
        geometry = [v2.Resize(round(size * LAYOUTS[name].eval_resize_ratio), antialias=True), v2.CenterCrop(size)]
    else:
        raise ValueError(f"stage must be 'train' or 'eval', got {stage!r}")
    return v2.Compose([v2.ToImage(), *geometry])


# Tiny-ImageNet's official archive (the cs231n course's); ImageNet has no public download.
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


def _expected(name: str, root: Path) -> list[Path]:
    base = root / LAYOUTS[name].folder
    return [base / "train"] + ([base / "val" / "images", base / "val" / "val_annotations.txt"]
                               if name == "tiny_imagenet" else [base / "val"])


def folder_digest(name: str, root: str | Path) -> str:
    """A digest of an image-folder dataset as it lies on disk: its resolved folder, and every file's
    path under it, size and modification time. No image is read (a stat per file: seconds for
    ImageNet's 1.33 M files), yet an image resized or re-encoded in place, a file added or removed,
    or ``data.root`` pointed at another copy all change it. The prepared data record it
    (``raw_digest``), and ``hooks.FreshnessHook`` compares it before trusting them."""
    return tree_digest(Path(root).expanduser().resolve() / LAYOUTS[name].folder)


def tree_digest(base: Path) -> str:
    """A digest of the folder ``base`` (resolved) and every file's path under it, size and
    modification time (:func:`folder_digest`)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{base}\n".encode())
    for folder, dirs, files in os.walk(base):
        dirs.sort()  # a fixed order, whatever the file system's
        for file in sorted(files):
            path = Path(folder) / file
            stat = path.stat()
            h.update(f"{path.relative_to(base)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _missing(name: str, root: Path, expected: list[Path], hint: str) -> DatasetNotFoundError:
    listing = "\n".join(f"  {p}{'' if p.exists() else '  (missing)'}" for p in expected)
    return DatasetNotFoundError(f"dataset {name!r} not found under data.root = {root}; expected:\n{listing}\n{hint}")


def ensure_folders(name: str, root: str | Path, download: bool) -> None:
    """Check the layout is there (a cheap check for the run's start), downloading Tiny-ImageNet's
    archive first if allowed. ImageNet must be prepared by the user (its licence)."""
    root = Path(root).expanduser().resolve()
    expected = _expected(name, root)
    if all(p.exists() for p in expected):
        return
    if name == "imagenet" or not download:
        hint = ("Point `data.root` at the folder that holds it: ImageNet is not downloadable (prepare it with "
                "torchvision.datasets.ImageNet or the usual train/ and val/ class folders)." if name == "imagenet"
                else "Set `data.download: true` to download it, or point `data.root` at a folder that has it.")
        raise _missing(name, root, expected, hint)
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(TINY_IMAGENET_URL, str(root), md5=TINY_IMAGENET_MD5)
    except Exception as exc:  # network, disk or checksum: still not here
        raise _missing(name, root, expected, f"Downloading {TINY_IMAGENET_URL} failed (data.download: true): "
                                             f"{exc}") from exc
    if not all(p.exists() for p in expected):
        raise _missing(name, root, expected, "The downloaded archive did not hold this layout.")


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
                raise DataFileError(f"{folder / 'val_annotations.txt'} line {number}: expected "
                                 f"'<file>\\t<wnid>\\t...' with a wnid of the training set, got {line[:80]!r}")
            self.samples.append((folder / "images" / parts[0], class_to_idx[parts[1]]))
        absent = [str(path) for path, _ in self.samples if not path.is_file()]
        if absent:
            raise DataFileError(f"{len(absent)} validation images listed in val_annotations.txt are missing, "
                             f"e.g. {absent[0]}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(self.loader(str(path))), label


def _image_folder(folder_class, path: Path, transform) -> Dataset:
    """torchvision's ImageFolder over ``path``; an empty folder, or class folders without images,
    is the data's problem (``DataFileError``), not a missing file."""
    try:
        return folder_class(str(path), transform=transform)
    except FileNotFoundError as exc:  # "Couldn't find any class folder", "Found no valid file"
        raise DataFileError(f"{path}: {exc}") from exc


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
    ensure_folders(name, root, download=False)
    train = _image_folder(ImageFolder, base / "train", transform)
    if split == "train":
        return train
    if name == "tiny_imagenet":
        return _TinyImageNetVal(base / "val", train.class_to_idx, transform)
    val = _image_folder(ImageFolder, base / "val", transform)
    if val.class_to_idx != train.class_to_idx:
        raise DataFileError(f"{base / 'val'}: its class folders differ from train's")
    return val


class _SeededOrder(Sampler):
    """``(index, seed)`` pairs in a ``DistributedSampler``'s order: this rank's part of the epoch,
    each sample with the seed its transforms draw from. The order's seed is set per epoch
    (:meth:`StreamedSplit.batches` draws it from the loop's per-epoch generator, so every stream
    of the project stays seeded by (run seed, stream, epoch)).

    The epoch is padded with its first samples to a multiple of ``parts`` (the ranks each global
    batch is dealt to: the recipe's virtual ranks, or the processes), as ``DistributedSampler``
    pads it for that many devices, then process ``rank`` takes every ``world``-th sample: its part
    of every global batch, equal in size to every other process's (in-memory splits pad alike,
    :func:`..device.virtual_ranks.padded_order`)."""

    def __init__(self, size: int, *, shuffle: bool, rank: int, world: int, parts: int = 1) -> None:
        # The sampler for one replica is the whole epoch's order (no padding): padded below to
        # ``parts``, which may be more than the processes (virtual ranks).
        self.order = DistributedSampler(range(size), num_replicas=1, rank=0, shuffle=shuffle, drop_last=False)
        self.rank, self.world = rank, world
        self.parts = math.lcm(parts, world)

    def set_seed(self, seed: int) -> None:
        self.order.seed = seed
        self.order.set_epoch(0)  # the epoch is already folded into the seed

    def __len__(self) -> int:
        return padded_size(len(self.order), self.parts) // self.world

    def __iter__(self):
        order = padded_order(torch.tensor(list(self.order), dtype=torch.int64), self.parts)
        for index in order[self.rank::self.world].tolist():
            yield index, (self.order.seed * 1_000_003 + index) % 2**63


class _SeededSamples(Dataset):
    """Loads ``(index, seed)``: the transforms' random draws come from the sample's own seed, not
    from the worker's generator, so they do not depend on which worker or rank loads it."""

    def __init__(self, dataset: Dataset, indices: list[int] | None) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        # transforms.v2 draws from torch's global generator; forked, so that loading in the main
        # process (no workers) leaves the caller's generator as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[self.indices[index] if self.indices is not None else index]


def samples_digest(samples: list[tuple[str, int]], root: Path) -> str:
    """A digest of the files and labels a split reads (paths relative to ``root``), so a split
    prepared from one folder is never silently read from a changed one."""
    lines = "".join(f"{Path(path).relative_to(root)}\t{label}\n" for path, label in samples)
    return hashlib.sha256(lines.encode()).hexdigest()


@dataclass
class StreamedSplit:
    """A split of an image-folder dataset, read batch by batch: what the loops use of an in-memory
    ``Split`` (``len``, ``device``, ``info``, ``labels``, batches, ``take``) without the pixels."""

    info: DatasetInfo
    root: Path
    split: str  # "train" or "val"
    labels: torch.Tensor  # int64 [N] on the CPU, in sample order (per-class draws and fingerprints)
    indices: list[int] | None = None  # the folder's samples this split keeps (None: all)
    digest: str = ""  # samples_digest of the kept samples
    device: torch.device = torch.device("cpu")
    workers: int = 4
    resized_crop: str = "torchvision"  # the training crop (RESIZED_CROPS; data.resized_crop)
    # The scanned folder (every sample, evaluation transforms): scanning ImageNet's 1.28 M files
    # takes seconds, so it is done once per split and shared by every stage's dataset.
    folder: Dataset | None = dataclasses.field(default=None, repr=False, compare=False)
    # The transforms of a stage (``train`` or ``eval``); None: the registered dataset's
    # (transforms_for). Someone's folder brings its own (user_folders.transforms).
    transforms: Callable[[str], Any] | None = dataclasses.field(default=None, repr=False, compare=False)
    _loaders: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    streamed = True

    def __len__(self) -> int:
        return self.labels.shape[0]

    def dataset(self, stage: str) -> Dataset:
        """The folder's samples with the transforms of ``stage`` (``train`` or ``eval``)."""
        if self.folder is None:
            self.folder = image_folder(self.info.name, self.root, self.split, "eval")
        staged = copy.copy(self.folder)  # the same sample list; ImageFolder and ours read .transform
        staged.transform = (self.transforms(stage) if self.transforms is not None
                            else transforms_for(self.info.name, stage, resized_crop=self.resized_crop))
        return staged

    def to(self, device: torch.device | str) -> StreamedSplit:
        return dataclasses.replace(self, device=torch.device(device))

    def with_workers(self, workers: int) -> StreamedSplit:
        return dataclasses.replace(self, workers=workers)

    def subset(self, n: int) -> StreamedSplit:
        """``n`` samples evenly spaced through the folder order (which is sorted by class), so a
        small subset still covers the classes."""
        if n < 1:
            raise ValueError(f"subset size must be at least 1, got {n}")
        total = len(self)
        if n >= total:
            return self
        picked = [i * total // n for i in range(n)]
        base = self.indices if self.indices is not None else list(range(total))
        kept = [base[i] for i in picked]
        samples = self.dataset("eval").samples
        return dataclasses.replace(self, labels=self.labels[picked], indices=kept,
                                   digest=samples_digest([samples[i] for i in kept], self.root))

    def batches(self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
                augment: bool = False, drop_last: bool = False,
                parts: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of (normalised float32 images, labels) on :attr:`device`: the loader's uint8
        batches (pinned on CUDA, :data:`PREFETCH_BATCHES` ahead per worker) are normalised there.
        Shuffled epochs are split
        over the ranks of a process group: each rank gets ``batch_size / world`` images of every
        global batch, the union being the global batch one process would see. Unshuffled epochs
        (evaluation) read every image on every rank. ``parts``: the ranks a global batch is dealt
        to; the epoch is padded for them (:class:`_SeededOrder`)."""
        rank, world = rank_and_world() if shuffle else (0, 1)
        workers = self._usable_workers()
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} does not split over {world} processes; make it a multiple")
        key = (augment, batch_size, shuffle, drop_last, world, parts)
        if key not in self._loaders:
            order = _SeededOrder(len(self), shuffle=shuffle, rank=rank, world=world, parts=parts)
            samples = _SeededSamples(self.dataset("train" if augment else "eval"), self.indices)
            # Workers hand batches over through /dev/shm: as many in flight as fit it (shared_memory.py).
            batch_bytes = batch_size // world * (math.prod(self.info.image_shape) + 8)  # uint8 pixels, int64 label
            plan = fit_loader(workers, PREFETCH_BATCHES, batch_bytes,
                              what=f"{self.info.name} {self.split} {'training' if augment else 'reading'} loader")
            self._loaders[key] = DataLoader(
                samples, batch_size=batch_size // world, sampler=order, num_workers=plan.workers,
                pin_memory=self.device.type == "cuda", persistent_workers=plan.workers > 0, drop_last=drop_last,
                prefetch_factor=plan.prefetch if plan.workers > 0 else None)
        loader = self._loaders[key]
        if shuffle:
            gen_device = generator.device if generator is not None else "cpu"
            loader.sampler.set_seed(int(torch.randint(0, 2**62, (), generator=generator, device=gen_device)))
        for x, y in loader:
            yield normalize(x.to(self.device, non_blocking=True), self.info), y.to(self.device, non_blocking=True)

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The images at ``index`` (evaluation transforms) as one normalised batch on :attr:`device`,
        decoded by the loader's workers (the batched-search probe's 1024 images, SNIP's and GraSP's
        class-balanced batches: serially in this process, seconds of JPEG decoding per call)."""
        chosen = [self.indices[i] if self.indices is not None else i for i in index.tolist()]
        pieces = math.ceil(len(chosen) / TAKE_BATCH)
        plan = fit_loader(min(self._usable_workers(), pieces), PREFETCH_BATCHES,
                          TAKE_BATCH * (math.prod(self.info.image_shape) + 8), what=f"{self.info.name} {self.split} take")
        loader = DataLoader(Subset(self.dataset("eval"), chosen), batch_size=TAKE_BATCH, num_workers=plan.workers,
                            prefetch_factor=plan.prefetch if plan.workers else None)
        images = torch.cat([x for x, _ in loader])
        return normalize(images.to(self.device), self.info)

    def _usable_workers(self) -> int:
        """:attr:`workers`, or 0 in a daemonic process, which may not start children (a Dask worker
        started with its default distributed.worker.daemon: true): it reads in the process itself."""
        if self.workers and multiprocessing.current_process().daemon:
            logger.warning("%s: this process is daemonic and cannot start DataLoader workers; reading the "
                           "images in the process itself (start Dask workers with "
                           "DASK_DISTRIBUTED__WORKER__DAEMON=False to use runtime.data_workers)", self.info.name)
            self.workers = 0
        return self.workers


def open_streamed(info: DatasetInfo, root: str | Path, split: str, *, indices: list[int] | None = None,
                  digest: str | None = None, workers: int = 4, resized_crop: str = "torchvision") -> StreamedSplit:
    """A :class:`StreamedSplit` over the folder's samples (or those at ``indices``). With
    ``digest`` (from a prepared split), refuses a folder whose files or labels have changed."""
    root = Path(root).expanduser().resolve()
    folder = image_folder(info.name, root, split, "eval")
    samples = folder.samples if indices is None else [folder.samples[i] for i in indices]
    found = samples_digest(samples, root)
    if digest is not None and found != digest:
        raise DataFileError(f"the {split} images of dataset {info.name!r} under {root} changed since the data were "
                         "prepared (files or labels differ); rerun the data node (or the whole run)")
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return StreamedSplit(info, root, split, labels, indices, found, workers=workers, folder=folder,
                         resized_crop=resized_crop)

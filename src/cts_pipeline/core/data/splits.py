"""Image classification datasets as whole-split tensors, and a batch iterator that stays on device.

Every dataset used here is small enough (at most 60 000 images of 3x32x32 bytes, ~180 MB) to hold
as one uint8 tensor, so a split lives wholly on the training device and batching, augmentation and
normalisation are a handful of tensor operations per batch. That avoids ``DataLoader`` workers and
PIL entirely, which is where small-model training spends most of its time otherwise.

Pixels are kept raw (uint8, ``0..max_value``) until :func:`normalize`, so augmentation pads with
true black and the stored splits stay four times smaller than float32.

Files follow torchvision's on-disk layout, so a folder torchvision has already downloaded into can
be pointed at directly with ``data.root``.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..device.virtual_ranks import padded_order
from .registry import (  # the registry lives apart so that image_folders needs only it
    DataFileError,
    DatasetInfo,
    DatasetNotFoundError,
    get_dataset_info,
)
from .transforms import CROP_PADDINGS, crop_flip, draw_crop_flip, normalize

_DIGITS_TEST_SIZE = 360

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# Folder under root (torchvision's naming), the files expected there, and which files make up
# each split (None for the idx formats, which torchvision reads for us).
_FILE_LAYOUT: dict[str, tuple[str, tuple[str, ...]]] = {
    "mnist": ("MNIST/raw", _MNIST_FILES),
    "fashion_mnist": ("FashionMNIST/raw", _MNIST_FILES),
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
    ),
    "cifar100": ("cifar-100-python", ("train", "test", "meta")),
}

_CIFAR_SPLITS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "cifar10": (tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "labels"),
    "cifar100": (("train",), ("test",), "fine_labels"),
}


# --------------------------------------------------------------------------------------------
# Files on disk
# --------------------------------------------------------------------------------------------


def _resolve_root(name: str, root: str | Path | None) -> Path:
    """Absolute root; relative roots are taken from the cwd, which is the project root under Kedro."""
    if root is None:
        raise ValueError(
            f"dataset {name!r} is read from files, but data.root is not set: point data.root at "
            "the folder that holds (or should receive) them"
        )
    return Path(root).expanduser().resolve()


def _expected_files(name: str, root: Path) -> list[Path]:
    folder, files = _FILE_LAYOUT[name]
    return [root / folder / f for f in files]


def _missing_message(name: str, root: Path, expected: list[Path], missing: list[Path]) -> str:
    listing = "\n".join(f"  {p}{'  (missing)' if p in missing else ''}" for p in expected)
    return (
        f"dataset {name!r} not found under data.root = {root}; expected these files:\n{listing}\n"
        "Set `data.download: true` to download them, or point `data.root` at a folder that has them."
    )


def _check_idx(path: Path) -> None:
    """Refuse a file that is not the idx array its name promises (torchvision's reader only
    asserts, with no file name). The header is the magic 0x0000 0x08 <ndim>, then ndim
    big-endian uint32 sizes; uint8 data fill the rest of the file exactly."""
    ndim = 3 if "images" in path.name else 1
    with open(path, "rb") as f:
        header = f.read(4 + 4 * ndim)
    problem = None
    if len(header) < 4 + 4 * ndim or header[:4] != bytes((0, 0, 8, ndim)):
        problem = f"its header is not that of a {ndim}-d uint8 idx array"
    else:
        sizes = [int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        expected = len(header) + math.prod(sizes)
        if path.stat().st_size != expected:
            problem = f"it holds {path.stat().st_size} bytes, its header {sizes} promises {expected}"
    if problem:
        raise DataFileError(f"{path} is not a valid MNIST-format idx file: {problem}. Delete it and set "
                         "`data.download: true`, or point `data.root` at intact files")


def ensure_available(name: str, root: str | Path | None, download: bool) -> None:
    """Make sure ``load_splits`` will find the files, downloading them only if allowed.

    Called at run start to validate configuration, so when the files are present it only checks
    that they exist; whether they parse is :func:`load_splits`' business.
    """
    info = get_dataset_info(name)
    if info.source == "scikit-learn":
        return  # bundled with scikit-learn, nothing on disk to look for
    resolved = _resolve_root(name, root)
    if info.streamed:
        from .image_folders import ensure_folders

        return ensure_folders(name, resolved, download)
    expected = _expected_files(name, resolved)
    missing = [p for p in expected if not p.is_file()]
    if not missing:
        if name in ("mnist", "fashion_mnist"):
            for path in expected:
                _check_idx(path)
        return
    if not download:
        raise DatasetNotFoundError(_missing_message(name, resolved, expected, missing))

    try:
        resolved.mkdir(parents=True, exist_ok=True)
        # One call fetches both splits: each dataset is a single download in torchvision.
        _torchvision_class(name)(str(resolved), train=True, download=True)
    except Exception as exc:  # network, disk or checksum failures all mean "still not here"
        raise DatasetNotFoundError(
            f"downloading dataset {name!r} into {resolved} failed (data.download: true): {exc}\n"
            + _missing_message(name, resolved, expected, missing)
        ) from exc
    still_missing = [p for p in expected if not p.is_file()]
    if still_missing:
        raise DatasetNotFoundError(
            f"torchvision downloaded dataset {name!r} but some files are still missing.\n"
            + _missing_message(name, resolved, expected, still_missing)
        )


def raw_files_digest(name: str, root: str | Path | None) -> str | None:
    """A digest of the raw files a held-in-memory dataset is read from: their names, sizes and
    contents (blake2b at about 1 GB/s: a fraction of a second for MNIST or CIFAR). The prepared
    data record it, so that other files under ``data.root`` are noticed (``hooks.FreshnessHook``).
    None for scikit-learn's bundled digits (no files of ours). Image folders are too large to read
    for it: their digest is of each file's path, size and modification time and of the folder's
    resolved path (``image_folders.folder_digest``)."""
    import hashlib

    info = get_dataset_info(name)
    if info.streamed:
        from .image_folders import folder_digest

        return folder_digest(name, _resolve_root(name, root))
    if info.source != "torchvision":
        return None
    h = hashlib.blake2b(digest_size=8)
    for path in _expected_files(name, _resolve_root(name, root)):
        h.update(f"{path.name}:{path.stat().st_size}:".encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _torchvision_class(name: str) -> type:
    # Imported here rather than at module level: it costs ~1.5 s, and digits and the run-start
    # check of files already present never need it.
    from torchvision import datasets

    return {
        "mnist": datasets.MNIST,
        "fashion_mnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
    }[name]


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


@dataclass
class Split:
    """One split as two tensors: raw pixels and their labels."""

    images: torch.Tensor  # uint8, [N, C, H, W], contiguous, raw pixel values (0..max_value)
    labels: torch.Tensor  # int64, [N]
    info: DatasetInfo
    # Made on first use by epochs without augmentation; `to` and `subset` start without one.
    _normalized: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    streamed = False  # image_folders.StreamedSplit: the same interface, batches from JPEG files

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The images at ``index`` as one normalised batch."""
        return normalize(self.images[index], self.info)

    def normalized(self) -> torch.Tensor:
        """All images as normalised float32, computed once: without augmentation, normalising each
        batch again every epoch cost LeNet-300-100 about 8 % of its training step."""
        if self._normalized is None:
            self._normalized = normalize(self.images, self.info)
        return self._normalized

    def to(self, device: torch.device | str) -> Split:
        """The same split on ``device``; tensors already there are shared, not copied."""
        return dataclasses.replace(
            self, images=self.images.to(device), labels=self.labels.to(device)
        )

    def subset(self, n: int) -> Split:
        """The first ``n`` samples (all of them when ``n`` exceeds the split), for tiny presets."""
        if n < 1:
            raise ValueError(f"subset size must be at least 1, got {n}")
        return dataclasses.replace(self, images=self.images[:n], labels=self.labels[:n])


def _make_split(
    images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, info: DatasetInfo
) -> Split:
    """Wrap arrays as a Split with the dtypes, layout and shape every consumer relies on."""
    images = torch.as_tensor(images).to(torch.uint8).contiguous()
    labels = torch.as_tensor(labels).to(torch.int64).contiguous()
    if tuple(images.shape[1:]) != info.image_shape or images.shape[0] != labels.shape[0]:
        raise DataFileError(
            f"dataset {info.name!r}: got images {list(images.shape)} and labels "
            f"{list(labels.shape)}, expected [N, {', '.join(map(str, info.image_shape))}] and [N]"
        )
    # A label outside the class range would only surface later as an opaque CUDA assert.
    if len(labels) and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise DataFileError(
            f"dataset {info.name!r}: labels must lie in [0, {info.num_classes}), "
            f"got range [{int(labels.min())}, {int(labels.max())}]"
        )
    return Split(images, labels, info)


def _load_digits(info: DatasetInfo) -> tuple[Split, Split]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # Values are whole numbers 0..16 stored as float64; uint8 holds them exactly.
    images = bunch.images.astype(np.uint8)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    # scikit-learn ships no test split: a fixed stratified one keeps every class equally represented
    # and every run comparable.
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=_DIGITS_TEST_SIZE, stratify=labels, random_state=0
    )
    return _make_split(x_train, y_train, info), _make_split(x_test, y_test, info)


def _load_idx(name: str, root: Path, info: DatasetInfo) -> tuple[Split, Split]:
    cls = _torchvision_class(name)
    splits = []
    for train in (True, False):
        ds = cls(str(root), train=train, download=False)
        splits.append(_make_split(ds.data.unsqueeze(1), ds.targets, info))
    return splits[0], splits[1]


CIFAR_BATCH_IMAGES = 10_000  # every file of CIFAR-10 and CIFAR-100 holds at most this many images


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR batch holds and nothing else.

    The format is pickle, and a plain ``pickle.load`` calls whatever a file names, so a poisoned
    batch would run its code before any check could look at it. A CIFAR batch is a dict of
    strings, lists of ints and one uint8 numpy array; the array is the only object built through
    a global, so only numpy's array reconstructors (under both of numpy's module names) and the
    bytes constructor of protocol 2 are allowed. Everything else is refused before it is called.
    """

    ALLOWED = frozenset({
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        # Protocol 2 written by Python 3 spells bytes as _codecs.encode(str, "latin1"): data only.
        ("_codecs", "encode"),
    })

    # The most any array of a CIFAR batch holds: its 10000 images of 3 × 32 × 32 bytes. A pickle
    # declares an array's shape and dtype before its bytes, and numpy allocates on the
    # declaration, so a few bytes of file could ask for gigabytes (or more than exists).
    MAX_ARRAY_BYTES = CIFAR_BATCH_IMAGES * 3 * 32 * 32

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which a CIFAR batch never holds (refused, nothing was run)")
        found = super().find_class(module, name)
        if name == "_reconstruct":
            return self._reconstruct_checked(found)
        if name == "dtype":
            return _plain_dtype
        return found

    @classmethod
    def _reconstruct_checked(cls, reconstruct):
        """numpy's ``_reconstruct(subtype, shape, dtype)``, which allocates ``shape``, refused when
        that is more than a CIFAR batch's images before anything is allocated."""
        def checked(subtype, shape, dtype):
            dims = (shape,) if isinstance(shape, int) else tuple(shape)
            if not all(isinstance(d, int) and d >= 0 for d in dims):
                raise pickle.UnpicklingError(f"it declares an array of shape {shape!r}")
            size = math.prod(dims) * _plain_dtype(dtype.decode("latin1") if isinstance(dtype, bytes) else dtype).itemsize
            if size > cls.MAX_ARRAY_BYTES:
                raise pickle.UnpicklingError(
                    f"it declares an array of shape {list(dims)} ({size:,} bytes), more than a CIFAR batch's "
                    f"{CIFAR_BATCH_IMAGES} images ({cls.MAX_ARRAY_BYTES:,} bytes); refused before allocating it")
            return reconstruct(subtype, shape, dtype)

        return checked


def _plain_dtype(*args) -> np.dtype:
    """``numpy.dtype(...)`` for a scalar type only: a sub-array or record dtype (``('u1', (2**31,))``)
    would make every element of an array as large as the file asks."""
    dtype = np.dtype(*args)
    if dtype.subdtype is not None or dtype.fields is not None or dtype.itemsize > 16:
        raise pickle.UnpicklingError(f"it declares the array type {dtype}, which a CIFAR batch never holds")
    return dtype


def _read_cifar_batch(
    path: Path, label_key: str, info: DatasetInfo
) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR pickle batch as (uint8 [n, 3, 32, 32], int64 [n]).

    Read directly rather than through torchvision, whose CIFAR classes insist on the MD5 sums of
    the official files (so no test fixture or re-packed copy would load).
    """
    try:
        with path.open("rb") as f:
            # The official batches are Python 2 pickles; latin1 turns their byte strings into str.
            batch = _CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, OverflowError) as exc:
        raise DataFileError(f"{path} is not a readable CIFAR pickle batch: {exc}") from exc

    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataFileError(f"{path}: expected a dict with keys 'data' and {label_key!r}, got {found}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key])
    if data.ndim and data.shape[0] > CIFAR_BATCH_IMAGES:
        raise DataFileError(f"{path}: 'data' holds {data.shape[0]} images; a CIFAR batch holds at most "
                            f"{CIFAR_BATCH_IMAGES}")
    pixels = int(np.prod(info.image_shape))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        raise DataFileError(
            f"{path}: 'data' must be uint8 [n, {pixels}], got {data.dtype} {list(data.shape)}"
        )
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataFileError(
            f"{path}: {label_key!r} must be {data.shape[0]} integers (one per image), "
            f"got {labels.dtype} {list(labels.shape)}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise DataFileError(
            f"{path}: labels must lie in [0, {info.num_classes}), "
            f"got range [{labels.min()}, {labels.max()}]"
        )
    # Rows are stored channel-major (1024 red, 1024 green, 1024 blue), i.e. already CHW.
    return data.reshape(-1, *info.image_shape), labels.astype(np.int64)


def _load_cifar(name: str, root: Path, info: DatasetInfo) -> tuple[Split, Split]:
    folder = root / _FILE_LAYOUT[name][0]
    train_files, test_files, label_key = _CIFAR_SPLITS[name]
    splits = []
    for files in (train_files, test_files):
        parts = [_read_cifar_batch(folder / f, label_key, info) for f in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        splits.append(_make_split(images, labels, info))
    return splits[0], splits[1]


def load_splits(
    name: str, root: str | Path | None = None, download: bool = False
) -> tuple[Split, Split]:
    """(train, test) splits of dataset ``name`` on the CPU, downloading first if allowed. An
    image-folder dataset gives two ``StreamedSplit``s, which read their images batch by batch."""
    info = get_dataset_info(name)
    ensure_available(name, root, download)
    if name == "digits":
        return _load_digits(info)
    resolved = _resolve_root(name, root)
    if info.streamed:
        from .image_folders import open_streamed

        return open_streamed(info, resolved, "train"), open_streamed(info, resolved, "val")
    if name in _CIFAR_SPLITS:
        return _load_cifar(name, resolved, info)
    return _load_idx(name, resolved, info)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

def iterate_batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    augment: bool = False,
    drop_last: bool = False,
    pad: int = 4,
    padding: str = "zeros",
    parts: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (normalised float32 images, int64 labels) on the split's device.

    ``parts``: the number of ranks each batch is dealt to (:attr:`..device.virtual_ranks.RankLayout.parts`).
    The epoch's order is then padded to a multiple of it by wrapping to its start, as
    ``DistributedSampler`` pads an epoch for that many devices, so the last batch gives every rank
    the same number of samples (a short last batch would leave some ranks none: a NaN loss).

    Random numbers are drawn in a fixed order (the epoch's permutation, then per batch the crop
    rows, crop columns and flips), all from ``generator``, so a seeded generator replays an epoch
    exactly. Draws happen on the generator's device, which should be the split's. ``padding``
    (``zeros`` or ``reflect``) fills the crop's border; streamed folders use their own transforms.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    if split.streamed:  # the folders' own transforms crop, flip and normalise
        yield from split.batches(batch_size, shuffle=shuffle, generator=generator, augment=augment,
                                 drop_last=drop_last, parts=parts)
        return
    if pad < 0:
        raise ValueError(f"pad must be non-negative, got {pad}")
    if padding not in CROP_PADDINGS:
        raise ValueError(f"padding must be one of {CROP_PADDINGS}, got {padding!r}")
    n = len(split)
    device = split.images.device
    order = None
    if shuffle:
        gen_device = generator.device if generator is not None else device
        order = torch.randperm(n, generator=generator, device=gen_device).to(device)
    if n % parts:
        order = padded_order(order if order is not None else torch.arange(n, device=device), parts)
        n = len(order)

    stop = n - n % batch_size if drop_last else n
    # The crop pads raw pixels with zeros (black), so augmented batches are normalised after it.
    source = split.images if augment else split.normalized()
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        if order is None:
            images, labels = source[start:end], split.labels[start:end]
        else:
            idx = order[start:end]
            images, labels = source[idx], split.labels[idx]
        if augment:
            top, left, flip = draw_crop_flip(images.shape[0], pad, generator, device)
            yield normalize(crop_flip(images, top, left, flip, pad, padding), split.info), labels
        else:
            yield images, labels

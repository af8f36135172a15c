"""Dataset loaders on small files written in the real formats, and the on-device batch iterator."""

from __future__ import annotations

import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cts_pipeline.core.data import splits as data
from cts_pipeline.core.data import transforms as data_transforms
from cts_pipeline.core.data.registry import (
    DATASETS,
    DataFileError,
    DatasetInfo,
    DatasetNotFoundError,
    get_dataset_info,
)
from cts_pipeline.core.data.splits import Split, ensure_available, iterate_batches, load_splits
from cts_pipeline.core.data.transforms import normalize

# Identity normalisation (mean 0, std 1, max 1) so batches can be compared as raw pixels, and a
# non-square shape so rows and columns cannot be swapped unnoticed.
TOY = DatasetInfo("toy", (3, 6, 5), 1000, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 1.0, "test")


def toy_split(n: int, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(1, 256, (n, *TOY.image_shape), generator=g, dtype=torch.uint8)
    return Split(images, torch.arange(n), TOY)


def label_coded_split(n: int) -> Split:
    """Every pixel of image i is i + 1 (never 0, which is the padding), and its label is i."""
    images = (torch.arange(n, dtype=torch.uint8) + 1).view(n, 1, 1, 1).expand(n, *TOY.image_shape)
    return Split(images.contiguous(), torch.arange(n), TOY)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError) as err:
        get_dataset_info("foo")
    assert str(err.value) == (
        "unknown dataset 'foo' (data.name); known: cifar10, cifar100, digits, fashion_mnist, imagenet, mnist, "
        "tiny_imagenet"
    )
    with pytest.raises(ValueError, match="data.name"):
        load_splits("foo")


def test_registry_is_consistent():
    assert set(DATASETS) == {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "tiny_imagenet", "imagenet"}
    for name, info in DATASETS.items():
        assert info.name == name
        assert len(info.mean) == len(info.std) == info.image_shape[0]
        assert info.source in {"scikit-learn", "torchvision", "image-folder"}
        assert info.streamed == (name in ("tiny_imagenet", "imagenet"))


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> tuple[Split, Split]:
    return load_splits("digits")


def test_digits_sizes_dtypes_and_range(digits):
    train, test = digits
    assert (len(train), len(test)) == (1437, 360)
    for split in digits:
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.images.shape[1:] == (1, 8, 8) and split.images.is_contiguous()
        assert int(split.images.max()) == 16
        assert split.info is DATASETS["digits"]


def test_digits_test_split_is_stratified(digits):
    counts = torch.bincount(digits[1].labels, minlength=10)
    assert ((counts - 36).abs() <= 1).all(), counts


def test_digits_is_deterministic(digits):
    again = load_splits("digits")
    for first, second in zip(digits, again, strict=True):
        assert torch.equal(first.images, second.images)
        assert torch.equal(first.labels, second.labels)


def test_digits_constants_match_train_split(digits):
    pixels = digits[0].images.double() / 16.0
    info = DATASETS["digits"]
    assert abs(pixels.mean().item() - info.mean[0]) < 1e-3
    assert abs(pixels.std().item() - info.std[0]) < 1e-3


def test_digits_needs_no_root():
    ensure_available("digits", None, download=False)


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (idx files)
# --------------------------------------------------------------------------------------------


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    n, h, w = images.shape
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 0x00000803, n, h, w) + images.astype(np.uint8).tobytes()
    )
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 0x00000801, n) + labels.astype(np.uint8).tobytes()
    )


@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]
)
def test_idx_loader_returns_exact_pixels_and_labels(tmp_path, name, folder):
    rng = np.random.default_rng(1)
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    expected = {}
    for prefix, n in (("train", 20), ("t10k", 10)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        write_idx(raw, prefix, images, labels)
        expected[prefix] = (images, labels)

    train, test = load_splits(name, tmp_path)
    for split, prefix in ((train, "train"), (test, "t10k")):
        images, labels = expected[prefix]
        assert split.images.dtype == torch.uint8 and split.images.shape == (len(labels), 1, 28, 28)
        assert split.images.is_contiguous()
        np.testing.assert_array_equal(split.images[:, 0].numpy(), images)
        assert split.labels.dtype == torch.int64
        np.testing.assert_array_equal(split.labels.numpy(), labels)
        assert split.info is DATASETS[name]


def test_a_truncated_idx_file_is_refused_by_name(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(raw, prefix, rng.integers(0, 256, (4, 28, 28)), rng.integers(0, 10, 4))
    ensure_available("mnist", tmp_path, download=False)
    labels = raw / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte is not a valid .* holds 11 bytes, its header \[4\] promises 12"):
        ensure_available("mnist", tmp_path, download=False)


def test_relative_root_is_resolved_against_cwd(tmp_path, monkeypatch):
    raw = tmp_path / "datasets" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        write_idx(raw, prefix, np.zeros((2, 28, 28), np.uint8), np.array([3, 4]))
    monkeypatch.chdir(tmp_path)
    train, _ = load_splits("mnist", "datasets")
    assert train.labels.tolist() == [3, 4]


# --------------------------------------------------------------------------------------------
# CIFAR (pickle batches)
# --------------------------------------------------------------------------------------------


def write_pickle(path: Path, obj: object) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f)


def cifar_batch(rng: np.random.Generator, n: int, label_key: str, classes: int) -> dict:
    return {
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, classes, n).tolist(),
        "filenames": [f"img_{i}.png" for i in range(n)],
    }


def write_cifar10(root: Path, rng: np.random.Generator) -> dict[str, dict]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = cifar_batch(rng, 3, "labels", 10)
        write_pickle(folder / name, batches[name])
    write_pickle(folder / "batches.meta", {"label_names": [str(i) for i in range(10)]})
    return batches


def test_cifar10_layout_and_labels_round_trip(tmp_path):
    batches = write_cifar10(tmp_path, np.random.default_rng(2))
    train, test = load_splits("cifar10", tmp_path)

    train_data = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    train_labels = sum((batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    assert train.images.shape == (15, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == train_labels and train.labels.dtype == torch.int64
    assert test.labels.tolist() == batches["test_batch"]["labels"]
    # CHW: a row is 1024 red values, then 1024 green, then 1024 blue, each row-major.
    row = train_data[4]
    for c, y, x in [(0, 0, 0), (0, 0, 31), (1, 5, 7), (2, 31, 0), (2, 31, 31)]:
        assert train.images[4, c, y, x] == row[c * 1024 + y * 32 + x]
    np.testing.assert_array_equal(train.images.numpy().reshape(15, -1), train_data)
    np.testing.assert_array_equal(test.images.numpy().reshape(3, -1), batches["test_batch"]["data"])


def test_cifar100_reads_fine_labels(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    batches = {}
    for name, n in (("train", 7), ("test", 4)):
        batches[name] = cifar_batch(rng, n, "fine_labels", 100)
        batches[name]["coarse_labels"] = [0] * n
        write_pickle(folder / name, batches[name])
    write_pickle(folder / "meta", {"fine_label_names": [str(i) for i in range(100)]})

    train, test = load_splits("cifar100", tmp_path)
    assert train.info.num_classes == 100
    for split, name in ((train, "train"), (test, "test")):
        assert split.labels.tolist() == batches[name]["fine_labels"]
        np.testing.assert_array_equal(
            split.images.numpy().reshape(len(split), -1), batches[name]["data"]
        )


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        ({"data": np.zeros((3, 100), np.uint8), "labels": [0, 1, 2]}, r"uint8 \[n, 3072\]"),
        ({"data": np.zeros((3, 3072), np.uint8), "labels": [0, 1]}, "one per image"),
        ({"data": np.zeros((3, 3072), np.uint8)}, "keys 'data' and 'labels'"),
        ({"data": np.zeros((1, 3072), np.uint8), "labels": [10]}, r"\[0, 10\)"),
    ],
)
def test_malformed_cifar_batch_names_the_file(tmp_path, corrupt, match):
    write_cifar10(tmp_path, np.random.default_rng(4))
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    write_pickle(bad, corrupt)
    with pytest.raises(ValueError, match=match) as err:
        load_splits("cifar10", tmp_path)
    assert str(bad) in str(err.value)


def test_unpicklable_cifar_batch_names_the_file(tmp_path):
    write_cifar10(tmp_path, np.random.default_rng(5))
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch"):
        load_splits("cifar10", tmp_path)


class _WritesAFile:
    """What a poisoned batch would do when unpickled: call a function it names (here: open a
    marker file for writing)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_poisoned_cifar_batch_runs_nothing_and_is_named(tmp_path):
    write_cifar10(tmp_path, np.random.default_rng(6))
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    marker = tmp_path / "the-pickle-ran"
    write_pickle(bad, {"data": _WritesAFile(marker), "labels": [0]})
    named = re.escape(f"{open.__module__}.open")  # what pickle records: io.open, or _io.open from Python 3.12
    with pytest.raises(DataFileError, match=r"data_batch_2 is not a readable CIFAR pickle batch: it names " + named) \
            as err:
        load_splits("cifar10", tmp_path)
    assert str(bad) in str(err.value)
    assert not marker.exists(), "unpickling must never call what the file names"


class _DeclaredArray:
    """What a pickle can say in a few bytes: "an array of this shape", which numpy's
    ``_reconstruct`` allocates before any byte of it is read."""

    def __init__(self, shape: tuple, dtype=b"B") -> None:
        self.shape, self.dtype = shape, dtype

    def __reduce__(self):
        return np.ndarray.__reduce__(np.zeros(0, np.uint8))[0], (np.ndarray, self.shape, self.dtype)


@pytest.mark.parametrize(("declared", "labels"), [
    (_DeclaredArray((20_000, 3072)), [0] * 20_000),  # 61 MB from a small file, and [n, 3072] uint8 as checked
    (_DeclaredArray((2**40, 3072)), [0]),             # more than any machine has: MemoryError, uncaught
    (_DeclaredArray((4, 3072), np.dtype(("u1", (2**30,)))), [0] * 4),  # a sub-array dtype: 4 GiB a row
], ids=["twice a batch", "2**40 rows", "sub-array dtype"])
def test_a_cifar_batch_that_declares_more_than_a_batch_is_refused_before_allocating(tmp_path, declared, labels):
    write_cifar10(tmp_path, np.random.default_rng(8))
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_4"
    write_pickle(bad, {"data": declared, "labels": labels})
    assert bad.stat().st_size < 200_000
    with pytest.raises(DataFileError, match=r"data_batch_4 is not a readable CIFAR pickle batch: it declares") \
            as err:
        load_splits("cifar10", tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_of_every_pickle_protocol_load(tmp_path, protocol):
    """The official batches are protocol-2 pickles from Python 2; re-packed copies may use any."""
    batches = write_cifar10(tmp_path, np.random.default_rng(7))
    for name, batch in batches.items():
        with (tmp_path / "cifar-10-batches-py" / name).open("wb") as f:
            pickle.dump({**batch, "labels": np.asarray(batch["labels"], np.int64)}, f, protocol=protocol)
    train, test = load_splits("cifar10", tmp_path)
    assert test.labels.tolist() == batches["test_batch"]["labels"]
    np.testing.assert_array_equal(test.images.numpy().reshape(3, -1), batches["test_batch"]["data"])


# --------------------------------------------------------------------------------------------
# ensure_available
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "one_file"),
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
        ("fashion_mnist", "FashionMNIST/raw/t10k-labels-idx1-ubyte"),
        ("cifar10", "cifar-10-batches-py/data_batch_5"),
        ("cifar100", "cifar-100-python/meta"),
    ],
)
def test_missing_files_raise_with_a_useful_message(tmp_path, name, one_file):
    with pytest.raises(DatasetNotFoundError) as err:
        load_splits(name, tmp_path, download=False)
    message = str(err.value)
    assert str(tmp_path.resolve()) in message
    assert "data.download" in message and "data.root" in message
    assert str(tmp_path.resolve() / one_file) in message
    assert isinstance(err.value, FileNotFoundError)


def test_partially_missing_files_are_flagged(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw, "train", np.zeros((1, 28, 28), np.uint8), np.array([0]))
    with pytest.raises(DatasetNotFoundError) as err:
        ensure_available("mnist", tmp_path, download=False)
    assert "t10k-images-idx3-ubyte  (missing)" in str(err.value)
    assert "train-images-idx3-ubyte  (missing)" not in str(err.value)


def test_present_files_are_checked_by_their_headers(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        write_idx(raw, prefix, np.zeros((3, 28, 28)), np.zeros(3))
    ensure_available("mnist", tmp_path, download=False)
    (raw / "train-labels-idx1-ubyte").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte is not a valid MNIST-format idx file"):
        ensure_available("mnist", tmp_path, download=False)


def test_file_datasets_need_a_root():
    with pytest.raises(ValueError, match="data.root"):
        ensure_available("cifar10", None, download=False)


def test_download_goes_through_torchvision(tmp_path, monkeypatch):
    calls = []

    class FakeMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            raw = Path(root) / "MNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            for prefix in ("train", "t10k"):
                write_idx(raw, prefix, np.zeros((2, 28, 28)), np.zeros(2))

    monkeypatch.setattr(data, "_torchvision_class", lambda name: FakeMNIST)
    ensure_available("mnist", tmp_path / "new", download=True)
    assert calls == [(str((tmp_path / "new").resolve()), True, True)]
    ensure_available("mnist", tmp_path / "new", download=True)  # present now: no second download
    assert len(calls) == 1


def test_failed_download_is_a_dataset_not_found_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(data, "_torchvision_class", lambda name: offline)
    with pytest.raises(DatasetNotFoundError, match="no network") as err:
        ensure_available("cifar100", tmp_path, download=True)
    assert "cifar-100-python" in str(err.value)


# --------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------


def test_split_to_same_device_shares_storage_and_subset_takes_the_head():
    split = toy_split(10)
    moved = split.to("cpu")
    assert moved.images.data_ptr() == split.images.data_ptr()
    assert moved.labels.data_ptr() == split.labels.data_ptr()
    head = split.subset(4)
    assert len(head) == 4 and torch.equal(head.images, split.images[:4])
    assert head.labels.tolist() == [0, 1, 2, 3] and head.images.is_contiguous()
    assert len(split.subset(100)) == 10
    with pytest.raises(ValueError):
        split.subset(0)


# --------------------------------------------------------------------------------------------
# normalize
# --------------------------------------------------------------------------------------------


def test_normalize_known_pixels():
    info = DATASETS["digits"]
    out = normalize(torch.full((2, 1, 8, 8), 8, dtype=torch.uint8), info)
    assert out.dtype == torch.float32 and out.shape == (2, 1, 8, 8)
    torch.testing.assert_close(out, torch.full_like(out, (0.5 - 0.3054) / 0.3761))

    info = DATASETS["cifar10"]
    images = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    images[0, 2] = 255
    out = normalize(images, info)
    torch.testing.assert_close(out[0, 2, 0, 0], torch.tensor((1 - 0.4465) / 0.2616))
    torch.testing.assert_close(out[0, 0, 1, 1], torch.tensor(-0.4914 / 0.2470))


def test_normalize_float_input_is_left_untouched_and_constants_are_cached():
    info = DATASETS["cifar10"]
    raw = torch.rand(2, 3, 4, 4) * 255
    before = raw.clone()
    torch.testing.assert_close(
        normalize(raw, info), normalize(raw.round().byte(), info), atol=0.02, rtol=0
    )
    assert torch.equal(raw, before)
    first = data_transforms._norm_constants(raw.device, info)
    assert all(a is b for a, b in zip(first, data_transforms._norm_constants(raw.device, info), strict=True))


def test_normalize_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="cifar10"):
        normalize(torch.zeros(1, 1, 32, 32, dtype=torch.uint8), DATASETS["cifar10"])


# --------------------------------------------------------------------------------------------
# iterate_batches
# --------------------------------------------------------------------------------------------


def collect(split: Split, batch_size: int, seed: int | None = 0, **kwargs):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return list(iterate_batches(split, batch_size, generator=generator, **kwargs))


def test_shuffled_epoch_covers_every_sample_once_with_images_aligned():
    split = toy_split(23)
    batches = collect(split, 5, shuffle=True)
    labels = torch.cat([y for _, y in batches])
    assert torch.equal(labels.sort().values, torch.arange(23))
    assert not torch.equal(labels, torch.arange(23))
    for x, y in batches:
        assert torch.equal(x, split.images[y].float())


def test_unshuffled_epoch_is_in_order():
    split = toy_split(7)
    batches = collect(split, 3, seed=None, shuffle=False)
    assert [y.tolist() for _, y in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert torch.equal(torch.cat([x for x, _ in batches]), split.images.float())


def test_epochs_without_augmentation_reuse_one_normalised_copy_equal_to_per_batch_normalising(digits):
    train_split = digits[0]
    batches = collect(train_split, 64, shuffle=True)
    cached = train_split.normalized()
    assert cached.data_ptr() == train_split.normalized().data_ptr(), "computed once"
    order = torch.randperm(len(train_split), generator=torch.Generator().manual_seed(0))
    expected = normalize(train_split.images[order], train_split.info)
    assert torch.equal(torch.cat([x for x, _ in batches]), expected)
    assert torch.equal(torch.cat([y for _, y in batches]), train_split.labels[order])
    assert train_split.subset(10)._normalized is None, "a subset normalises its own images"


def test_same_seed_same_batches_other_seed_other_order():
    split = toy_split(40)
    first = collect(split, 8, seed=3, shuffle=True, augment=True)
    second = collect(split, 8, seed=3, shuffle=True, augment=True)
    other = collect(split, 8, seed=4, shuffle=True, augment=True)
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in other]))


@pytest.mark.parametrize(
    ("n", "drop_last", "sizes"),
    [(10, False, [4, 4, 2]), (10, True, [4, 4]), (8, True, [4, 4]), (3, True, []), (0, False, [])],
)
def test_drop_last(n, drop_last, sizes):
    batches = collect(toy_split(n), 4, shuffle=True, drop_last=drop_last)
    assert [len(y) for _, y in batches] == sizes


def test_batch_shapes_and_dtypes_on_a_real_dataset(digits):
    x, y = next(iterate_batches(digits[0], 64, shuffle=False))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64
    torch.testing.assert_close(x, normalize(digits[0].images[:64], digits[0].info))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(toy_split(4), 0, shuffle=False))
    with pytest.raises(ValueError, match="pad"):
        next(iterate_batches(toy_split(4), 2, shuffle=False, augment=True, pad=-1))


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def reference_crop_flip(image: torch.Tensor, top: int, left: int, flip: bool, pad: int):
    """One image the plain way: a black canvas, the image pasted in the middle, a crop, a mirror."""
    c, h, w = image.shape
    canvas = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=image.dtype)
    canvas[:, pad : pad + h, pad : pad + w] = image
    crop = canvas[:, top : top + h, left : left + w]
    return crop.flip(-1) if flip else crop


def test_batched_crop_flip_matches_per_sample_reference():
    pad = 2
    # Every corner and edge offset, with and without a flip.
    grid = [(t, lft, f) for t in range(2 * pad + 1) for lft in range(2 * pad + 1) for f in (0, 1)]
    split = toy_split(len(grid))
    top, left, flip = (torch.tensor(col) for col in zip(*grid, strict=True))
    out = data_transforms.crop_flip(split.images, top, left, flip.bool(), pad)
    assert out.shape == split.images.shape and out.dtype == torch.uint8
    for i, (t, lft, f) in enumerate(grid):
        expected = reference_crop_flip(split.images[i], t, lft, bool(f), pad)
        assert torch.equal(out[i], expected), f"top={t} left={lft} flip={f}"


def test_reference_matches_torchvision_pad_crop_flip():
    # Guard the reference itself against torchvision's RandomCrop(padding=pad) + hflip pipeline.
    from torchvision.transforms.v2 import functional as TF

    image = toy_split(1).images[0]
    h, w = image.shape[1:]
    assert torch.equal(reference_crop_flip(image, 3, 3, False, 3), image)
    for top, left, flip in [(0, 0, False), (6, 1, True), (2, 6, False), (6, 6, True)]:
        expected = TF.crop(TF.pad(image, [3], fill=0), top, left, h, w)
        expected = TF.horizontal_flip(expected) if flip else expected
        assert torch.equal(reference_crop_flip(image, top, left, flip, 3), expected)


def test_iterate_batches_augmentation_replays_the_reference():
    split, pad, batch_size = toy_split(11), 3, 4
    batches = collect(split, batch_size, seed=7, shuffle=False, augment=True, pad=pad)

    # Same seed, same draw order as iterate_batches documents: per batch top, left, flip.
    generator = torch.Generator().manual_seed(7)
    for b, (x, y) in enumerate(batches):
        images = split.images[b * batch_size : (b + 1) * batch_size]
        top, left, flip = data_transforms.draw_crop_flip(len(images), pad, generator, images.device)
        assert 0 <= int(top.min()) and int(top.max()) <= 2 * pad
        expected = torch.stack(
            [
                reference_crop_flip(img, int(t), int(lft), bool(f), pad)
                for img, t, lft, f in zip(images, top, left, flip, strict=True)
            ]
        )
        assert x.shape == images.shape and x.dtype == torch.float32
        assert torch.equal(x, expected.float())
        assert torch.equal(y, split.labels[b * batch_size : (b + 1) * batch_size])


def test_augmented_images_keep_their_labels():
    split = label_coded_split(200)
    batches = collect(split, 32, seed=1, shuffle=True, augment=True, pad=4)
    moved = 0
    for x, y in batches:
        assert x.shape[1:] == TOY.image_shape
        for image, label in zip(x, y, strict=True):
            content = image[image != 0]  # the part of the crop that is not black padding
            assert content.numel() > 0 and (content == label + 1).all()
            moved += int(content.numel() < image.numel())
    assert moved > 100  # most of 200 crops fall partly on padding at pad=4


def test_about_half_the_images_are_flipped():
    # Flips are invisible on constant images; a left-to-right ramp shows them.
    ramp = torch.arange(5, dtype=torch.uint8).expand(400, 3, 6, 5).contiguous()
    ((x, _),) = collect(
        Split(ramp, torch.zeros(400, dtype=torch.int64), TOY),
        400,
        seed=2,
        shuffle=False,
        augment=True,
        pad=0,
    )
    flipped = int((x[:, 0, 0, 0] == 4).sum())
    assert 150 < flipped < 250


def test_augmentation_is_drawn_per_sample():
    split = label_coded_split(64)
    ((x, _),) = collect(split, 64, seed=5, shuffle=False, augment=True, pad=4)
    black_counts = (x == 0).flatten(1).sum(1)
    assert len(set(black_counts.tolist())) > 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_split_with_cuda_generator():
    split = toy_split(50).to("cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    batches = list(iterate_batches(split, 16, shuffle=True, generator=generator, augment=True))
    assert all(x.is_cuda and y.is_cuda for x, y in batches)
    assert torch.equal(torch.cat([y for _, y in batches]).sort().values.cpu(), torch.arange(50))

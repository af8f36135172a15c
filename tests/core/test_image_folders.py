"""The streamed JPEG datasets: both layouts, their transforms and labels, and missing files."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cts_pipeline.core.data.image_folders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    image_folder,
    open_streamed,
)
from cts_pipeline.core.data.registry import DATASETS, DatasetNotFoundError
from cts_pipeline.core.data.splits import iterate_batches, load_splits
from cts_pipeline.core.device.runtime import generator

WNIDS = ("n01443537", "n01629819")


def jpeg(path: Path, value: int, size: int = 72, noise: int = 0) -> None:
    """A flat JPEG of grey ``value``; with ``noise``, seeded random pixels around it (crops then differ)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size, size, 3), value, dtype=np.int16)
    if noise:
        rng = np.random.default_rng(zlib.crc32(path.name.encode()))
        pixels = pixels + rng.integers(-noise, noise + 1, pixels.shape)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=95)


def tiny_imagenet(root: Path, per_class: int = 3, noise: int = 0) -> None:
    base = root / "tiny-imagenet-200"
    annotations = []
    for label, wnid in enumerate(WNIDS):
        for i in range(per_class):
            jpeg(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", 40 + 100 * label, 64, noise)
        jpeg(base / "val" / "images" / f"val_{label}.JPEG", 40 + 100 * label, 64)
        annotations.append(f"val_{label}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (base / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")


def imagenet(root: Path) -> None:
    for split, count in (("train", 2), ("val", 1)):
        for label, wnid in enumerate(WNIDS):
            for i in range(count):
                jpeg(root / "imagenet" / split / wnid / f"{split}_{i}.JPEG", 40 + 100 * label, 300)


def test_tiny_imagenet_train_and_val_have_their_labels_and_sizes(tmp_path):
    tiny_imagenet(tmp_path)
    train = image_folder("tiny_imagenet", tmp_path, "train")
    val = image_folder("tiny_imagenet", tmp_path, "val")
    assert len(train) == 6 and len(val) == 2
    assert [label for _, label in val.samples] == [0, 1], "validation labels come from the annotations"
    image, label = val[1]
    assert image.shape == (3, 64, 64) and label == 1
    # Evaluation only resizes and crops a flat image; the pixels stay uint8 (normalised on the device).
    assert image.dtype == torch.uint8 and torch.allclose(image.float().mean(dim=(1, 2)), torch.tensor(140.0), atol=8)
    assert train[0][0].shape == (3, 64, 64)


def test_streamed_batches_cross_as_uint8_and_are_normalised_on_the_device(tmp_path):
    """Issue 20, item 8: the loader workers decode and crop only; a quarter of float32's bytes
    cross to the device, where the batch is normalised, with a deeper prefetch queue."""
    from cts_pipeline.core.data.image_folders import PREFETCH_BATCHES

    tiny_imagenet(tmp_path)
    train = load_splits("tiny_imagenet", tmp_path)[1].with_workers(1)
    x, y = next(iter(iterate_batches(train, 2, shuffle=False)))
    [loader] = train._loaders.values()
    assert loader.prefetch_factor == PREFETCH_BATCHES and loader.num_workers == 1
    raw, _ = next(iter(loader))
    assert raw.dtype == torch.uint8 and x.dtype == torch.float32
    expected = (140 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[1].mean(dim=(1, 2)), expected, atol=0.03)
    torch.testing.assert_close(train.take(torch.tensor([0, 1])), x)


def test_imagenet_layout_crops_to_224_and_streams_in_batches(tmp_path):
    imagenet(tmp_path)
    val = image_folder("imagenet", tmp_path, "val")
    assert len(val) == 2 and val[0][0].shape == (3, 224, 224)
    train, test = load_splits("imagenet", tmp_path)
    assert train.streamed and len(train) == 4 and len(test) == 2
    loader_batches = list(iterate_batches(train.with_workers(2), 2, shuffle=True, augment=True,
                                          generator=generator("cpu", 0, "data-order", 0)))
    assert len(loader_batches) == 2 and loader_batches[0][0].shape == (2, 3, 224, 224)
    loader = next(iter(train.with_workers(2)._loaders.values()), None)
    assert loader is None, "with_workers gives a split of its own"


def epoch(split, seed, epoch_number, augment=True, batch_size=4):
    return list(iterate_batches(split, batch_size, shuffle=True, augment=augment,
                                generator=generator("cpu", seed, "data-order", epoch_number)))


def test_an_epoch_depends_on_the_seed_and_epoch_only_not_on_the_workers(tmp_path):
    tiny_imagenet(tmp_path, per_class=4, noise=60)
    train, _ = load_splits("tiny_imagenet", tmp_path)
    in_process, with_workers = epoch(train.with_workers(0), 0, 3), epoch(train.with_workers(2), 0, 3)
    for (x0, y0), (x2, y2) in zip(in_process, with_workers, strict=True):
        assert torch.equal(y0, y2) and torch.equal(x0, x2), "random crops drawn per sample, not per worker"
    again = train.with_workers(2)
    epoch(again, 0, 2)  # a persistent loader that has run another epoch first replays epoch 3 alike
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch(again, 0, 3), in_process, strict=True))
    other = epoch(train.with_workers(0), 0, 4)
    assert not all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(other, in_process, strict=True)), \
        "another epoch, another order and crops"
    labels = torch.cat([y for _, y in in_process])
    assert sorted(labels.tolist()) == sorted(train.labels.tolist()), "every image once per epoch"


def test_evaluation_batches_are_in_order_and_deterministic(tmp_path):
    tiny_imagenet(tmp_path, noise=60)
    _, val = load_splits("tiny_imagenet", tmp_path)
    val = val.with_workers(0)
    batches = list(iterate_batches(val, 1, shuffle=False))
    assert [int(y) for _, y in batches] == [0, 1]
    assert torch.equal(batches[0][0], list(iterate_batches(val, 1, shuffle=False))[0][0])


def test_a_subset_is_spread_over_the_classes(tmp_path):
    tiny_imagenet(tmp_path, per_class=4)
    train, _ = load_splits("tiny_imagenet", tmp_path)
    subset = train.subset(4)
    assert subset.labels.tolist() == [0, 0, 1, 1] and subset.indices == [0, 2, 4, 6]
    assert subset.take(torch.tensor([3])).shape == (1, 3, 64, 64)
    reopened = open_streamed(DATASETS["tiny_imagenet"], tmp_path, "train", indices=subset.indices,
                             digest=subset.digest)
    assert reopened.labels.tolist() == subset.labels.tolist()


def test_a_prepared_split_refuses_a_changed_folder(tmp_path):
    tiny_imagenet(tmp_path)
    train, _ = load_splits("tiny_imagenet", tmp_path)
    extra = tmp_path / "tiny-imagenet-200" / "train" / WNIDS[0] / "images" / "added.JPEG"
    jpeg(extra, 10, 64)
    with pytest.raises(ValueError, match="changed since the data were prepared"):
        open_streamed(DATASETS["tiny_imagenet"], tmp_path, "train", digest=train.digest)


def test_the_search_reads_training_images_with_evaluation_transforms(tmp_path):
    tiny_imagenet(tmp_path)
    searched = image_folder("tiny_imagenet", tmp_path, "train", stage="eval")
    first, second = searched[0][0], searched[0][0]
    assert torch.equal(first, second), "no random crop or flip in the search"


@pytest.mark.parametrize("name", ["tiny_imagenet", "imagenet"])
def test_missing_files_are_listed(tmp_path, name):
    with pytest.raises(DatasetNotFoundError, match=r"(?s)not found under data.root .*\(missing\)"):
        image_folder(name, tmp_path, "val")


def test_a_bad_annotation_line_is_named(tmp_path):
    tiny_imagenet(tmp_path)
    (tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\n")
    with pytest.raises(ValueError, match=r"val_annotations.txt line 1: .*wnid of the training set"):
        image_folder("tiny_imagenet", tmp_path, "val")


def test_a_resumed_streamed_training_equals_an_uninterrupted_one(tmp_path):
    """The order and every crop of an epoch depend on (seed, epoch) only, so resuming from the
    per-epoch checkpoint replays what the uninterrupted run saw."""
    from cts_pipeline.core.artifacts.checkpoints import Checkpoint
    from cts_pipeline.core.nets.registry import build_model
    from cts_pipeline.core.train.loop import train
    from cts_pipeline.core.train.recipe import TrainRecipe

    tiny_imagenet(tmp_path / "images", per_class=4, noise=60)
    train_split, test_split = (s.with_workers(1) for s in load_splits("tiny_imagenet", tmp_path / "images"))
    recipe = TrainRecipe(epochs=3, batch_size=4, lr=0.05, augment=True)

    def network():
        return build_model("convnet", image_shape=(3, 64, 64), num_classes=200, width=4,
                           generator=torch.Generator().manual_seed(0))

    whole = network()
    train(whole, train_split, test_split, recipe, seed=0, stage="whole", progress=False)

    class Stop(Exception):
        pass

    def stop_after_two(epoch, _model):
        if epoch == 2:
            raise Stop

    checkpoint = Checkpoint(tmp_path / "train.pt", "key")
    with pytest.raises(Stop):
        train(network(), train_split, test_split, recipe, seed=0, stage="cut", progress=False,
              checkpoint=checkpoint, on_epoch_end=stop_after_two)
    resumed = network()
    result = train(resumed, train_split, test_split, recipe, seed=0, stage="resumed", progress=False,
                   checkpoint=checkpoint)
    assert result.resumed_at == 2
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def _labels_in_a_daemon(split, queue) -> None:
    queue.put([y.tolist() for _, y in iterate_batches(split, 2, shuffle=True,
                                                     generator=generator("cpu", 0, "data-order", 0))])


def test_a_daemonic_process_reads_in_process_instead_of_failing(tmp_path):
    """A Dask worker is daemonic by default and may not start DataLoader workers."""
    import multiprocessing

    tiny_imagenet(tmp_path)
    train, _ = load_splits("tiny_imagenet", tmp_path)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    daemon = context.Process(target=_labels_in_a_daemon, args=(train.with_workers(2), queue), daemon=True)
    daemon.start()
    labels = queue.get(timeout=60)
    daemon.join(timeout=60)
    assert daemon.exitcode == 0
    assert labels == [y.tolist() for _, y in iterate_batches(train.with_workers(0), 2, shuffle=True,
                                                             generator=generator("cpu", 0, "data-order", 0))]


def test_the_authors_training_crop_and_a_runs_normalisation_reach_the_streamed_batches(tmp_path):
    """data.resized_crop: authors gives their ImageNet crop (the longer side to 500 pixels, then
    scale (0.1, 1) and ratio (0.8, 1.25)); data.mean / data.std normalise the streamed batches too."""
    import dataclasses

    from torchvision.transforms import v2

    from cts_pipeline.core.data.image_folders import transforms_for

    steps = transforms_for("imagenet", "train", resized_crop="authors").transforms
    resize = next(t for t in steps if type(t) is v2.Resize)
    crop = next(t for t in steps if isinstance(t, v2.RandomResizedCrop))
    assert resize.max_size == 500 and resize.size is None
    assert crop.scale == (0.1, 1.0) and crop.ratio == (0.8, 1.25) and crop.size == (224, 224)
    default = transforms_for("imagenet", "train").transforms
    assert not any(type(t) is v2.Resize for t in default)
    assert next(t for t in default if isinstance(t, v2.RandomResizedCrop)).scale == (0.08, 1.0)

    imagenet(tmp_path)
    info = dataclasses.replace(DATASETS["imagenet"], mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    split = open_streamed(info, tmp_path, "train", workers=0, resized_crop="authors")
    assert split.dataset("train").transform.transforms[1].max_size == 500
    x, y = next(iter(iterate_batches(split, 4, shuffle=False)))  # evaluation transforms: flat images
    means = x.mean(dim=(2, 3))
    expected = torch.tensor([(40 / 255 - 0.5) / 0.25 if label == 0 else (140 / 255 - 0.5) / 0.25 for label in y])
    assert torch.allclose(means, expected[:, None].expand_as(means), atol=0.03)


def test_the_authors_crop_is_refused_for_in_memory_datasets():
    from cts_pipeline.config.sections import DataConfig

    with pytest.raises(ValueError, match="data.resized_crop applies to image-folder datasets; cifar10"):
        DataConfig(name="cifar10", resized_crop="authors")
    with pytest.raises(ValueError, match="data.resized_crop must be torchvision or authors"):
        DataConfig(name="imagenet", resized_crop="tlab")


def test_tiny_imagenet_is_evaluated_whole_and_takes_the_authors_crop():
    """Tiny-ImageNet's images are the model's 64 pixels: evaluation keeps every pixel (the
    ImageNet-style 256/224 resize only cut the borders); the authors' training crop there is
    scale (0.6, 1), ratio (0.8, 1.25) (TLAB 68c9740 data/tiny_imagenet.py:72-73)."""
    from torchvision.transforms import v2

    from cts_pipeline.core.data.image_folders import transforms_for

    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(transforms_for("tiny_imagenet", "eval")(image), image)
    crop = next(t for t in transforms_for("tiny_imagenet", "train", resized_crop="authors").transforms
                if isinstance(t, v2.RandomResizedCrop))
    assert crop.scale == (0.6, 1.0) and crop.ratio == (0.8, 1.25) and crop.size == (64, 64)
    imagenet_eval = transforms_for("imagenet", "eval").transforms
    assert next(t for t in imagenet_eval if type(t) is v2.Resize).size == [256]


def test_loader_workers_and_prefetch_are_cut_to_fit_the_shared_memory(tmp_path, monkeypatch, caplog):
    """A container's /dev/shm (64 MB by default) cannot hold 15 workers × 4 batches of ImageNet
    images: the workers die with a bus error. The loader takes as many batches in flight as fit a
    third of the free space (a run keeps three loaders), says so in one line, and reads the same
    epoch."""
    from cts_pipeline.core.data import shared_memory

    tiny_imagenet(tmp_path, per_class=4, noise=60)
    train, _ = load_splits("tiny_imagenet", tmp_path)
    expected = epoch(train.with_workers(0), 0, 3)
    batch_bytes = 4 * (3 * 64 * 64 + 8)
    monkeypatch.setattr(shared_memory, "free_shared_memory", lambda path=None: 3 * 5 * batch_bytes)  # 5 batches each
    tight = train.with_workers(2)
    with caplog.at_level("WARNING"):
        batches = epoch(tight, 0, 3)
    (loader,) = tight._loaders.values()
    assert (loader.num_workers, loader.prefetch_factor) == (2, 2)
    (line,) = [r.getMessage() for r in caplog.records if r.name.endswith("shared_memory")]
    assert line.startswith("tiny_imagenet train training loader: 2 workers x 4 batches of ")
    assert "do not fit a third of the 1 MB free in /dev/shm" in line and "using 2 workers x 2 batches" in line
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, expected, strict=True))
    monkeypatch.setattr(shared_memory, "free_shared_memory", lambda path=None: batch_bytes)  # not one batch
    none_fit = train.with_workers(2)
    epoch(none_fit, 0, 3)
    assert next(iter(none_fit._loaders.values())).num_workers == 0


def test_a_loader_that_fits_the_shared_memory_is_left_as_asked():
    from cts_pipeline.core.data.shared_memory import LoaderPlan, fit_loader

    assert fit_loader(15, 4, 2**20, what="x", free=2**30) == LoaderPlan(15, 4)
    assert fit_loader(15, 4, 150 * 2**20, what="x", free=64 * 2**20) == LoaderPlan(0, 4)


def test_taking_images_decodes_them_in_the_loaders_workers(tmp_path, monkeypatch):
    """``take`` (the batched-search probe's 1024 images, SNIP's and GraSP's batches) read JPEGs one
    by one in the main process; it now reads them through the loader's workers, as the epochs do,
    with the same images in the same order."""
    import os

    from cts_pipeline.core.data import image_folders

    tiny_imagenet(tmp_path, per_class=4, noise=60)
    train, _ = load_splits("tiny_imagenet", tmp_path)
    pids = tmp_path / "decoded-in"
    original = image_folders.transforms_for

    def noting_the_process(*args, **kwargs):
        transform = original(*args, **kwargs)

        def decode(image):
            with open(pids, "a") as f:
                f.write(f"{os.getpid()}\n")
            return transform(image)

        return decode

    index = torch.tensor([5, 0, 7, 2])
    in_process = train.with_workers(0).take(index)
    monkeypatch.setattr(image_folders, "transforms_for", noting_the_process)
    with_workers = train.with_workers(2).take(index)
    assert torch.equal(in_process, with_workers)
    decoded_in = set(pids.read_text().split())
    assert len(pids.read_text().split()) == 4 and str(os.getpid()) not in decoded_in

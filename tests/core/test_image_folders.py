"""The streamed JPEG datasets: both layouts, their transforms and labels, and missing files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cts_pipeline.core.data import DatasetNotFoundError
from cts_pipeline.core.image_folders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    image_folder,
    streaming_loader,
)

WNIDS = ("n01443537", "n01629819")


def jpeg(path: Path, value: int, size: int = 72) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path, "JPEG", quality=95)


def tiny_imagenet(root: Path) -> None:
    base = root / "tiny-imagenet-200"
    annotations = []
    for label, wnid in enumerate(WNIDS):
        for i in range(3):
            jpeg(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", 40 + 100 * label, 64)
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
    # Evaluation only resizes and crops a flat image: every pixel is the normalised value.
    expected = (140 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(image.mean(dim=(1, 2)), expected, atol=0.03)
    assert train[0][0].shape == (3, 64, 64)


def test_imagenet_layout_crops_to_224_and_streams_in_batches(tmp_path):
    imagenet(tmp_path)
    val = image_folder("imagenet", tmp_path, "val")
    assert len(val) == 2 and val[0][0].shape == (3, 224, 224)
    loader = streaming_loader(image_folder("imagenet", tmp_path, "train"), batch_size=2, shuffle=True, workers=2)
    assert loader.persistent_workers and loader.num_workers == 2
    batches = list(loader)
    assert len(batches) == 2 and batches[0][0].shape == (2, 3, 224, 224)
    again = [y.tolist() for _, y in streaming_loader(image_folder("imagenet", tmp_path, "train"), batch_size=2,
                                                     shuffle=True, workers=0)]
    assert again == [y.tolist() for _, y in batches], "the shuffled order depends on the seed only"


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

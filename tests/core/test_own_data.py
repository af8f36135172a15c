"""Someone's own data and model settings, piece by piece: the prunable selection, a state dict to
start from, an image folder and Kedro catalog entries (``tests/test_own_everything.py`` runs them
through the pipelines)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from cts_pipeline.core.data import tables, user_folders
from cts_pipeline.core.data.registry import DataFileError
from cts_pipeline.core.nets.masks import count_prunable, prunable_parameters
from cts_pipeline.core.nets.selection import select_prunable, selected_names
from cts_pipeline.core.nets.weights import load_weights, weights_digest

from ..own_models import tiny_transformer

# --------------------------------------------------------------------------------------------
# model.prunable


def test_a_module_type_picks_its_weight_matrices_never_biases_or_norms():
    net = tiny_transformer(10, (1, 8, 8), width=16)
    assert selected_names(net, ["Linear"]) == ["embed.weight", "attention.out_proj.weight", "head.weight"]
    assert selected_names(net, ["MultiheadAttention"]) == ["attention.in_proj_weight", "attention.out_proj.weight"]
    with pytest.raises(ValueError, match="'LayerNorm' matches no module type"):
        selected_names(net, ["LayerNorm"])


def test_names_globs_and_parameter_names_combine_in_the_models_order():
    net = tiny_transformer(10, (1, 8, 8), width=16)
    picked = selected_names(net, ["head", "*.in_proj_weight", "emb*"])
    assert picked == ["embed.weight", "attention.in_proj_weight", "head.weight"]
    # a container's name picks every weight matrix inside it
    resnet = torchvision_resnet18()
    inside = selected_names(resnet, ["layer1", "fc"])
    assert inside == [n for n in prunable_parameters(resnet) if n.startswith("layer1.")] + ["fc.weight"]
    assert len(inside) == 5


def torchvision_resnet18() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(num_classes=3)


def test_the_selection_is_what_every_method_sees():
    net = select_prunable(tiny_transformer(10, (1, 8, 8), width=16), ["*.in_proj_weight", "head"])
    assert list(prunable_parameters(net)) == ["attention.in_proj_weight", "head.weight"]
    assert count_prunable(net) == 48 * 16 + 10 * 16
    default = tiny_transformer(10, (1, 8, 8), width=16)
    assert "attention.in_proj_weight" not in prunable_parameters(default)


def test_an_entry_that_picks_nothing_is_named_with_the_layers_there_are():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(36, 2))
    with pytest.raises(ValueError, match=r"'conv\*' matches no module type, module or parameter .*0, 2"):
        select_prunable(net, ["Linear", "conv*"])


def test_attention_is_a_layer_the_stacked_layout_does_not_know():
    """``MultiheadAttention`` holds a Linear (``out_proj``) but runs its own forward on its own
    ``in_proj_weight``: rows stacked in the channel dimension would go through it wrongly."""
    from cts_pipeline.core.train.stacked import supports, unsupported_layers

    class Attending(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.attention(x, x, x, need_weights=False)[0].mean(1))

    assert unsupported_layers(Attending()) == ["MultiheadAttention"] and not supports(Attending())
    assert supports(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 2)))
    assert unsupported_layers(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))) == ["grouped Conv2d"]


# --------------------------------------------------------------------------------------------
# model.weights


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_state_dict_file_is_loaded_whole(tmp_path, suffix):
    from safetensors.torch import save_file

    source = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    path = tmp_path / f"start{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), path)
    else:
        torch.save({"epoch": 3, "state_dict": source.state_dict()}, path)  # a training checkpoint around it
    target = load_weights(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), path)
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor)


def test_a_file_that_does_not_fit_names_the_mismatch(tmp_path):
    from safetensors.torch import save_file

    save_file(nn.Linear(4, 3).state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="does not fit the model: .*0.weight"):
        load_weights(nn.Sequential(nn.Linear(4, 3)), tmp_path / "other.safetensors")
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ValueError, match="is not a safetensors file or a state dict"):
        load_weights(nn.Linear(4, 3), tmp_path / "notes.txt")


def test_the_weights_digest_follows_the_contents(tmp_path):
    import os

    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(3)}, path)
    first = weights_digest(path)
    torch.save({"w": torch.ones(3)}, path)
    os.utime(path, ns=(1, 1))  # another modification time, as a rewritten file has
    assert weights_digest(path) != first


# --------------------------------------------------------------------------------------------
# data.name: image_folder


def write_folder(root: Path, sizes: dict[str, list[tuple[int, int]]], mode: str = "RGB") -> None:
    """``train/<class>/`` and ``val/<class>/`` with one image per listed (width, height)."""
    for split in ("train", "val"):
        for label, listed in sizes.items():
            folder = root / split / label
            folder.mkdir(parents=True)
            for i, size in enumerate(listed):
                rng = np.random.default_rng([i, len(label), ord(label[0]), len(split)])
                shape = (size[1], size[0]) + (() if mode == "L" else (3,))
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")


def test_a_folder_finds_its_classes_the_most_common_size_and_grey_channels(tmp_path):
    write_folder(tmp_path, {"b": [(12, 10), (12, 10)], "a": [(12, 10), (30, 30)]}, mode="L")
    found = user_folders.scan(tmp_path)
    assert found.classes == ("a", "b") and found.image_shape == (1, 10, 12) and found.test_folder == "val"
    train, test, info = user_folders.load(found)
    assert train[0].shape == (4, 1, 10, 12) and train[1].tolist() == [0, 0, 1, 1]
    assert info.num_classes == 2 and info.image_shape == (1, 10, 12)
    pixels = train[0].double() / 255
    assert info.mean == pytest.approx([pixels.mean().item()]) and info.std == pytest.approx([pixels.std(correction=0).item()])
    assert user_folders.scan(tmp_path, 8).image_shape == (1, 8, 8)
    assert user_folders.scan(tmp_path, (6, 4)).image_shape == (1, 6, 4)


def test_a_folder_too_large_for_memory_is_streamed_with_the_same_pixels(tmp_path, monkeypatch):
    """Above IN_MEMORY_BYTES the folder is read batch by batch: evaluation sees exactly the pixels
    the in-memory decoding gives (the same resize), with the training sample's statistics."""
    from cts_pipeline.core.data.transforms import normalize

    write_folder(tmp_path, {"a": [(16, 16), (20, 12), (16, 16)], "b": [(16, 16), (16, 16), (9, 30)]})
    found = user_folders.scan(tmp_path)
    assert not user_folders.streams(found)
    (images, labels), (test_images, test_labels), held = user_folders.load(found)
    monkeypatch.setattr(user_folders, "IN_MEMORY_BYTES", found.pixel_bytes - 1)
    assert user_folders.streams(found)
    info = user_folders.streamed_info(found)
    assert info.streamed and info.mean == pytest.approx(held.mean) and info.std == pytest.approx(held.std)
    train = user_folders.open_streamed(info, tmp_path, "train", workers=0)
    test = user_folders.open_streamed(info, tmp_path, "test", workers=0)
    assert torch.equal(train.labels, labels) and torch.equal(test.labels, test_labels)
    everything = torch.arange(len(labels))
    assert torch.equal(train.take(everything), normalize(images, info))
    (x, y), = list(test.batches(len(test), shuffle=False))
    assert torch.equal(x, normalize(test_images, info)) and torch.equal(y, test_labels)
    crops = torch.cat([x for x, _ in train.batches(2, shuffle=True, augment=True, generator=torch.Generator().manual_seed(0))])
    assert crops.shape == images.shape  # random resized crops of the same size
    (tmp_path / "train" / "a" / "3.png").write_bytes((tmp_path / "train" / "a" / "0.png").read_bytes())
    with pytest.raises(DataFileError, match="changed since the data were prepared"):
        user_folders.open_streamed(info, tmp_path, "train", digest=train.digest, workers=0)


def test_test_classes_that_training_lacks_are_refused(tmp_path):
    write_folder(tmp_path, {"a": [(8, 8)], "b": [(8, 8)]})
    (tmp_path / "val" / "c").mkdir()
    with pytest.raises(DataFileError, match=r"class folders \['c'\] are not among train's classes"):
        user_folders.scan(tmp_path)


# --------------------------------------------------------------------------------------------
# data.name: catalog


def test_a_table_numbers_its_labels_in_sorted_order():
    train = pd.DataFrame({"x": [0.5, 1.0, 2.0], "y": [1, 2, 3], "kind": ["dog", "cat", "dog"]})
    test = pd.DataFrame({"x": [4.0], "y": [5], "kind": ["cat"]})
    (x, labels), (xt, test_labels), info, classes = tables.load(train, test, "kind", ("tr", "te"))
    assert classes == ["cat", "dog"] and labels.tolist() == [1, 0, 1] and test_labels.tolist() == [0]
    assert x.dtype == torch.float32 and x.tolist() == [[0.5, 1.0], [1.0, 2.0], [2.0, 3.0]]
    assert info.image_shape == (2,) and info.num_classes == 2 and info.inputs_ready


def test_a_dict_of_tensors_is_taken_as_it_is():
    g = torch.Generator().manual_seed(0)
    train = {"inputs": torch.randn(6, 3, 4, generator=g), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    test = {"x": np.ones((2, 3, 4)), "y": np.array([2, 0])}
    (x, labels), (xt, test_labels), info, _ = tables.load(train, test, "label", ("tr", "te"))
    assert torch.equal(x, train["inputs"]) and labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert info.image_shape == (3, 4) and test_labels.tolist() == [2, 0]


@pytest.mark.parametrize(("train", "message"), [
    (pd.DataFrame({"x": [1.0, 2.0], "label": [0, 1]}).assign(x=[1.0, np.nan]), "rows have a missing or infinite feature"),
    (pd.DataFrame({"x": [1.0, 2.0], "label": [0, 0]}), "the training labels hold 1 class"),
    ({"inputs": torch.ones(2, 3)}, "a dict of tensors needs one of"),
    ([1, 2, 3], "loads a list"),
])
def test_a_table_that_cannot_train_a_classifier_is_named(train, message):
    test = pd.DataFrame({"x": [1.0], "label": [0]})
    with pytest.raises(DataFileError, match=message):
        tables.load(train, test, "label", ("tr", "te"))


def test_a_test_label_training_never_shows_is_refused():
    train = pd.DataFrame({"x": [1.0, 2.0], "label": ["a", "b"]})
    with pytest.raises(DataFileError, match=r"the test labels \['z'\] never occur in the training data"):
        tables.load(train, pd.DataFrame({"x": [1.0], "label": ["z"]}), "label", ("tr", "te"))


def test_the_contents_digest_sees_one_changed_value():
    frame = pd.DataFrame({"x": [1.0, 2.0], "label": [0, 1]})
    changed = frame.assign(x=[1.0, 2.5])
    assert tables.contents_digest(frame, frame) == tables.contents_digest(frame.copy(), frame)
    assert tables.contents_digest(frame, frame) != tables.contents_digest(changed, frame)


def test_a_parquet_file_and_a_pickled_dict_of_tensors_load_through_kedro_datasets(tmp_path):
    """The two other kinds of entry the README names, loaded by Kedro's own datasets as the
    catalog loads them: ``pandas.ParquetDataset`` and a dict of tensors (``pickle.PickleDataset``)."""
    from kedro_datasets.pandas import ParquetDataset
    from kedro_datasets.pickle import PickleDataset

    frame = pd.DataFrame({"a": [0.5, 1.5, 2.5, 3.5], "b": [1, 0, 1, 0], "label": ["x", "y", "x", "y"]})
    table = ParquetDataset(filepath=str(tmp_path / "t.parquet"))
    table.save(frame)
    tensors = PickleDataset(filepath=str(tmp_path / "t.pkl"))
    tensors.save({"inputs": torch.arange(8.0).reshape(4, 2), "labels": torch.tensor([1, 0, 1, 0])})
    (x, labels), _, info, classes = tables.load(table.load(), table.load(), "label", ("tr", "te"))
    assert classes == ["x", "y"] and labels.tolist() == [0, 1, 0, 1] and x[:, 1].tolist() == [1.0, 0.0, 1.0, 0.0]
    (x, labels), _, info, _ = tables.load(tensors.load(), tensors.load(), "label", ("tr", "te"))
    assert x.tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]] and labels.tolist() == [1, 0, 1, 0]

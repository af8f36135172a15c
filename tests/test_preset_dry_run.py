"""Each GPU preset's recipe, shrunk, run end to end on the CPU before anyone pays for a GPU.

The preset's own sections (model options, BatchNorm handling, virtual ranks, crop padding, the
search's schedule) go through the project's config layer unchanged; only the sizes shrink: a few
random 32-pixel images of the dataset's channels, 2 epochs of one batch of 8 (1 to search),
milestones and the rewind point inside them. Dense training to the rewind point, a search at the
grid's first sparsity, the mask, one retraining: what `kedro run --pipelines=cts`
does with the preset, minus the files.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from cts_pipeline.config.sections import typed_sections
from cts_pipeline.core.cts import concrete_search
from cts_pipeline.core.data.registry import get_dataset_info
from cts_pipeline.core.data.splits import Split
from cts_pipeline.core.nets.masks import count_prunable, global_topk_mask, kept_count
from cts_pipeline.core.train.loop import evaluate, train

ROOT = Path(__file__).resolve().parents[1]
GPU_PRESETS = ("cifar10_resnet20", "cifar10_vgg16", "cifar100_resnet20", "imagenet_resnet50",
               "tiny_imagenet_resnet18")


def preset_sections(preset: str) -> dict:
    params = yaml.safe_load((ROOT / "conf" / "base" / "parameters.yml").read_text())
    for section, values in yaml.safe_load((ROOT / "conf" / preset / "parameters.yml").read_text()).items():
        if isinstance(values, dict) and isinstance(params.get(section), dict):
            params[section].update(values)
        else:
            params[section] = values
    return typed_sections(params)


def tiny_split(info, n: int, side: int, seed: int) -> Split:
    info = dataclasses.replace(info, image_shape=(info.image_shape[0], side, side))
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, info.image_shape[0], side, side), dtype=torch.uint8, generator=g)
    return Split(images=images, labels=torch.randint(0, info.num_classes, (n,), generator=g), info=info)


# Every preset with its ranks one after another (auto, on a CPU), and in one pass (ghost BatchNorm, the
# search's ranks as rows) on the two kinds of network the others share (ResNet, VGG).
@pytest.mark.parametrize(("preset", "rank_passes"), [(p, "auto") for p in GPU_PRESETS] + [
    ("cifar10_resnet20", "one"), ("cifar10_vgg16", "one")])
def test_gpu_preset_runs_end_to_end_on_cpu(preset, rank_passes):
    sections = preset_sections(preset)
    data, model_config, recipe, search = (sections[k] for k in ("data", "model", "training", "cts"))
    assert recipe.virtual_ranks == 4 and model_config.options["bn_running_stats"] is False
    assert search.schedule == "authors"
    info = get_dataset_info(data.name)
    if data.std is not None:
        info = dataclasses.replace(info, std=data.std, mean=data.mean or info.mean)
    train_split, test_split = tiny_split(info, 8, 32, 0), tiny_split(info, 8, 32, 1)  # one batch each
    small = dataclasses.replace(recipe, epochs=2, batch_size=8, milestones=[1], rewind_epoch=1,
                                warmup_epochs=min(recipe.warmup_epochs, 1), eval_batch_size=8, eval_every=1)

    net = model_config.build(train_split.info.image_shape, info.num_classes, generator=torch.Generator().manual_seed(0))
    dense = train(net, train_split, test_split, small, seed=0, stage=f"{preset} dense", progress=False,
                  snapshot_epochs={1}, rank_passes=rank_passes)
    theta_k = dense.snapshots[1]
    net.load_state_dict(theta_k)
    density = 1 - sections["grid"].sparsities[0]  # one: the batched search has its own tests
    found = concrete_search(net, train_split, density=density, config=dataclasses.replace(search, epochs=1),
                            recipe=small, seed=0, progress=False, rank_passes=rank_passes)
    assert found.ranks_as_rows == (rank_passes == "one")
    mask = global_topk_mask(found.scores, density)
    assert sum(int(m.sum()) for m in mask.values()) == kept_count(density, count_prunable(net))
    ticket = copy.deepcopy(net)
    retrained = train(ticket, train_split, test_split, small, seed=0, stage=f"{preset} ticket", progress=False,
                      start_epoch=1, mask=mask, rank_passes=rank_passes)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in dense.history + retrained.history)
    weights = dict(ticket.named_parameters())
    for name, keep in mask.items():  # the ticket trained its kept weights and held the others at zero
        assert not weights[name][~keep].any(), f"{name}: a pruned weight moved"
        if keep.any():  # (at the preset's sparsity a layer of ResNet-50 may keep nothing)
            assert not torch.equal(weights[name][keep], theta_k[name][keep]), f"{name}: its kept weights never trained"
    # The recorded accuracy is the ticket's, on its 8 test images (a multiple of 12.5 %).
    assert retrained.final["test_accuracy"] == evaluate(ticket, test_split, 8)["accuracy"]
    assert retrained.final["test_accuracy"] / 12.5 == round(retrained.final["test_accuracy"] / 12.5)

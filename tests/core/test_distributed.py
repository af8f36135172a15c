"""One training over two gloo processes against one process: the same weights, loss and accuracy.

LeNet-300-100 has no BatchNorm, so splitting each global batch over the ranks changes nothing but
float rounding (docs/architecture.md, "One training over several processes")."""

from __future__ import annotations

import os

import pytest
import torch

from cts_pipeline.core.data.registry import DATASETS
from cts_pipeline.core.data.splits import Split
from cts_pipeline.core.device.distributed import launch, rank_and_world, shard
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.train.loop import train
from cts_pipeline.core.train.recipe import TrainRecipe
from tests.equivalence import assert_equivalent_masks

RECIPE = TrainRecipe(epochs=2, batch_size=50, lr=0.05, milestones=[1], weight_decay=1e-4, grad_clip_norm=5.0)


def splits() -> tuple[Split, Split]:
    generator = torch.Generator().manual_seed(0)
    info = DATASETS["digits"]
    images = torch.randint(0, 17, (230, 1, 8, 8), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (230,), generator=generator)
    return Split(images[:200], labels[:200], info), Split(images[200:], labels[200:], info)


def train_lenet(recipe: TrainRecipe) -> tuple[dict, list[dict], int]:
    torch.set_num_threads(1)
    train_split, test_split = splits()
    model = build_model("lenet_300_100", image_shape=(1, 8, 8), num_classes=10,
                        generator=torch.Generator().manual_seed(1))
    result = train(model, train_split, test_split, recipe, seed=0, stage="ddp test", progress=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, result.history, rank_and_world()[1]


def train_lenet_interrupted_then_resumed(recipe: TrainRecipe, path) -> tuple[dict, int | None]:
    """Every rank stops after epoch 1 (rank 0 has checkpointed it), then resumes: rank 0 reads the
    checkpoint and broadcasts it, so no rank needs to see rank 0's disk."""
    from cts_pipeline.core.artifacts.checkpoints import Checkpoint

    class Stop(Exception):
        pass

    def stop(epoch, _model):
        if epoch == 1:
            raise Stop

    torch.set_num_threads(1)
    train_split, test_split = splits()
    checkpoint = Checkpoint(path, "key")
    for attempt in ("interrupted", "resumed"):
        model = build_model("lenet_300_100", image_shape=(1, 8, 8), num_classes=10,
                            generator=torch.Generator().manual_seed(1))
        try:
            result = train(model, train_split, test_split, recipe, seed=0, stage=f"ddp {attempt}", progress=False,
                           checkpoint=checkpoint, on_epoch_end=stop if attempt == "interrupted" else None)
        except Stop:
            continue
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, result.resumed_at


@pytest.mark.cross_path
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_two_gloo_processes_train_like_one(reduction, tmp_path):
    from dataclasses import replace

    recipe = replace(RECIPE, loss_reduction=reduction, lr=RECIPE.lr if reduction == "mean" else RECIPE.lr / 50)
    single, single_history, _ = train_lenet(recipe)
    state, history, world = launch(train_lenet, 2, recipe, backend="gloo")
    assert world == 2
    for name, weight in single.items():
        assert torch.allclose(state[name], weight, atol=1e-6, rtol=1e-5), name
    for one, two in zip(single_history, history, strict=True):
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
        assert two["train_accuracy"] == pytest.approx(one["train_accuracy"])
        assert two["test_accuracy"] == pytest.approx(one["test_accuracy"])
    if reduction == "mean":  # once is enough: a 2-process run resumed from its checkpoint is the same run
        resumed, resumed_at = launch(train_lenet_interrupted_then_resumed, 2, recipe, tmp_path / "ckpt.pt",
                                     backend="gloo")
        assert resumed_at == 1
        assert all(torch.equal(resumed[name], state[name]) for name in state)


def test_shard_weights_uneven_slices_to_the_global_mean():
    x, y = torch.arange(10.0), torch.arange(10)
    assert shard(x, y)[2] == 1.0  # one process: the whole batch
    sizes = [len(part) for part in torch.tensor_split(y[:7], 2)]
    assert sizes == [4, 3] and [n * 2 / 7 for n in sizes] == pytest.approx([8 / 7, 6 / 7])


def test_nproc_is_checked():
    with pytest.raises(ValueError, match="nproc must be a positive integer"):
        launch(train_lenet, 0, RECIPE)


def search_lenet(densities) -> tuple[list, list, int]:
    from cts_pipeline.core.cts import SearchConfig, concrete_search
    from cts_pipeline.core.nets.masks import global_topk_mask

    torch.set_num_threads(1)
    train_split, _ = splits()
    model = build_model("lenet_300_100", image_shape=(1, 8, 8), num_classes=10,
                        generator=torch.Generator().manual_seed(1))
    results = concrete_search(model, train_split, density=densities, config=SearchConfig(epochs=3),
                              recipe=RECIPE, seed=0, stage="ddp search", progress=False)
    results = results if isinstance(results, list) else [results]
    densities = densities if isinstance(densities, list) else [densities]
    masks = [global_topk_mask(r.scores, k) for r, k in zip(results, densities, strict=True)]
    return masks, [r.history for r in results], rank_and_world()[1]


@pytest.mark.cross_path
@pytest.mark.parametrize("densities", [0.05, [0.2, 0.02]], ids=["one density", "batched"])
def test_two_gloo_processes_search_like_one(densities):
    single_masks, single_history, _ = search_lenet(densities)
    masks, history, world = launch(search_lenet, 2, densities, backend="gloo")
    assert world == 2
    for one, two in zip(single_masks, masks, strict=True):
        assert_equivalent_masks(one, two, what="one process against two")
    for rows_one, rows_two in zip(single_history, history, strict=True):
        for a, b in zip(rows_one, rows_two, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
            assert b["expected_over_budget"] == pytest.approx(a["expected_over_budget"], rel=1e-4)
            assert b["multiplier"] == pytest.approx(a["multiplier"], rel=1e-3, abs=1e-9)


def train_and_search_streamed(root) -> tuple:
    """LeNet-300-100 on JPEG folders read through the streamed path: DistributedSampler shards."""
    from dataclasses import replace

    from cts_pipeline.core.cts import SearchConfig, concrete_search
    from cts_pipeline.core.data.splits import load_splits
    from cts_pipeline.core.nets.masks import global_topk_mask

    torch.set_num_threads(1)
    train_split, test_split = load_splits("tiny_imagenet", root)
    train_split, test_split = train_split.with_workers(0), test_split.with_workers(0)
    recipe = TrainRecipe(epochs=2, batch_size=8, lr=0.01, augment=True, warmup_epochs=1)
    model = build_model("lenet_300_100", image_shape=(3, 64, 64), num_classes=200,
                        generator=torch.Generator().manual_seed(1))
    history = train(model, train_split, test_split, recipe, seed=0, stage="ddp streamed", progress=False).history
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    found = concrete_search(model, train_split, density=0.05, config=SearchConfig(epochs=1), recipe=recipe,
                            seed=0, stage="ddp streamed search", progress=False)
    # The authors' two-rank recipe on the same folders, with BatchNorm: each process's loader part
    # is every other sample of the global batch, the chunk its recipe rank takes on one process.
    convnet = build_model("convnet", image_shape=(3, 64, 64), num_classes=200, width=4,
                          generator=torch.Generator().manual_seed(1))
    ranks_recipe = replace(recipe, virtual_ranks=2, augment=False)
    train(convnet, train_split, None, ranks_recipe, seed=0, stage="ddp streamed ranks", progress=False)
    ranked = {k: v.detach().clone() for k, v in convnet.state_dict().items()}
    return (state, history, global_topk_mask(found.scores, 0.05), rank_and_world()[1], converted_batchnorm(),
            ranked)


@pytest.mark.cross_path
def test_two_gloo_processes_on_a_streamed_dataset_train_and_search_like_one(tmp_path):
    """Each rank loads its part of every global batch (DistributedSampler); the crops are drawn per
    sample, so the two processes see exactly the images one process sees."""
    from tests.core.test_image_folders import tiny_imagenet

    tiny_imagenet(tmp_path, per_class=8, noise=60)
    single, single_history, single_mask, _, single_norms, single_ranked = train_and_search_streamed(tmp_path)
    state, history, mask, world, norms, ranked = launch(train_and_search_streamed, 2, tmp_path, backend="gloo")
    for name, weight in single_ranked.items():  # two recipe ranks: one process, or one rank each
        assert torch.allclose(ranked[name].float(), weight.float(), atol=1e-5, rtol=1e-4), name
    assert world == 2
    # SyncBatchNorm's forward needs CUDA; on a CPU the conversion itself is what can be checked
    # (sync_batchnorm is off, then on, in each process).
    assert single_norms == [["BatchNorm2d"], ["BatchNorm2d"]], "one process: nothing to synchronise"
    assert norms == [["BatchNorm2d"], ["SyncBatchNorm"]], "in a group that asks for it"
    for name, weight in single.items():
        assert torch.allclose(state[name], weight, atol=1e-6, rtol=1e-5), name
    for one, two in zip(single_history, history, strict=True):
        # The loss of a model that has memorised its few images is ~4e-6: float32 resolves a
        # probability near 1 to 6e-8, so each sample's loss carries that much rounding (the two
        # processes' halves round apart), and a relative tolerance alone cannot hold there.
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5, abs=1e-7)
        assert two["test_accuracy"] == pytest.approx(one["test_accuracy"])
    assert_equivalent_masks(single_mask, mask, what="one process against two")


def converted_batchnorm() -> list[list[str]]:
    """The norm layers' types after ``with_sync_batchnorm``, off, then on."""
    from cts_pipeline.core.device.distributed import with_sync_batchnorm

    found = []
    for enabled in (False, True):
        model = build_model("convnet", image_shape=(1, 8, 8), num_classes=10, width=4,
                            generator=torch.Generator().manual_seed(0))
        keys = list(model.state_dict())
        assert with_sync_batchnorm(model, enabled) is model and list(model.state_dict()) == keys, \
            "same module, same keys"
        found.append(sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__}))
    return found



def train_and_search_with_each(settings: list[tuple[int, str]], densities) -> list[dict]:
    """One process group for every (virtual ranks, rank passes) (spawning the ranks costs more than the runs)."""
    return [train_and_search_with_virtual_ranks(n, densities, passes) for n, passes in settings]


def train_and_search_with_virtual_ranks(virtual_ranks: int, densities, rank_passes: str = "sequential") -> dict:
    """The digits convnet (BatchNorm) trained and searched with the authors' ``virtual_ranks``
    recipe ranks, in however many processes call it; 72 images, so the last batch of 8 is uneven."""
    from dataclasses import replace

    from cts_pipeline.core.cts import SearchConfig, concrete_search
    from cts_pipeline.core.nets.masks import global_topk_mask

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 17, (72, 1, 8, 8), generator=generator, dtype=torch.uint8)
    train_split = Split(images, torch.randint(0, 10, (72,), generator=generator), DATASETS["digits"])
    recipe = replace(RECIPE, batch_size=32, loss_reduction="sum", lr=0.002, virtual_ranks=virtual_ranks)
    model = build_model("convnet", image_shape=(1, 8, 8), num_classes=10, width=4,
                        generator=torch.Generator().manual_seed(1))
    history = train(model, train_split, None, recipe, seed=0, stage="ranks train", progress=False,
                    rank_passes=rank_passes).history
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    found = concrete_search(model, train_split, density=densities, config=SearchConfig(epochs=2), recipe=recipe,
                            seed=0, stage="ranks search", progress=False, rank_passes=rank_passes)
    return {"state": state, "history": history, "world": rank_and_world()[1],
            "scores": [r.scores for r in found], "search": [r.history for r in found],
            "as_rows": all(r.ranks_as_rows for r in found),
            "masks": [global_topk_mask(r.scores, k) for r, k in zip(found, densities, strict=True)]}


@pytest.mark.cross_path
def test_recipe_ranks_on_one_process_are_those_of_two_gloo_processes():
    """The authors' N-GPU recipe (BatchNorm per rank, the loss averaged over ranks, one noise draw
    and one λ* per rank in the search) gives the same training and search whether one process
    plays the N ranks or two processes play N/2 each: N = 2, and N = 4 (two chunks per process,
    so DDP's no_sync and the gathering of the ranks' gradient norms are exercised)."""
    densities = [0.2, 0.05]
    # Each process's ranks in one pass (ghost BatchNorm; the search's ranks as rows) and one chunk after
    # another: with 4 ranks, two in each of the two processes.
    settings = [(2, "one"), (4, "one"), (4, "sequential")]
    for (virtual_ranks, passes), one, two in zip(settings, train_and_search_with_each(settings, densities),
                                                 launch(train_and_search_with_each, 2, settings, densities,
                                                        backend="gloo"), strict=True):
        _assert_same_run(virtual_ranks, one, two)
        # As rows wherever a process plays several ranks: not 2 ranks over 2 processes.
        assert (one["as_rows"], two["as_rows"]) == (passes == "one", passes == "one" and virtual_ranks == 4)


def _assert_same_run(virtual_ranks: int, one: dict, two: dict) -> None:
    assert two["world"] == 2
    for name, weight in one["state"].items():
        assert torch.allclose(two["state"][name].float(), weight.float(), atol=1e-5, rtol=1e-4), name
    for a, b in zip(one["history"], two["history"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["train_accuracy"] == pytest.approx(a["train_accuracy"])
    for scores_one, scores_two in zip(one["scores"], two["scores"], strict=True):
        for name, logits in scores_one.items():
            assert torch.allclose(scores_two[name], logits, atol=1e-4, rtol=1e-4), name
    for rows_one, rows_two in zip(one["search"], two["search"], strict=True):
        for a, b in zip(rows_one, rows_two, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
            assert b["multiplier"] == pytest.approx(a["multiplier"], rel=1e-4, abs=1e-9)
            assert b["expected_kept"] == pytest.approx(a["expected_kept"], rel=1e-5)
    for mask_one, mask_two in zip(one["masks"], two["masks"], strict=True):
        assert_equivalent_masks(mask_one, mask_two, what=f"{virtual_ranks} recipe ranks: one process against two")


def test_each_recipe_rank_draws_its_own_noise_stream_and_takes_its_own_chunks():
    """Rank g of N takes every N-th sample from the g-th, as DistributedSampler deals; process r
    of M plays ranks r, r + M, …, so its part is every M-th sample (what a streamed loader hands it)."""
    from cts_pipeline.core.device.virtual_ranks import RankLayout

    x, y = torch.arange(10.0), torch.arange(10)
    one = RankLayout(4)
    assert [c[1].tolist() for c in one.chunks(x, y)] == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]
    second = RankLayout(4, process=1, processes=2)
    assert [c[1].tolist() for c in second.chunks(x, y)] == [[1, 5, 9], [3, 7]]  # ranks 1 and 3
    assert [second.stream_suffix(c) for c in range(2)] == [("rank", 1), ("rank", 3)]
    assert one.stream_suffix(0) == ()  # recipe rank 0 keeps the plain search's stream
    streamed = RankLayout(4, process=1, processes=2, presharded=True)
    assert [c[1].tolist() for c in streamed.chunks(x[1::2], y[1::2])] == [[1, 5, 9], [3, 7]]
    with pytest.raises(ValueError, match=r"training.virtual_ranks = 2 must be a multiple of the 4 processes"):
        RankLayout(2, processes=4)
    plain = RankLayout(1, process=1, processes=2)  # one rank: the plain step, its noise shared
    assert plain.chunks(x, y)[0][0] is x and plain.per_process == 1 and plain.stream_suffix(0) == ()


def train_and_search_with_ranks_on_an_uneven_split() -> tuple[dict, list[dict], torch.Tensor, int]:
    """Two recipe ranks with BatchNorm on 201 samples in batches of 50: the last batch has one
    sample, which leaves the second rank none unless the epoch is padded as DistributedSampler
    pads it (to 202, the first sample of the epoch's order again)."""
    from cts_pipeline.core.cts import SearchConfig, concrete_search
    from cts_pipeline.core.nets.masks import global_topk_mask

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 17, (201, 1, 8, 8), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (201,), generator=generator)
    split = Split(images, labels, DATASETS["digits"])
    recipe = TrainRecipe(epochs=2, batch_size=50, lr=0.05, virtual_ranks=2)
    model = build_model("convnet", image_shape=(1, 8, 8), num_classes=10, width=4,
                        generator=torch.Generator().manual_seed(1))
    history = train(model, split, None, recipe, seed=0, stage="uneven ranks", progress=False).history
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    found = concrete_search(model, split, density=0.1, config=SearchConfig(epochs=1), recipe=recipe, seed=0,
                            stage="uneven ranks search", progress=False)
    return state, history, global_topk_mask(found.scores, 0.1), rank_and_world()[1]


@pytest.mark.cross_path
def test_virtual_ranks_on_an_uneven_split_train_and_search_alike_in_one_and_two_processes():
    single, single_history, single_mask, _ = train_and_search_with_ranks_on_an_uneven_split()
    state, history, mask, world = launch(train_and_search_with_ranks_on_an_uneven_split, 2, backend="gloo")
    assert world == 2
    for name, weight in single.items():
        assert torch.allclose(state[name].float(), weight.float(), atol=1e-5, rtol=1e-4), name
    for one, two in zip(single_history, history, strict=True):
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
        assert two["train_accuracy"] == pytest.approx(one["train_accuracy"])
    assert_equivalent_masks(single_mask, mask, what="one process against two")


def train_lenet_with_ranks(compile_model: bool) -> dict:
    """Two recipe ranks, one per process, LeNet on the 200 samples of :func:`splits`."""
    torch.set_num_threads(1)
    train_split, _ = splits()
    model = build_model("lenet_300_100", image_shape=(1, 8, 8), num_classes=10,
                        generator=torch.Generator().manual_seed(1))
    recipe = TrainRecipe(epochs=1, batch_size=50, lr=0.05, weight_decay=1e-4, virtual_ranks=2)
    train(model, train_split, None, recipe, seed=0, stage="compiled ranks", progress=False,
          compile_model=compile_model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# Not a cross_path test: under ATEN_CPU_CAPABILITY=default inductor still writes vectorised C++
# (at::vec), which that capability's headers do not declare, so nothing compiles there.
@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") == "default",
                    reason="torch.compile's CPU code does not build under ATEN_CPU_CAPABILITY=default")
def test_a_compiled_forward_under_ddp_with_virtual_ranks_trains_as_the_eager_one(tmp_path, monkeypatch):
    """torch.compile around DDP (dynamo's DDP optimizer cuts the graph at the gradient buckets),
    with each process's chunks accumulated under no_sync: the same weights as the eager run, to
    float rounding (the compiled kernels fuse and sum in their own order)."""
    # A cache of its own: inductor's shared one (/tmp/torchinductor_<user>) served code built under
    # another ATEN_CPU_CAPABILITY to this run, which then aborted.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    eager = launch(train_lenet_with_ranks, 2, False, backend="gloo")
    compiled = launch(train_lenet_with_ranks, 2, True, backend="gloo")
    for name, weight in eager.items():
        assert torch.allclose(compiled[name], weight, atol=1e-5, rtol=1e-4), name
    start = build_model("lenet_300_100", image_shape=(1, 8, 8), num_classes=10,
                        generator=torch.Generator().manual_seed(1)).state_dict()
    assert not torch.allclose(compiled["fc1.weight"], start["fc1.weight"]), "the compiled run trained"

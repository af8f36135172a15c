"""What every node needs to turn parameters and catalog payloads into torch objects and back.

Catalog payloads are plain containers of CPU tensors (``torch.load(weights_only=True)`` reads
them anywhere); nodes move what they use to the run's device and hand CPU copies back.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config.identity import checkpoint_tag
from ..config.sections import ModelConfig, RuntimeConfig
from ..config.sweep import Branch
from ..core.artifacts.checkpoints import Checkpoint, PendingRemovals
from ..core.data import user_folders
from ..core.data.registry import DatasetInfo, get_dataset_info
from ..core.data.splits import Split
from ..core.device.runtime import channels_last_hazard, generator, resolve_device, training_device
from ..core.train.batched import stacks_ranks
from ..core.train.batched import supports as stacked_training_supports
from ..core.train.memory import release_cached_memory
from ..core.train.recipe import TrainRecipe
from ..core.train.stacked import unsupported_layers

# Nodes that compute on the run's device; a distributed runner gives each one GPU
# (cts_pipeline.runners.DaskRunner, workers started with --resources GPU=1).
GPU_TAG = "gpu"

logger = logging.getLogger(__name__)


class ArtifactMismatch(ValueError):
    """A stored artifact that does not fit where it is used; ``hooks.ArtifactPathHook`` adds the
    file's path to the message, which a node cannot know."""

    def __init__(self, dataset: str, message: str) -> None:
        super().__init__(f"{dataset}: {message}")
        self.dataset = dataset


def distributable(node_fn):
    """A node whose loops may run over several processes: with ``runtime.distributed: {nproc: N}``
    the node runs in N local processes (``core.device.distributed.launch``: DDP, each rank a slice of
    every batch) and returns rank 0's result. Under ``torchrun`` it runs on every rank of torchrun's
    group (``cts_pipeline.pipelines.torchrun``; ``nproc`` is then torchrun's), and with one process as it
    is. Checkpoints the ranks finished are removed by this
    process once Kedro has saved the outputs, as for a node in one process (``CheckpointHook``)."""

    @functools.wraps(node_fn)
    def run(*args):
        from ..core.device.distributed import backend_for, launch, rank_and_world, under_torchrun

        runtime = next((a for a in args if isinstance(a, RuntimeConfig)), None)
        if under_torchrun():  # torchrun's processes, not ours (cts_pipeline.torchrun): rank 0 leads
            from . import torchrun

            torchrun.lead(node_fn.__module__, node_fn.__qualname__, args,
                          resolve_device(runtime.device if runtime is not None else "auto"))
            try:
                return node_fn(*args)
            except BaseException as error:
                torchrun.raised_in_collectives(error)
                raise
        nproc = runtime.distributed.nproc if runtime is not None else 1
        if nproc <= 1 or rank_and_world()[1] > 1:
            return node_fn(*args)
        threads = max(1, (runtime.num_threads or torch.get_num_threads()) // nproc)
        result, finished, records = launch(_node_in_rank, nproc, node_fn.__module__, node_fn.__qualname__, args,
                                           threads,
                                           backend=backend_for(resolve_device(runtime.device)))
        # The ranks' finished checkpoints go with this node's, once Kedro has saved the outputs.
        PendingRemovals.defer_or_remove(finished)
        for logger_name, level, message in records:  # rank 0's log, in this process's handlers
            logging.getLogger(logger_name).log(level, "%s", message)
        return result

    return run


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))


def _node_in_rank(module: str, name: str, args: tuple, threads: int):
    """One rank of a distributable node: the node's own body, its checkpoints left to the driver,
    and (rank 0's) log records returned for the driver's handlers: a spawned process has none."""
    import importlib

    from ..core.device.distributed import rank_and_world

    torch.set_num_threads(threads)
    pending = PendingRemovals.start()
    project = logging.getLogger("cts_pipeline")
    collect = _Collect()
    if rank_and_world()[0] == 0:
        project.setLevel(logging.INFO)
        project.addHandler(collect)
    project.propagate = False  # nothing printed by the ranks themselves
    body = getattr(importlib.import_module(module), name).__wrapped__
    return body(*args), pending.take(), collect.records


def device_for(runtime: RuntimeConfig) -> torch.device:
    """The run's device, with the CPU thread count and the CUDA policy (TF32, cudnn.benchmark,
    determinism) ``runtime`` asks for."""
    if runtime.num_threads is not None:
        torch.set_num_threads(runtime.num_threads)
    return training_device(runtime.device, runtime.cuda_policy)


def split_to_payload(split) -> dict:
    """An in-memory split as its pixels; a streamed one as where its files are, which of them it
    keeps and their digest (the images stay in their folders)."""
    if split.streamed:
        return {"dataset": split.info.name, "labels": split.labels.cpu(),
                "streamed": {"root": str(split.root), "split": split.split, "digest": split.digest,
                             "indices": None if split.indices is None else torch.tensor(split.indices)}}
    return {"dataset": split.info.name, "images": split.images.cpu(), "labels": split.labels.cpu()}


def default_data_workers(processes: int) -> int:
    """Loader workers per process when ``runtime.data_workers`` is null: the CPUs this process may
    use, shared by the run's processes, less one each for the process itself (at least one)."""
    return max(1, len(os.sched_getaffinity(0)) // processes - 1)


def payload_info(payload: Mapping) -> DatasetInfo:
    """What the model and normaliser need to know of a prepared split: found when it was prepared
    (someone's folder or catalog entries: ``info``), else the registry's, with ``data.mean`` /
    ``data.std`` where the run set them."""
    if "info" in payload:
        found = payload["info"]
        return DatasetInfo(**{**found, "image_shape": tuple(found["image_shape"]), "mean": tuple(found["mean"]),
                              "std": tuple(found["std"])})
    info = get_dataset_info(payload["dataset"])
    if "normalization" in payload:  # data.mean / data.std set by the run
        norm = payload["normalization"]
        info = dataclasses.replace(info, mean=tuple(norm["mean"]), std=tuple(norm["std"]))
    return info


def split_from_payload(payload: Mapping, device: torch.device, workers: int | None = 0):
    """The split a payload describes on ``device``; a streamed one reads its images with
    ``workers`` loader processes (``runtime.data_workers``; None: this process's share of the
    CPUs, less one for the process itself: decoding JPEGs is what keeps a GPU waiting)."""
    info = payload_info(payload)
    if "streamed" in payload:
        from ..core.data.image_folders import open_streamed
        from ..core.device.distributed import rank_and_world

        if workers is None:
            workers = default_data_workers(rank_and_world()[1])

        where = payload["streamed"]
        indices = None if where["indices"] is None else where["indices"].tolist()
        if info.name == user_folders.NAME:  # someone's folder, too large to hold in memory
            return user_folders.open_streamed(info, where["root"], where["split"], indices=indices,
                                              digest=where["digest"], workers=workers).to(device)
        return open_streamed(info, where["root"], where["split"], indices=indices, digest=where["digest"],
                             workers=workers, resized_crop=payload.get("resized_crop", "torchvision")).to(device)
    return Split(images=payload["images"], labels=payload["labels"], info=info).to(device)


def build_network(
    model: ModelConfig, split: Split, device: torch.device, *,
    seed: int | None = None, state: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """The configured model for ``split``'s dataset on ``device``: fresh from ``seed``, or loaded from ``state``."""
    init = generator("cpu", seed, "model-init") if seed is not None else None
    return model.build(split.info.image_shape, split.info.num_classes, generator=init, state=state).to(device)


def may_train_stacked(net: nn.Module, training: TrainRecipe, runtime: RuntimeConfig, device: torch.device,
                      stage: str | None = None) -> bool:
    """Whether rows (tickets, seeds) may train as one stacked network here: layers the stacked
    layout knows, the virtual ranks in one pass (``runtime.virtual_rank_passes``), and neither
    ``runtime.compile`` nor several processes, which the stacked path does not have. Where the
    layers are the reason, ``stage`` (the node's, when it has rows to stack) says so in one line."""
    unknown = unsupported_layers(net)
    if unknown and stage is not None:
        logger.info("%s: one at a time, not stacked: the stacked layout does not know the model's %s layers",
                    stage, ", ".join(unknown))
    return (not unknown and stacked_training_supports(net, training, device)
            and stacks_ranks(training, runtime.virtual_rank_passes, device)
            and not runtime.compile and runtime.distributed.nproc <= 1)


def starts_then_branches(inputs: tuple, node: str) -> tuple[dict[int, dict], list, list[Branch]]:
    """A shared node's inputs: one start state per seed (in the order its branches first name their
    seeds), then K inputs of each branch's (none, or masks), then the K branches. Returns each
    seed's start state, the per-branch inputs and the branches."""
    branches = [a for a in inputs if isinstance(a, Branch)]
    seeds = list(dict.fromkeys(b.seed for b in branches))
    per_branch = (len(inputs) - len(seeds)) // len(branches) - 1
    middle = list(inputs[len(seeds):len(inputs) - len(branches)])
    if per_branch < 0 or len(middle) != per_branch * len(branches) or inputs[len(inputs) - len(branches):] != tuple(branches):
        raise TypeError(f"{node}: expected {len(seeds)} start states, then inputs of each of {len(branches)} branches, "
                        f"then the branches; got {len(inputs)} inputs")
    return dict(zip(seeds, inputs[:len(seeds)], strict=True)), middle, branches


def batched_if_faster(runtime: RuntimeConfig, stage: str, measure: Callable[[], float], rows: int,
                      what: str, doing: str, together: str,
                      settings: tuple[str, ...] = ("batch_sparsities",)) -> bool:
    """Whether K rows run batched: always when each of ``runtime.<settings>`` (``batch_sparsities``,
    ``stack_seeds``) is true; else (one is ``auto``) where ``measure()`` (a probe's batched time over
    K single ones) comes out below 1. Rank 0's measurement decides for every rank, and the log says
    what it found."""
    from ..core.device.distributed import broadcast_object

    if all(getattr(runtime, setting) is True for setting in settings):
        return True
    try:
        ratio = measure()
    except torch.OutOfMemoryError:  # K rows at once do not fit this device: one at a time, not a failed run
        release_cached_memory()
        logger.warning("%s: the probe of %d rows at once ran out of device memory; %s one at a time", stage, rows,
                       doing)
        ratio = math.inf
    ratio = broadcast_object(ratio)
    faster = ratio < 1.0
    auto = next(setting for setting in settings if getattr(runtime, setting) is not True)
    logger.info("%s: %s %.2f of %d single steps on this device; %s %s (runtime.%s: auto)", stage,
                what, ratio, rows, doing, together if faster else "one at a time", auto)
    return faster


def uses_channels_last(runtime: RuntimeConfig, net: nn.Module) -> bool:
    """``auto``: NHWC whenever the model has convolutions (1.5x faster ResNet-20 steps on CPU),
    unless a layer would corrupt memory in NHWC on this CPU (``core.device.runtime.channels_last_hazard``):
    then NCHW, with a warning when ``runtime.channels_last: true`` asked for NHWC."""
    wanted = any(isinstance(m, nn.Conv2d) for m in net.modules()) if runtime.channels_last == "auto" \
        else bool(runtime.channels_last)
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    hazard = channels_last_hazard(net, device) if wanted else None
    if hazard is not None and runtime.channels_last is True:
        logger.warning("runtime.channels_last: true, but layer %s's backward pass corrupts memory in NHWC on "
                       "this CPU (torch's oneDNN, a strided 1x1 convolution with fewer than 8 input channels); "
                       "training in NCHW", hazard)
    return wanted and hazard is None


def data_fingerprint(payload: Mapping) -> dict[str, Any]:
    """What identifies a prepared split cheaply: its dataset, shape and labels."""
    extra = {k: payload[k] for k in ("normalization", "resized_crop", "info") if k in payload}
    if "streamed" in payload:
        return {"dataset": payload["dataset"], "files": payload["streamed"]["digest"], "labels": payload["labels"],
                **extra}
    return {"dataset": payload["dataset"], "shape": list(payload["images"].shape), "labels": payload["labels"],
            "raw": payload.get("raw_digest"), **extra}


def checkpoint_for(runtime: RuntimeConfig, namespace: str, stage: str, *key: Any) -> Checkpoint | None:
    """The per-epoch checkpoint of one loop, named by a digest of everything that decides its result."""
    if runtime.checkpoint_dir is None:
        return None
    tag = checkpoint_tag(stage, *key)
    # In the background on a GPU, where a synchronous write stalls the device; on a CPU the
    # write would compete with the loop for the same cores, so it stays in the loop's thread.
    return Checkpoint(Path(runtime.checkpoint_dir) / namespace / f"{stage}-{tag}.pt", tag,
                      every=runtime.checkpoint_every, background=resolve_device(runtime.device).type == "cuda")

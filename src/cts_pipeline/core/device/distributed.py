"""One training over several processes: DistributedDataParallel, launched with torch's elastic API.

:func:`launch` runs a function in ``nproc`` local processes (``torch.distributed.launcher``, the
engine behind ``torchrun``), each in a process group (NCCL on CUDA, gloo on CPU), and returns rank
0's result. Under ``torchrun`` (several nodes) the process group already exists and the loops
use it as is.

Every rank draws the same global batch (the data order and augmentation depend only on the seed
and the epoch) and keeps its own slice of it (:func:`shard`). In training, DDP averages the
gradients over ranks; each rank's loss is weighted by its share of the batch, so the average is
exactly the global batch's mean and the weights follow the single-process run up to float
rounding. The search shares its noise draw (seeded the same on every rank) and averages the
logit gradients the same way (:func:`average_over_ranks`), so GradBalance's λ* is the same too. Where
the model has BatchNorm, each rank normalises with its own slice's statistics, unlike one
process over the whole batch; ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` restores
whole-batch statistics at the cost of one all-reduce per layer.

The pipeline reaches it through ``runtime.distributed: {nproc: N}`` (``pipelines.common.distributable``).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(x: torch.Tensor, y: torch.Tensor, rank: int | None = None,
          world: int | None = None, *, presharded: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """This rank's slice of a global batch, and the factor that turns its mean loss into its share
    of the global mean once DDP averages over ranks (``len(slice) · world / len(batch)``). The
    loops look ``rank`` and ``world`` up once and call this only in a process group.
    ``presharded``: the batch is already this rank's equal part (a streamed split's loader), share 1."""
    if rank is None or world is None:
        rank, world = rank_and_world()
    if world == 1 or presharded:
        return x, y, 1.0
    total = len(y)
    x, y = torch.tensor_split(x, world)[rank], torch.tensor_split(y, world)[rank]
    return x, y, len(y) * world / total


def average_over_ranks(grad: torch.Tensor, share: float, world: int) -> torch.Tensor:
    """The global batch's gradient from this rank's (``share`` as from :func:`shard`), the same on
    every rank. The search hands it to GradBalance, so λ* too is the same on every rank."""
    total = grad * (share / world)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (pickled; a no-op in one process)."""
    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def under_torchrun() -> bool:
    """Whether ``torchrun`` started this process as one of several (its environment says so)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ and "LOCAL_RANK" in os.environ


def join_torchrun_group(device: torch.device) -> None:
    """Join the process group ``torchrun`` set up the environment for (once), with the backend of
    the run's ``device`` (:func:`backend_for`): NCCL with this process's GPU (``LOCAL_RANK``) for
    CUDA, gloo for a CPU run, on a GPU machine too."""
    if dist.is_initialized():
        return
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(own_gpu(int(os.environ["LOCAL_RANK"]), "torchrun's --nproc-per-node"))
    dist.init_process_group(backend=backend)


def check_one_gpu_each(nproc: int, named: str = "runtime.distributed.nproc") -> None:
    """Refuse ``nproc`` processes on this machine's GPUs when they would have to share one."""
    if nproc > torch.cuda.device_count():
        raise ValueError(f"{named} = {nproc} processes, one GPU each, but this machine has "
                         f"{torch.cuda.device_count()}")


def own_gpu(local_rank: int, named: str) -> int:
    """The GPU of the process with ``local_rank`` on this machine: its own, never shared (NCCL
    refuses two ranks on one device). ``named`` says which setting chose the process count."""
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"{named}: process {local_rank} needs a GPU of its own, but this machine has {count}; "
                         f"run at most {count} processes per machine")
    return local_rank


def all_sum(*tensors: torch.Tensor) -> None:
    """Sum tensors over ranks, in place (a no-op in one process)."""
    if rank_and_world()[1] > 1:
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def with_sync_batchnorm(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``model`` with its BatchNorm layers as SyncBatchNorm (``torch.nn.SyncBatchNorm``, CUDA
    only), so they normalise over the whole global batch instead of each rank's slice, when
    ``enabled`` and inside a process group (in place: the same parameters and buffers, so its
    ``state_dict`` keys are unchanged)."""
    if enabled and rank_and_world()[1] > 1:
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _entry(fn: Callable[..., Any], backend: str, args: tuple, kwargs: dict) -> Any:
    if backend == "nccl":  # before the group: NCCL binds each rank to the current device
        torch.cuda.set_device(own_gpu(int(os.environ["LOCAL_RANK"]), "runtime.distributed.nproc"))
    dist.init_process_group(backend=backend)
    try:
        return fn(*args, **kwargs)
    finally:
        dist.destroy_process_group()


def backend_for(device: torch.device) -> str:
    """The process group's backend follows the run's device, not what the machine has: NCCL for
    CUDA tensors, gloo for CPU ones (``device: cpu`` on a GPU machine included)."""
    return "nccl" if device.type == "cuda" else "gloo"


def launch(fn: Callable[..., Any], nproc: int, *args: Any, backend: str | None = None, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in ``nproc`` local processes joined in one process group; rank 0's
    return value. ``fn`` must be importable (a module-level function): the processes are spawned.
    ``backend`` defaults to the machine's (``backend_for`` of CUDA when present); with NCCL each
    rank takes a GPU of its own."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    backend = backend or backend_for(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if backend == "nccl":
        check_one_gpu_each(nproc)
    if threading.current_thread() is not threading.main_thread():
        # Off the main thread (a Dask or Kedro thread-pool worker) the launcher cannot install its
        # signal handlers and warns at every launch; the ranks still end with this call.
        logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.ERROR)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1)
    results = elastic_launch(config, _entry)(fn, backend, args, kwargs)
    return results[0]

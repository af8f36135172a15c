"""``kedro run`` under ``torchrun``: one run over several machines, rank 0 leading.

``torchrun --nnodes=M --nproc-per-node=G --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT -m kedro run ...``
starts ``kedro run`` M·G times. Only rank 0 runs the Kedro session: the catalog, MLflow, the
console and every node that is not a training loop. The other ranks (*followers*) never open a
session. When rank 0 reaches a ``distributable`` node (dense training, search, LTR, retraining),
it broadcasts the node's name and inputs, and every rank runs the node's body together in the
process group (DistributedDataParallel, as under ``runtime.distributed``). Rank 0's result is the
one Kedro saves; the followers' are dropped. Checkpoints are written by rank 0 and read back by
rank 0, which broadcasts them (``Checkpoint.load``), so a follower never needs rank 0's disk. A
streamed dataset must be at the same ``data.root`` on every machine.

Kedro's own runners schedule nodes in one process; spreading each training over machines needs
every rank to enter the same collective in the same order, which is this leader/follower loop
(and why the runner must be the SequentialRunner here).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable

import torch

logger = logging.getLogger(__name__)

# Set on an error raised while rank 0 led a node: the followers are then inside its collectives.
IN_COLLECTIVES = "_cts_raised_in_collectives"


def is_follower() -> bool:
    """A rank other than 0 of a ``torchrun`` launch."""
    from ..core.device.distributed import under_torchrun

    return under_torchrun() and int(os.environ["RANK"]) != 0


def run_device(env: str | None, conf_source: str | None, params: dict | None) -> torch.device:
    """The run's ``runtime.device``, as every rank reads it from the same configuration (torchrun
    starts the same command line on each): the process group's backend follows it, so
    ``device: cpu`` on a GPU machine joins with gloo, not NCCL."""
    from ..config import active as active_config
    from ..core.device.runtime import resolve_device

    parameters = active_config.parameters(active_config.project_config_loader(env, conf_source, params))
    return resolve_device((parameters.get("runtime") or {}).get("device", "auto"))


def _join(device: torch.device) -> None:
    from ..core.device.distributed import join_torchrun_group

    join_torchrun_group(device)


def lead(module: str, name: str, args: tuple, device: torch.device) -> None:
    """Rank 0: have every follower run node ``module.name`` on ``args`` with this rank, in a group
    for the run's ``device``."""
    from ..core.device.distributed import broadcast_object

    _join(device)
    broadcast_object((module, name, args))


def raised_in_collectives(error: BaseException) -> None:
    """Mark ``error`` as raised while rank 0 led a node (:func:`release` then leaves the followers)."""
    try:
        setattr(error, IN_COLLECTIVES, True)
    except AttributeError:  # an exception type with __slots__: release then waits as after a node
        pass


def release(device: torch.device | None, ended_by: Iterable[BaseException] = ()) -> None:
    """Rank 0, at the end of its run (``ended_by``: the error that ended it and its causes, if
    any): let the followers exit. Skipped when a node failed in the middle of its collectives
    (the followers are inside one): torchrun then stops every rank."""
    from ..core.device.distributed import broadcast_object

    if device is None or any(getattr(error, IN_COLLECTIVES, False) for error in ended_by):
        return  # (no device: the configuration is unreadable, and the followers stopped on it too)
    _join(device)
    broadcast_object(None)


def follow(device: torch.device) -> None:
    """A follower's whole run: join the group, then run each node rank 0 announces, until it
    announces the end."""
    from ..core.artifacts.checkpoints import PendingRemovals
    from ..core.device.distributed import broadcast_object

    project = logging.getLogger("cts_pipeline")
    project.setLevel(logging.WARNING)  # rank 0 reports; a follower only its own problems
    _join(device)
    while (call := broadcast_object(None)) is not None:
        module, name, args = call
        pending = PendingRemovals.start()  # rank 0's Kedro removes them once it has saved the outputs
        getattr(importlib.import_module(module), name).__wrapped__(*args)
        pending.take()

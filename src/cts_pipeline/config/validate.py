"""The checks a run makes before any training, across sections: a model against its dataset's
input, the grid against the model's size, the processes against the devices, the data on disk.
Every problem is listed at once, each naming its parameter (:class:`.sections.ConfigError`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..core.data.registry import get_dataset_info
from ..core.data.splits import ensure_available
from ..core.device.distributed import check_one_gpu_each, under_torchrun
from ..core.device.runtime import resolve_device
from ..core.nets.masks import count_prunable, kept_count
from ..core.nets.registry import check_model_fits, skeleton
from .sections import typed_sections
from .sweep import plan
from .typed import ConfigError

logger = logging.getLogger(__name__)


def validate_run(params: Mapping[str, Any], pipelines: Sequence[str] | None = None) -> dict[str, Any]:
    """Check the whole configuration before any training; return the typed sections.

    ``pipelines`` are the pipelines being run (None: the default); the sanity settings matter only
    when they include the sanity checks. Raises :class:`ConfigError` listing every problem, each
    naming its parameter.
    """
    sections = typed_sections(params)
    data, model, grid, runtime = sections["data"], sections["model"], sections["grid"], sections["runtime"]
    raw_grid = params.get("grid")
    if grid.levels and isinstance(raw_grid, Mapping) and raw_grid.get("sparsities"):
        logger.warning("grid.levels %s take precedence over grid.sparsities %s: densities are 0.8^L exactly "
                       "(set grid.levels: null to use the sparsities)", list(grid.levels), list(raw_grid["sparsities"]))
    problems = []
    try:
        sweep = plan(sections)
        sweep.check(pipelines)
    except ValueError as exc:
        problems.append(str(exc))
    else:
        problems += _empty_pipelines(sweep, pipelines or ["__default__"])
    info = get_dataset_info(data.name)
    try:
        check_model_fits(model.name, image_shape=info.image_shape, num_classes=info.num_classes, **model.options)
    except ValueError as exc:
        problems.append(f"{exc} (data.name = {data.name!r})")
    else:
        prunable = count_prunable(skeleton(  # shapes only: no weight is allocated or initialised
            model.name, image_shape=info.image_shape, num_classes=info.num_classes, **model.options))
        if not prunable:
            problems.append(f"model {model.name!r} (model.name) has no weight the methods may prune "
                            "(the weights of its Conv2d and Linear layers)")
        for sparsity in grid.sparsities:
            try:
                kept_count(1.0 - sparsity, prunable)
            except ValueError as exc:
                problems.append(f"grid.sparsities: {sparsity}: {exc}")
    distributed = runtime.distributed
    # Under torchrun the processes are torchrun's (cts_pipeline.torchrun), not runtime.distributed's.
    nproc, named = ((int(os.environ["WORLD_SIZE"]), "torchrun's WORLD_SIZE") if under_torchrun()
                    else (distributed.nproc, "runtime.distributed.nproc"))
    try:
        device = resolve_device(runtime.device)
    except ValueError as exc:
        problems.append(str(exc))
    else:
        if distributed.sync_batchnorm and device.type != "cuda":
            problems.append(f"runtime.distributed.sync_batchnorm needs CUDA (torch's SyncBatchNorm runs on GPUs "
                            f"only); this run's device is {device}")
        if device.type == "cuda" and not under_torchrun():
            try:
                check_one_gpu_each(nproc)
            except ValueError as exc:
                problems.append(str(exc))
        if device.type == "cuda" and device.index is not None and nproc > 1:
            problems.append(f"runtime.device = {runtime.device!r} names one GPU, but {named} = {nproc} processes "
                            "each need their own: use device: cuda (or auto), and the processes take GPUs 0.."
                            f"{nproc - 1}")
    virtual_ranks = sections["training"].virtual_ranks
    if virtual_ranks > 1 and virtual_ranks % nproc:
        problems.append(f"training.virtual_ranks = {virtual_ranks} must be a multiple of {named} = {nproc}: "
                        "each process plays an equal number of the recipe's ranks")
    if virtual_ranks > 1 and distributed.sync_batchnorm:
        problems.append(f"runtime.distributed.sync_batchnorm cannot be combined with training.virtual_ranks = "
                        f"{virtual_ranks}: each virtual rank normalises its own part of the batch")
    if info.streamed and sections["training"].batch_size % nproc:
        problems.append(f"training.batch_size = {sections['training'].batch_size} must be a multiple of "
                        f"{named} = {nproc}: each process loads an equal part of every batch")
    if not data.download:
        try:
            ensure_available(data.name, data.root, download=False)
        except FileNotFoundError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("invalid configuration:\n- " + "\n- ".join(problems))
    return sections


def _empty_pipelines(sweep, pipelines: Sequence[str]) -> list[str]:
    """Pipelines that were asked for but would train only the dense network and report nothing."""
    nothing = {
        "ltr": (not sweep.ltr, "methods.ltr is false"),
        "pai": (not sweep.pai, "methods.pai is empty"),
        "sanity": (not sweep.sanity, "sanity.methods, sanity.sparsities or sanity.checks is empty"),
    }
    return [f"--pipelines={name} has nothing to run: {why}" for name, (empty, why) in nothing.items()
            if name in pipelines and empty]

"""The checks a run makes before any training, across sections: a model against its dataset's
input, the grid against the model's size, the processes against the devices, the data on disk.
Every problem is listed at once, each naming its parameter (:class:`.sections.ConfigError`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..core.data import tables, user_folders
from ..core.data.registry import DataFileError, DatasetInfo, get_dataset_info
from ..core.data.splits import ensure_available
from ..core.device.distributed import check_one_gpu_each, under_torchrun
from ..core.device.runtime import resolve_device
from ..core.nets.masks import count_prunable, kept_count
from ..core.nets.registry import check_model_fits
from .sections import typed_sections
from .sweep import plan
from .typed import ConfigError

logger = logging.getLogger(__name__)


def validate_run(params: Mapping[str, Any], pipelines: Sequence[str] | None = None,
                 load: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Check the whole configuration before any training; return the typed sections.

    ``pipelines`` are the pipelines being run (None: the default); the sanity settings matter only
    when they include the sanity checks. ``load`` reads a catalog entry (``data.name: catalog``).
    Raises :class:`ConfigError` listing every problem, each naming its parameter.
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
    info = _data_info(data, load, problems)
    if info is None:  # the data cannot be read: said above; the model needs their shape to be checked
        raise ConfigError("invalid configuration:\n- " + "\n- ".join(problems))
    problems += _model_problems(model, info, grid.sparsities, data.name)
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
    if not data.download and not data.own:
        try:
            ensure_available(data.name, data.root, download=False)
        except FileNotFoundError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("invalid configuration:\n- " + "\n- ".join(problems))
    return sections


def _model_problems(model, info: DatasetInfo, sparsities: Sequence[float], data_name: str) -> list[str]:
    """The model against its data: it builds for their shape, its selection picks something, its
    start weights fit, and every sparsity keeps at least one of its prunable weights."""
    try:
        check_model_fits(model.name, image_shape=info.image_shape, num_classes=info.num_classes, **model.options)
    except ValueError as exc:
        return [f"{exc} (data.name = {data_name!r})"]
    try:
        prunable = count_prunable(model.skeleton(info.image_shape, info.num_classes))  # shapes only
        if model.weights is not None:
            model.build(info.image_shape, info.num_classes)
    except ValueError as exc:  # model.prunable picks nothing, model.weights does not fit
        return [str(exc)]
    if not prunable:
        return [f"model {model.name!r} (model.name) has no weight the methods may prune "
                "(the weights of its Conv2d and Linear layers; model.prunable chooses others)"]
    problems = []
    for sparsity in sparsities:
        try:
            kept_count(1.0 - sparsity, prunable)
        except ValueError as exc:
            problems.append(f"grid.sparsities: {sparsity}: {exc}")
    return problems


def _data_info(data, load: Callable[[str], Any] | None, problems: list[str]) -> DatasetInfo | None:
    """What the model is checked against: the registry's, or found in someone's folder or catalog
    entries (None, with the problem added, where they cannot be read)."""
    if not data.own:
        return get_dataset_info(data.name)
    try:
        if data.name == user_folders.NAME:
            scan = user_folders.scan(data.root, data.image_size)
            source = "image-folder" if user_folders.streams(scan) else "user-folder"  # streamed, or held
            return DatasetInfo(user_folders.NAME, scan.image_shape, len(scan.classes), (), (), 255.0, source)
        if load is None:
            raise ValueError("data.name: catalog needs the run's Kedro catalog to read data.train and data.test")
        loaded = []
        for key in ("train", "test"):
            try:
                loaded.append(load(getattr(data, key)))
            except Exception as exc:  # undeclared, a missing file, a malformed one: Kedro's DatasetError
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise DataFileError(f"data.{key}: catalog entry {getattr(data, key)!r} cannot be loaded: {reason}") from None
        return tables.load(*loaded, data.label_column, (data.train, data.test))[2]
    except (ValueError, FileNotFoundError) as exc:  # DataFileError, DatasetNotFoundError
        problems.append(str(exc))
        return None


def _empty_pipelines(sweep, pipelines: Sequence[str]) -> list[str]:
    """Pipelines that were asked for but would train only the dense network and report nothing."""
    nothing = {
        "ltr": (not sweep.ltr, "methods.ltr is false"),
        "pai": (not sweep.pai, "methods.pai is empty"),
        "sanity": (not sweep.sanity, "sanity.methods, sanity.sparsities or sanity.checks is empty"),
    }
    return [f"--pipelines={name} has nothing to run: {why}" for name, (empty, why) in nothing.items()
            if name in pipelines and empty]

"""Every typed section of the parameters and of the settings files, and the run-start read of them.

Kedro turns each ``params:<section>`` node input annotated with one of these pydantic models (or
with :class:`~cts_pipeline.core.train.recipe.TrainRecipe` / :class:`~cts_pipeline.core.cts.SearchConfig`,
``core``'s dataclasses) into an instance when it builds the catalog; :func:`typed_sections` reads
them all first, so that a run starts by listing every problem at once, each naming its setting
(:mod:`.typed` says how). The sweep's sections (``grid``, ``methods``, ``pai``, ``sanity``) live
with the sweep they shape (:mod:`.sweep`); :mod:`.validate` checks what needs several sections.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, PlainValidator, field_validator, model_validator

from ..core.artifacts.checkpoints import parse_interval
from ..core.cts import SearchConfig
from ..core.data.image_folders import RESIZED_CROPS
from ..core.data.registry import DATASETS, OWN_DATA
from ..core.device.runtime import CudaPolicy, check_device_choice
from ..core.device.virtual_ranks import RANK_PASSES
from ..core.nets.registry import MODELS, build_model, is_own_model, skeleton
from ..core.nets.selection import select_prunable
from ..core.nets.weights import load_weights
from ..core.train.recipe import TrainRecipe
from .sweep import GridConfig, MethodsConfig, PaiConfig, SanityConfig, plan
from .typed import (
    AutoFlag,
    ConfigError,
    Expects,
    FiniteNumber,
    Flag,
    Fraction,
    NonEmptyText,
    NonNegativeInt,
    PositiveInt,
    PositiveNumber,
    Section,
    closest,
    registered,
    section_or_problems,
)

DatasetName = registered({**DATASETS, **OWN_DATA}, "dataset")
def _model_name(name: str) -> str:
    """A registered model, or someone's factory (``module:callable``, ``torchvision:<name>``), which
    the run's checks import and try on a batch of the data (:func:`.validate.validate_run`)."""
    if name not in MODELS and not is_own_model(name):
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}, or your own as "
                         "'<package.module>:<callable>' or 'torchvision:<name>'")
    return name


ModelName = Annotated[str, Field(strict=True), AfterValidator(_model_name),
                      Expects("a registered model name, '<package.module>:<callable>' or 'torchvision:<name>'")]
Numbers = Annotated[tuple[FiniteNumber, ...], Expects("a list of finite numbers, one per channel")]


def _image_size(value: Any) -> int | tuple[int, int] | None:
    """``data.image_size``: null, a side, or [height, width], in one message when it is none of
    them (a union type would give one message per alternative)."""
    def side(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if value is None or side(value):
        return value
    if isinstance(value, list | tuple) and len(value) == 2 and all(side(v) for v in value):
        return tuple(value)
    raise ValueError("must be null, a positive integer or [height, width]")


class DataConfig(Section):
    """``data`` parameters."""

    label: ClassVar[str] = "data."
    name: DatasetName
    root: str = "data/01_raw"
    download: Flag = False
    train_subset: PositiveInt | None = None  # keep the first N training samples (tiny presets for tests)
    test_subset: PositiveInt | None = None
    # Per-channel normalisation on the [0, 1] scale; null: the dataset's own statistics (core/data/registry.py).
    mean: Numbers | None = None
    std: Numbers | None = None
    # The training crop of a streamed (image-folder) dataset: torchvision's RandomResizedCrop, or the
    # authors' (longer side to 500 pixels, then scale (0.1, 1), ratio (0.8, 1.25)).
    resized_crop: Literal[tuple(RESIZED_CROPS)] = "torchvision"
    # image_folder: the side (or [height, width]) images are resized to; null: their most common size
    image_size: Annotated[int | tuple[int, int] | None, PlainValidator(_image_size)] = None
    # catalog: the Kedro catalog entries of the training and test data, and a table's target column
    train: NonEmptyText | None = None
    test: NonEmptyText | None = None
    label_column: NonEmptyText = "label"

    @model_validator(mode="after")
    def _fits_the_dataset(self) -> DataConfig:
        if self.name in OWN_DATA:
            return self._fits_own_data()
        for key in ("image_size", "train", "test"):
            if getattr(self, key) is not None:
                raise ValueError(f"data.{key} applies to data.name: {'image_folder' if key == 'image_size' else 'catalog'}, "
                                 f"not to {self.name}")
        if self.resized_crop != "torchvision" and not DATASETS[self.name].streamed:
            raise ValueError(f"data.resized_crop applies to image-folder datasets; {self.name} is cropped by "
                             "training.augment's padded random crop (training.crop_padding)")
        channels = DATASETS[self.name].image_shape[0]
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and len(value) != channels:
                raise ValueError(f"data.{key} must be null or {channels} number{'s' * (channels > 1)} (one per channel of "
                                 f"{self.name}), got {list(value)!r}")
        if self.std is not None and not all(v > 0 for v in self.std):
            raise ValueError(f"data.std must be positive, got {list(self.std)!r}")
        return self

    def _fits_own_data(self) -> DataConfig:
        if self.resized_crop != "torchvision":
            raise ValueError(f"data.resized_crop applies to tiny_imagenet and imagenet; {self.name} is cropped by "
                             "training.augment's padded random crop (training.crop_padding)")
        if self.name == "catalog":
            missing = [key for key in ("train", "test") if getattr(self, key) is None]
            if missing:
                raise ValueError(f"data.name: catalog reads Kedro catalog entries: set data.{' and data.'.join(missing)} "
                                 "to their names (declared in conf/<env>/catalog.yml)")
            for key in ("image_size", "mean", "std"):
                if getattr(self, key) is not None:
                    raise ValueError(f"data.{key} applies to images; catalog data reach the model as they are")
        else:
            for key in ("train", "test"):
                if getattr(self, key) is not None:
                    raise ValueError(f"data.{key} applies to data.name: catalog; an image folder's splits are "
                                     "data.root's train/ and val/ (or test/)")
        if self.std is not None and not all(v > 0 for v in self.std):
            raise ValueError(f"data.std must be positive, got {list(self.std)!r}")
        return self

    @property
    def own(self) -> bool:
        """Data the project has never seen (an image folder, catalog entries): their shape, classes and
        statistics are found when they are read."""
        return self.name in OWN_DATA


class ModelConfig(Section):
    """``model`` parameters: a registry name (or someone's factory) and that model's options (e.g.
    ``shortcut: conv3x3``); which of its weights the methods may prune; where it starts from."""

    label: ClassVar[str] = "model."
    name: ModelName
    options: Annotated[dict[str, Any], Expects("a mapping of the model's options")] = Field(default_factory=dict)
    # null: every Conv and Linear weight; else module types, module or parameter names, glob patterns
    # (core/nets/selection.py), e.g. [Conv2d, Linear] or ["*.self_attn.in_proj_weight", "fc"]
    prunable: Annotated[tuple[NonEmptyText, ...] | None,
                        Expects("null or a list of module types, module or parameter names and glob patterns")] = None
    # null: a fresh initialisation from the seed; else a local state dict (.safetensors, or a file
    # torch.load reads with weights_only=True) every seed starts from
    weights: NonEmptyText | None = None

    def skeleton(self, image_shape, num_classes):
        """The model's shapes with its prunable selection, no weights loaded (for counts)."""
        return select_prunable(skeleton(self.name, image_shape=tuple(image_shape), num_classes=num_classes,
                                        **self.options), self.prunable)

    def build(self, image_shape, num_classes, generator=None, state=None):
        """The model with its prunable selection, holding ``state`` (a state dict) when given, else
        ``model.weights``' file when set, else its fresh initialisation from ``generator``."""
        net = build_model(self.name, image_shape=tuple(image_shape), num_classes=num_classes,
                          generator=generator, **self.options)
        if state is not None:
            net.load_state_dict(state)
        elif self.weights is not None:
            load_weights(net, self.weights)
        return select_prunable(net, self.prunable)


class DistributedConfig(Section):
    """``runtime.distributed``: train and search over ``nproc`` local processes."""

    label: ClassVar[str] = "runtime.distributed."
    nproc: PositiveInt = 1
    sync_batchnorm: Flag = False  # normalise over the global batch (CUDA only)


class RuntimeConfig(Section):
    """``runtime`` parameters: where and how to run. On a CPU they never change a result; on a GPU
    TF32 and determinism change the last bits (``core.device.runtime.CudaPolicy``)."""

    label: ClassVar[str] = "runtime."
    device: str = "auto"
    progress: Flag = True
    num_threads: PositiveInt | None = None
    checkpoint_dir: str | None = "data/06_models/checkpoints"  # null: no per-epoch checkpoints
    # How often a long loop writes its checkpoint: N epochs, "600s" / "10min", or auto (whenever
    # writing it costs at most 5 % of the training time since the last one; the GPU presets' choice).
    checkpoint_every: int | str = 1
    channels_last: AutoFlag = "auto"  # auto: NHWC for convolutional models (faster on CPUs)
    compile: Flag = False  # torch.compile the training forward (worth it on GPUs, not on CPUs)
    # How a process plays training.virtual_ranks: one forward and backward of its whole part with each
    # rank's BatchNorm statistics its own (ghost BatchNorm), or sequential, one chunk after another (the
    # reference; the same numbers to float rounding, N times the GPU's kernel launches); auto: one on a
    # GPU, sequential on a CPU (compute-bound: one pass is no faster there).
    virtual_rank_passes: Literal[RANK_PASSES] = "auto"
    # One batched CTS search (and retraining) per seed and CTS configuration. true: always batched, so
    # runs repeat to the bit; auto: batched where a probe of a step measures it faster on this
    # device (not for ResNet-20 on a CPU), a choice that timing noise can flip between runs.
    batch_sparsities: AutoFlag = True
    # The grid's seeds as rows of one stacked network: their dense runs in one node, and a method's
    # searches and retrainings of every seed and sparsity in one each (with batch_sparsities on).
    # true: always; auto: on an accelerator, where a probe of a step measures it faster (a CPU keeps a
    # node per seed); false: a node per seed. Each seed keeps its own initialisation, noise, data
    # order, artifacts and records.
    stack_seeds: AutoFlag = "auto"
    strict: Flag = False  # stop the run when a search diverges, instead of flagging the branch
    # {nproc: N}: train and search over N local processes; null: one
    distributed: Annotated[DistributedConfig, Expects("null or {nproc: N, sync_batchnorm: false}")] = \
        Field(default_factory=DistributedConfig)
    data_workers: NonNegativeInt | None = None  # loader processes of a streamed (image-folder) dataset; 0 = in
    #                                             this process; null = up to 4, as the CPUs allow
    tf32: Flag = True  # CUDA: TF32 matmuls and convolutions on Ampere and later (core.device.runtime.CudaPolicy)
    deterministic: Flag = False  # CUDA: deterministic algorithms, so a GPU run repeats to the bit (slower)

    @field_validator("device", mode="before")
    @classmethod
    def _device_choice(cls, device: Any) -> str:
        return check_device_choice(device)  # raises naming runtime.device

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _interval(cls, every: Any) -> int | str:
        parse_interval(every)  # raises naming runtime.checkpoint_every
        return every

    @field_validator("distributed", mode="before")
    @classmethod
    def _one_process_when_null(cls, distributed: Any) -> Any:
        return {} if distributed is None else distributed

    @property
    def cuda_policy(self) -> CudaPolicy:
        return CudaPolicy(tf32=self.tf32, deterministic=self.deterministic)

    @property
    def sync_batchnorm(self) -> bool:
        """Whether training over several processes normalises over the global batch."""
        return self.distributed.sync_batchnorm


class ReportConfig(Section):
    """``report`` parameters."""

    label: ClassVar[str] = "report."
    layer_density_sparsity: Fraction | None = 0.9926  # the per-layer density plot's sparsity (nearest in the grid)


class TrackingSettings(Section):
    """``mlflow`` configuration (``conf/base/mlflow.yml``)."""

    label: ClassVar[str] = "mlflow.yml: "
    enabled: Flag = True
    experiment_name: NonEmptyText = "cts-pipeline"
    tracking_uri: str | None = None
    on_unavailable: Literal["warn", "fail"] = "warn"  # warn: run untracked; fail: stop before computing anything
    system_metrics: Flag = True   # CPU, memory, disk, network (and GPU with nvidia-ml-py) on the parent run

    def resolved_uri(self, project_path: Path) -> str:
        return (self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{(Path(project_path) / 'mlflow.db').as_posix()}")


class DaskSettings(Section):
    """``dask.yml``."""

    label: ClassVar[str] = "dask.yml: "
    address: str | None = None          # null: a LocalCluster on this machine
    n_workers: PositiveInt = 2          # LocalCluster only
    threads_per_worker: PositiveInt = 1  # LocalCluster only
    dashboard_address: str | None = ":8787"  # LocalCluster only; null: no dashboard
    forward_logs: Flag = True           # workers' cts_pipeline log lines appear in this terminal
    connect_timeout: Annotated[PositiveNumber, Expects("a positive number of seconds")] = 10.0  # waiting for `address`

    @field_validator("address", mode="before")
    @classmethod
    def _url(cls, address: Any) -> Any:
        if address is not None and (not isinstance(address, str) or "://" not in address):
            raise ValueError("must be null or a URL such as tcp://host:8786")
        return address


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "training": TrainRecipe,
    "cts": SearchConfig,
    "grid": GridConfig,
    "runtime": RuntimeConfig,
}
# Sections with defaults for every field: a project may leave them out.
OPTIONAL_SECTIONS = {
    "methods": MethodsConfig,
    "pai": PaiConfig,
    "sanity": SanityConfig,
    "report": ReportConfig,
}


def typed_sections(params: Mapping[str, Any]) -> dict[str, Any]:
    """Each known section typed, whether Kedro already built it or not.

    Collects every section's problems instead of stopping at the first, so one run start reports all.
    """
    sections, problems = {}, []
    for key, cls in {**SECTIONS, **OPTIONAL_SECTIONS}.items():
        raw = params.get(key)
        if raw is None and key in OPTIONAL_SECTIONS:
            sections[key] = cls()
        elif raw is None:
            problems.append(f"{key}: missing from the parameters")
        else:
            section, found = section_or_problems(cls, raw, key)
            problems += found
            if section is not None:
                sections[key] = section
    problems += _unknown_sections(params)
    if "cts" in sections and "methods" in sections:
        for i, override in enumerate(sections["methods"].cts_variants):
            variant = f"methods.cts_variants[{i}]"
            _, found = section_or_problems(SearchConfig, {**sections["cts"].as_dict(), **override}, variant)
            problems += [line if line.startswith(variant) else f"{variant} {dict(override)}: {line}" for line in found]
    if problems:
        raise ConfigError("invalid parameters:\n- " + "\n- ".join(problems))
    return sections


def _unknown_sections(params: Mapping[str, Any]) -> list[str]:
    """Top-level keys that are neither a section nor a branch namespace (a misspelt section
    would otherwise be dropped silently, and its settings never applied)."""
    known = [*SECTIONS, *OPTIONAL_SECTIONS]
    try:
        namespaces = {b.namespace.split(".")[0] for b in plan(params).all()}
    except (TypeError, ValueError):  # a bad grid is reported by its own check
        namespaces = set()
    return [f"{key}: unknown section{closest(key, known)}; the sections are {', '.join(known)}"
            for key in params if key not in known and key not in namespaces]

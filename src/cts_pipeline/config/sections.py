"""Typed parameter sections: one way from raw parameters to typed sections and back.

Kedro turns each ``params:<section>`` node input annotated with one of these dataclasses (or with
:class:`~cts_pipeline.core.recipe.TrainRecipe` / :class:`~cts_pipeline.core.cts.SearchConfig`)
into an instance when it builds the catalog, so a wrong value in one section fails at once with
the section's name. :mod:`.validate` then checks what needs several sections together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.checkpoints import parse_interval
from ..core.cts import SearchConfig
from ..core.data import DATASETS
from ..core.image_folders import RESIZED_CROPS
from ..core.models import MODELS, build_model
from ..core.recipe import TrainRecipe
from ..core.runtime import CudaPolicy, check_device_choice
from .sweep import GridConfig, MethodsConfig, PaiConfig, SanityConfig, plan


class ConfigError(ValueError):
    """The configuration cannot run; the message names every offending parameter."""


# Names other tools give the same settings; difflib cannot see that "learning_rate" means "lr".
SYNONYMS = {"learning_rate": "lr", "num_epochs": "epochs", "n_epochs": "epochs", "wd": "weight_decay",
            "bs": "batch_size", "lr_milestones": "milestones", "clip_grad_norm": "grad_clip_norm",
            "warmup": "warmup_epochs", "sparsity": "sparsities", "level": "levels", "seed": "seeds"}


def closest(name: str, options: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the nearest of ``options`` to a misspelt ``name``, else ``''``."""
    import difflib

    if SYNONYMS.get(str(name)) in options:
        return f" (did you mean {SYNONYMS[str(name)]!r}?)"
    match = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def settings_from(cls, raw: Mapping[str, Any], where: str):
    """The dataclass ``cls`` from a settings file's mapping, refusing unknown keys by name."""
    from dataclasses import fields

    known = [f.name for f in fields(cls)]
    for key in raw:
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r}{closest(key, known)}; allowed: {', '.join(known)}")
    return cls(**raw)


@dataclass(frozen=True)
class DataConfig:
    """``data`` parameters."""

    name: str
    root: str = "data/01_raw"
    download: bool = False
    train_subset: int | None = None  # keep the first N training samples (tiny presets for tests)
    test_subset: int | None = None
    # Per-channel normalisation on the [0, 1] scale; null: the dataset's own statistics (data_registry).
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    # The training crop of a streamed (image-folder) dataset: torchvision's RandomResizedCrop, or the
    # authors' (longer side to 500 pixels, then scale (0.1, 1), ratio (0.8, 1.25)).
    resized_crop: str = "torchvision"

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"data.name: unknown dataset {self.name!r}; known: {', '.join(sorted(DATASETS))}")
        if self.resized_crop not in RESIZED_CROPS:
            raise ValueError(f"data.resized_crop must be {' or '.join(RESIZED_CROPS)}, got {self.resized_crop!r}")
        if self.resized_crop != "torchvision" and not DATASETS[self.name].streamed:
            raise ValueError(f"data.resized_crop applies to image-folder datasets; {self.name} is cropped by "
                             "training.augment's padded random crop (training.crop_padding)")
        channels = DATASETS[self.name].image_shape[0]
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is None:
                continue
            if not (isinstance(value, (list, tuple)) and len(value) == channels
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise ValueError(f"data.{key} must be null or {channels} numbers (one per channel of "
                                 f"{self.name}), got {value!r}")
            if key == "std" and not all(v > 0 for v in value):
                raise ValueError(f"data.std must be positive, got {value!r}")
            object.__setattr__(self, key, tuple(float(v) for v in value))
        if not isinstance(self.download, bool):
            raise ValueError(f"data.download must be true or false, got {self.download!r}")
        for key in ("train_subset", "test_subset"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"data.{key} must be null or a positive integer, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """``model`` parameters: a registry name and that model's options (e.g. ``shortcut: conv3x3``)."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ValueError(f"model.name: unknown model {self.name!r}; known: {', '.join(sorted(MODELS))}")
        if not isinstance(self.options, Mapping):
            raise ValueError(f"model.options must be a mapping, got {self.options!r}")
        object.__setattr__(self, "options", dict(self.options))

    def build(self, image_shape, num_classes, generator=None):
        return build_model(self.name, image_shape=tuple(image_shape), num_classes=num_classes,
                           generator=generator, **self.options)


@dataclass(frozen=True)
class RuntimeConfig:
    """``runtime`` parameters: where and how to run. On a CPU they never change a result; on a GPU
    TF32 and determinism change the last bits (``core.runtime.CudaPolicy``)."""

    device: str = "auto"
    progress: bool = True
    num_threads: int | None = None
    checkpoint_dir: str | None = "data/06_models/checkpoints"  # null: no per-epoch checkpoints
    # How often a long loop writes its checkpoint: N epochs, "600s" / "10min", or auto (whenever
    # writing it costs at most 5 % of the training time since the last one; the GPU presets' choice).
    checkpoint_every: int | str = 1
    channels_last: str | bool = "auto"  # auto: NHWC for convolutional models (faster on CPUs)
    compile: bool = False  # torch.compile the training forward (worth it on GPUs, not on CPUs)
    # One batched CTS search (and retraining) per seed and CTS configuration. true: always batched, so
    # runs repeat to the bit; auto: batched where a probe of a step measures it faster on this
    # device (not for ResNet-20 on a CPU), a choice that timing noise can flip between runs.
    batch_sparsities: str | bool = True
    strict: bool = False  # stop the run when a search diverges, instead of flagging the branch
    distributed: Mapping[str, Any] | None = None  # {nproc: N}: train and search over N local processes
    data_workers: int | None = None  # loader processes of a streamed (image-folder) dataset; 0 = in this
    #                                   process; null = up to 4, as the CPUs allow
    tf32: bool = True  # CUDA: TF32 matmuls and convolutions on Ampere and later (core.runtime.CudaPolicy)
    deterministic: bool = False  # CUDA: deterministic algorithms, so a GPU run repeats to the bit (slower)

    @property
    def cuda_policy(self) -> CudaPolicy:
        return CudaPolicy(tf32=self.tf32, deterministic=self.deterministic)

    @property
    def sync_batchnorm(self) -> bool:
        """Whether training over several processes normalises over the global batch."""
        return bool((self.distributed or {}).get("sync_batchnorm"))

    def __post_init__(self) -> None:
        if self.distributed is not None:
            if not isinstance(self.distributed, Mapping) or set(self.distributed) - {"nproc", "sync_batchnorm"}:
                raise ValueError("runtime.distributed must be null or {nproc: N, sync_batchnorm: false}, "
                                 f"got {self.distributed!r}")
            nproc = self.distributed.get("nproc", 1)
            if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
                raise ValueError(f"runtime.distributed.nproc must be a positive integer, got {nproc!r}")
            if not isinstance(self.distributed.get("sync_batchnorm", False), bool):
                raise ValueError("runtime.distributed.sync_batchnorm must be true or false, "
                                 f"got {self.distributed['sync_batchnorm']!r}")
        workers = self.data_workers
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise ValueError(f"runtime.data_workers must be null or a non-negative integer, got {workers!r}")
        check_device_choice(self.device)
        for key in ("tf32", "deterministic"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"runtime.{key} must be true or false, got {getattr(self, key)!r}")
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise ValueError(f"runtime.num_threads must be null or a positive integer, got {self.num_threads!r}")
        if self.channels_last not in ("auto", True, False):
            raise ValueError(f"runtime.channels_last must be auto, true or false, got {self.channels_last!r}")
        parse_interval(self.checkpoint_every)  # raises naming runtime.checkpoint_every
        if self.batch_sparsities not in ("auto", True, False):
            raise ValueError(f"runtime.batch_sparsities must be auto, true or false, got {self.batch_sparsities!r}")
        for key in ("compile", "progress", "strict"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"runtime.{key} must be true or false, got {getattr(self, key)!r}")


@dataclass(frozen=True)
class ReportConfig:
    """``report`` parameters."""

    layer_density_sparsity: float | None = 0.9926  # the per-layer density plot's sparsity (nearest in the grid)

    def __post_init__(self) -> None:
        s = self.layer_density_sparsity
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < 1):
            raise ValueError(f"report.layer_density_sparsity must be null or a fraction in (0, 1), got {s!r}")


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
    """Each known section as its dataclass, whether Kedro already built it or not.

    Collects every section's error instead of stopping at the first, so one run start reports all.
    """
    sections, problems = {}, []
    for key, cls in {**SECTIONS, **OPTIONAL_SECTIONS}.items():
        raw = params.get(key)
        if raw is None and key in OPTIONAL_SECTIONS:
            sections[key] = cls()
        elif raw is None:
            problems.append(f"{key}: missing from the parameters")
        elif isinstance(raw, cls):
            sections[key] = raw
        elif not isinstance(raw, Mapping):
            problems.append(f"{key}: expected a mapping of settings, got {raw!r}")
        else:
            unknown = [k for k in raw if k not in cls.__dataclass_fields__]
            if unknown:
                fields_ = list(cls.__dataclass_fields__)
                problems += [f"{key}.{k}: unknown setting{closest(k, fields_)}; {key} takes {', '.join(fields_)}"
                             for k in unknown]
                continue
            try:
                sections[key] = cls(**raw)
            except TypeError as exc:  # missing keys, or a value of the wrong type
                problems.append(f"{key}: {exc}".replace(f"{cls.__name__}.__init__()", "it"))
            except ValueError as exc:
                problems.append(str(exc))
    problems += _unknown_sections(params)
    if "cts" in sections and "methods" in sections:
        fields_ = list(SearchConfig.__dataclass_fields__)
        for i, override in enumerate(sections["methods"].cts_variants):
            unknown = [k for k in override if k not in fields_]
            if unknown:
                problems += [f"methods.cts_variants[{i}].{k}: unknown CTS setting{closest(k, fields_)}" for k in unknown]
                continue
            try:
                SearchConfig(**{**sections["cts"].as_dict(), **override})
            except (TypeError, ValueError) as exc:
                problems.append(f"methods.cts_variants[{i}] {dict(override)}: {exc}")
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


def as_plain_dict(section: Any) -> dict:
    """A section as plain values (for MLflow and reports)."""
    if hasattr(section, "as_dict"):
        return section.as_dict()
    return asdict(section)

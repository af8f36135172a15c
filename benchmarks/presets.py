"""A preset's recipe, network and search as the pipeline builds them, read from ``conf/`` with
plain YAML: the GPU machine has neither Kedro nor pydantic, and a benchmark that typed its own copy
of a preset's constants measured another configuration once they drifted apart.

``conf/base/parameters.yml`` with ``conf/<preset>/parameters.yml`` merged over it key by key, as
Kedro's ``soft`` merge strategy does (settings.py); ``tests/test_gpu_paths.py`` checks the result
against the pipeline's own validated configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cts_pipeline.core.cts import SearchConfig
from cts_pipeline.core.train.recipe import TrainRecipe

CONF = Path(__file__).resolve().parents[1] / "conf"


@dataclass(frozen=True)
class Preset:
    name: str
    recipe: TrainRecipe
    search: SearchConfig
    model: str
    model_options: dict[str, Any] = field(default_factory=dict)
    dataset: str = "digits"
    levels: tuple[int, ...] = ()

    @property
    def densities(self) -> list[float]:
        return [0.8 ** level for level in self.levels]

    def describe(self) -> str:
        r = self.recipe
        options = ", ".join(f"{k} {v}" for k, v in self.model_options.items())
        return (f"the `{self.name}` preset: {self.model} ({options}), batch {r.batch_size} as {r.virtual_ranks} "
                f"virtual rank{'s' if r.virtual_ranks > 1 else ''}, {r.precision}, {r.loss_reduction} loss"
                f"{f' clipped at {r.grad_clip_norm:g}' if r.grad_clip_norm else ''}, "
                f"{'augmented (' + r.crop_padding + ' padding)' if r.augment else 'no augmentation'}")


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parameters(name: str) -> dict[str, Any]:
    base = yaml.safe_load((CONF / "base" / "parameters.yml").read_text())
    return _merged(base, yaml.safe_load((CONF / name / "parameters.yml").read_text()) or {})


def preset(name: str) -> Preset:
    """The preset ``name`` (a folder of ``conf/``) as the pipeline would run it."""
    params = parameters(name)
    model = params["model"]
    return Preset(name=name, recipe=TrainRecipe(**params["training"]),
                  search=SearchConfig(**params["cts"]),
                  model=model["name"], model_options=dict(model.get("options") or {}),
                  dataset=params["data"]["name"], levels=tuple(params["grid"]["levels"] or ()))

"""Run-start validation of the whole configuration (no Kedro session needed)."""

from __future__ import annotations

import copy

import pytest
import yaml

from cts_pipeline.config import ConfigError, validate_run
from cts_pipeline.core.cts import SearchConfig
from cts_pipeline.core.training import TrainRecipe

from .conftest import PROJECT_ROOT


@pytest.fixture
def params() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "conf/base/parameters.yml").read_text())


def with_changes(params: dict, **sections) -> dict:
    out = copy.deepcopy(params)
    for section, values in sections.items():
        out[section].update(values)
    return out


def test_default_configuration_is_valid(params):
    sections = validate_run(params)
    assert isinstance(sections["training"], TrainRecipe) and isinstance(sections["cts"], SearchConfig)
    assert sections["cts"].objective == "kl" and sections["cts"].search_length == "long"


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"grid": {"sparsities": [0.0]}}, "grid.sparsities"),
        ({"grid": {"sparsities": [1.0]}}, "grid.sparsities"),
        ({"grid": {"sparsities": [-0.5]}}, "grid.sparsities"),
        ({"grid": {"sparsities": ["0.9"]}}, "grid.sparsities"),
        ({"grid": {"sparsities": [0.99261, 0.99258]}}, "same branch"),
        ({"grid": {"seeds": [0, 0]}}, "grid.seeds"),
        ({"grid": {"sparsities": [0.999995]}}, "keeps round"),  # round(0.28) = 0 of 56,224 weights left
        ({"data": {"name": "svhn"}}, "data.name"),
        ({"model": {"name": "resnet50"}}, "model.name"),
        ({"model": {"name": "vgg16"}}, "model.name"),
        ({"model": {"options": {"shortcut": "conv3x3"}}}, "shortcut"),
        ({"cts": {"objective": "mse"}}, "cts.objective"),
        ({"cts": {"search_length": "medium"}}, "cts.search_length"),
        ({"training": {"rewind_epoch": 30}}, "training.rewind_epoch"),
        ({"training": {"rewind_epoch": -2}}, "training.rewind_epoch"),
        ({"training": {"lrr": 0.1}}, "lrr"),
        ({"data": {"name": "cifar10", "root": "/nonexistent"}}, "data.download"),
        ({"runtime": {"device": "cuda:x"}}, "runtime.device"),
    ],
)
def test_each_bad_value_is_named(params, changes, named):
    with pytest.raises(ConfigError, match="invalid") as failure:
        validate_run(with_changes(params, **changes))
    assert named in str(failure.value)


def test_all_problems_are_reported_at_once(params):
    bad = with_changes(params, cts={"objective": "nope"}, training={"rewind_epoch": 99})
    with pytest.raises(ConfigError) as failure:
        validate_run(bad)
    assert "cts.objective" in str(failure.value) and "training.rewind_epoch" in str(failure.value)


def test_model_too_big_for_the_input_names_both(params):
    with pytest.raises(ConfigError) as failure:
        validate_run(with_changes(params, model={"name": "vgg16"}))
    message = str(failure.value)
    assert "vgg16" in message and "(1, 8, 8)" in message and "data.name = 'digits'" in message


def test_every_preset_is_valid_apart_from_its_data(params):
    for preset in ("smoke", "mnist_lenet", "cifar10_resnet20", "cifar10_vgg16"):
        merged = copy.deepcopy(params)
        override = yaml.safe_load((PROJECT_ROOT / "conf" / preset / "parameters.yml").read_text())
        for section, values in override.items():
            merged[section].update(values)
        merged["data"]["download"] = True  # skip the files check: presets' data is not here
        validate_run(merged)

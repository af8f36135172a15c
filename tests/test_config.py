"""Run-start validation of the whole configuration (no Kedro session needed)."""

from __future__ import annotations

import copy

import pytest
import yaml

from cts_pipeline.config.typed import ConfigError
from cts_pipeline.config.validate import validate_run
from cts_pipeline.core.cts import SearchConfig
from cts_pipeline.core.train.recipe import TrainRecipe

from .conftest import PROJECT_ROOT


@pytest.fixture
def params() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "conf/base/parameters.yml").read_text())


def with_changes(params: dict, **sections) -> dict:
    out = copy.deepcopy(params)
    for section, values in sections.items():
        out[section].update(values)
        if section == "grid" and "sparsities" in values and "levels" not in values:
            out["grid"]["levels"] = None  # the base grid's levels would take precedence
    return out


def test_grid_levels_give_every_method_the_density_of_ltr_level_l(params, caplog):
    import logging

    from cts_pipeline.config.sweep import GridConfig, plan
    from cts_pipeline.core.nets.masks import kept_count
    from cts_pipeline.core.prune.ltr import level_density

    assert params["grid"]["levels"] == [10, 14, 18, 22, 24]
    grid = GridConfig(levels=[18, 28], sparsities=[0.5])
    assert grid.sparsities == (1 - 0.8 ** 18, 1 - 0.8 ** 28)
    p = plan({**params, "grid": {"levels": [18, 28], "seeds": [0]}})
    for branches in (p.cts, p.pai, p.ltr):
        assert [b.density for b in branches[:2]] == [level_density(18), level_density(28)]
    assert [b.settings["level"] for b in p.ltr] == [18, 28] and p.ltr_runs[0].settings["max_level"] == 28
    # Level 28 of LeNet-300-100: 1 - 0.9981 (4 decimals) keeps 1.8 % fewer weights than LTR.
    d = 266_200
    assert kept_count(p.cts[1].density, d) == round(0.8 ** 28 * d) == 515
    assert kept_count(1 - 0.9981, d) == 506
    with caplog.at_level(logging.INFO, logger="cts_pipeline"):
        validate_run({**params, "grid": {"levels": [18, 22], "sparsities": [0.5], "seeds": [0]}})
    assert "grid.levels [18, 22] take precedence over grid.sparsities [0.5]" in caplog.text


@pytest.mark.parametrize("levels", [[0], [2.5], [], [22, 18], [18, 18], "18", [61], [True]])
def test_bad_grid_levels_are_refused_by_name(levels):
    from cts_pipeline.config.sweep import GridConfig

    with pytest.raises(ValueError, match=r"^grid\.levels"):
        GridConfig(levels=levels)


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
        ({"model": {"name": "alexnet"}}, "model.name"),
        ({"model": {"name": "vgg16"}}, "model.name"),
        ({"model": {"options": {"shortcut": "conv3x3"}}}, "shortcut"),
        ({"cts": {"objective": "mse"}}, "cts.objective"),
        ({"cts": {"search_length": "medium"}}, "cts.search_length"),
        ({"training": {"rewind_epoch": 30}}, "training.rewind_epoch"),
        ({"training": {"rewind_epoch": -2}}, "training.rewind_epoch"),
        ({"training": {"lrr": 0.1}}, "lrr"),
        ({"data": {"name": "cifar10", "root": "/nonexistent"}}, "data.download"),
        ({"runtime": {"device": "cuda:x"}}, "runtime.device"),
        ({"runtime": {"device": "cpu", "distributed": {"nproc": 2, "sync_batchnorm": True}}}, "needs CUDA"),
        ({"runtime": {"distributed": {"nproc": 2, "sync_batchnorm": "yes"}}}, "sync_batchnorm"),
        ({"runtime": {"data_workers": -1}}, "runtime.data_workers"),
        ({"training": {"warmup_epochs": 31}}, "training.warmup_epochs"),
        ({"data": {"name": "tiny_imagenet", "root": "/nonexistent"}}, "tiny-imagenet-200/train  (missing)"),
        ({"data": {"name": "imagenet", "root": "/nonexistent", "download": True}, "model": {"name": "resnet18"},
          "training": {"batch_size": 63}, "runtime": {"distributed": {"nproc": 2}}},
         "training.batch_size = 63 must be a multiple of runtime.distributed.nproc = 2"),
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
    for preset in ("smoke", "mnist_lenet", "cifar10_resnet20", "cifar10_vgg16", "imagenet_resnet50",
                   "cifar100_resnet20", "tiny_imagenet_resnet18"):
        merged = copy.deepcopy(params)
        override = yaml.safe_load((PROJECT_ROOT / "conf" / preset / "parameters.yml").read_text())
        for section, values in override.items():
            merged[section].update(values)
        merged["data"]["download"] = True  # skip the files check: presets' data is not here
        validate_run(merged)


@pytest.mark.parametrize(("pipeline", "changes", "named"), [
    ("ltr", {"methods": {"ltr": False}}, "--pipelines=ltr has nothing to run: methods.ltr is false"),
    ("pai", {"methods": {"pai": []}}, "--pipelines=pai has nothing to run: methods.pai is empty"),
    ("sanity", {"sanity": {"checks": []}}, "--pipelines=sanity has nothing to run"),
])
def test_a_pipeline_that_would_produce_nothing_is_refused(params, pipeline, changes, named):
    with pytest.raises(ConfigError, match=named):
        validate_run(with_changes(params, **changes), [pipeline])
    validate_run(with_changes(params, **changes), ["cts"])  # other pipelines still run


def test_virtual_ranks_are_shared_equally_by_the_processes_or_refused_in_one_line(params):
    def run_with(virtual_ranks, nproc):
        return validate_run(with_changes(params, training={"virtual_ranks": virtual_ranks, "batch_size": 64},
                                         runtime={"distributed": {"nproc": nproc}, "device": "cpu"}))

    run_with(4, 2)  # each process plays two of the recipe's four ranks
    run_with(1, 2)  # one recipe rank: the processes split one device's step
    with pytest.raises(ConfigError, match=r"training.virtual_ranks = 2 must be a multiple of "
                                          r"runtime.distributed.nproc = 4: each process plays"):
        run_with(2, 4)


def test_grid_levels_take_a_range_for_the_command_line():
    from cts_pipeline.config.sweep import GridConfig, sparsity_label

    grid = GridConfig(levels="2..42/2")
    assert grid.levels == tuple(range(2, 43, 2))
    labels = [sparsity_label(s) for s in grid.sparsities]
    assert labels == sorted(labels) and len(set(labels)) == 21
    assert labels[-1] == "sp99_9915" and labels[10] == "sp99_26"  # four decimals only from 99.9 % on
    assert GridConfig(levels="18..20").levels == (18, 19, 20)
    with pytest.raises(ValueError, match=r"grid.levels must be a list of levels or a range FIRST..LAST\[/STEP\]"):
        GridConfig(levels="42..2")


# --- the typed sections: pydantic's checks, in the YAML writer's words ----------------------------


@pytest.mark.parametrize(("section", "raw", "line"), [
    ("runtime", {"tf32": "yes"}, "runtime.tf32 must be true or false, got 'yes'"),
    ("runtime", {"num_threads": 2.0}, "runtime.num_threads must be null or a positive integer, got 2.0"),
    ("runtime", {"distributed": {"nproc": 0}}, "runtime.distributed.nproc must be a positive integer, got 0"),
    ("runtime", {"distributed": {"nprocs": 2}},
     "runtime.distributed: unknown key 'nprocs' (did you mean 'nproc'?); allowed: nproc, sync_batchnorm"),
    ("runtime", {"channels_last": "yes"}, "runtime.channels_last must be auto, true or false, got 'yes'"),
    ("runtime", {"virtual_rank_passes": "parallel"},
     "runtime.virtual_rank_passes must be auto, one or sequential, got 'parallel'"),
    ("data", {"name": "digits", "mean": ["a"]}, "data.mean[0]: input should be a valid number, got 'a'"),
    ("data", {"root": "x"}, "data.name: missing (required)"),
    ("model", {"name": "lenet_300_100", "options": 3}, "model.options must be a mapping of the model's options, got 3"),
    ("report", {"layer_density_sparsity": 1.5},
     "report.layer_density_sparsity must be null or a fraction in (0, 1), got 1.5"),
    ("pai", {"at": "end"}, "pai.at must be rewind or init, got 'end'"),
    ("grid", {"sparsities": [0.5], "seedz": [1]}, "grid: unknown key 'seedz' (did you mean 'seeds'?)"),
])
def test_each_section_names_a_bad_value_in_one_line(section, raw, line):
    """Built from a mapping (the run's path), directly (code's), or by Kedro's ``model_validate``
    (whose pydantic error the run's own check precedes): the same one line."""
    from pydantic import ValidationError

    from cts_pipeline.config.sections import OPTIONAL_SECTIONS, SECTIONS
    from cts_pipeline.config.typed import problems_of, read_section

    cls = {**SECTIONS, **OPTIONAL_SECTIONS}[section]
    for build in (lambda: read_section(cls, raw), lambda: cls(**raw)):
        with pytest.raises(ConfigError) as failure:
            build()
        assert str(failure.value).startswith(line), str(failure.value)
    with pytest.raises(ValidationError) as failure:
        cls.model_validate(raw)
    assert problems_of(cls, failure.value)[0].startswith(line)


def test_a_cts_variant_is_checked_as_the_cts_section_it_becomes(params):
    bad = with_changes(params, methods={"cts_variants": [{"objectiv": "ce"}, {"objective": "hinge"}]})
    with pytest.raises(ConfigError) as failure:
        validate_run(bad)
    message = str(failure.value)
    assert "methods.cts_variants[0]: unknown key 'objectiv' (did you mean 'objective'?)" in message
    assert "methods.cts_variants[1] {'objective': 'hinge'}: cts.objective must be one of" in message


def test_sections_are_frozen_and_replace_validates():
    from cts_pipeline.config.sections import RuntimeConfig

    runtime = RuntimeConfig(device="cpu", distributed=None)
    assert runtime.distributed.nproc == 1 and not runtime.sync_batchnorm  # null: one process
    with pytest.raises(ValueError):
        runtime.tf32 = False
    assert runtime.replace(tf32=False).tf32 is False
    with pytest.raises(ConfigError, match="runtime.data_workers must be null or a non-negative integer, got -1"):
        runtime.replace(data_workers=-1)


def test_checkpoint_tags_outlive_the_move_to_pydantic():
    """A section's checkpoint tag is a digest of its plain values, so checkpoints written while the
    sections were dataclasses (this tag) still resume."""
    from cts_pipeline.config.identity import checkpoint_tag
    from cts_pipeline.config.sections import ModelConfig

    model = ModelConfig(name="resnet20", options={"shortcut": "conv3x3"})
    assert checkpoint_tag("dense", model, TrainRecipe(epochs=2, batch_size=8, lr=0.1), 0) == "9a5cfecc202a72d9"


def test_every_problem_of_a_section_is_its_own_line_nested_ones_too(params):
    """Pydantic validates a section nested in another through its own ``__init__``, whose error
    the outer one then holds: its lines are unpacked, not joined into one."""
    bad = with_changes(params, runtime={"tf32": "yes", "distributed": {"nproc": 0, "sync_batchnrm": True}})
    with pytest.raises(ConfigError) as failure:
        validate_run(bad)
    lines = str(failure.value).splitlines()
    for line in ("- runtime.tf32 must be true or false, got 'yes'",
                 "- runtime.distributed.nproc must be a positive integer, got 0",
                 "- runtime.distributed: unknown key 'sync_batchnrm' (did you mean 'sync_batchnorm'?); allowed: nproc, sync_batchnorm"):
        assert line in lines, str(failure.value)


def test_the_architecture_docs_name_every_setting_of_every_section():
    """docs/architecture.md's table of sections stays true to the code: each section's row names
    each of its settings."""
    import dataclasses

    from cts_pipeline.config.sections import OPTIONAL_SECTIONS, SECTIONS

    rows = {line.split("|")[1].strip(" `"): line for line in
            (PROJECT_ROOT / "docs" / "architecture.md").read_text().splitlines() if line.startswith("| `")}
    for name, cls in {**SECTIONS, **OPTIONAL_SECTIONS}.items():
        fields = list(getattr(cls, "model_fields", None) or (f.name for f in dataclasses.fields(cls)))
        missing = [f for f in fields if f"`{f}`" not in rows[name]]
        assert not missing, f"docs/architecture.md's `{name}` row does not name {missing}"

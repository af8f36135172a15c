"""The DAG the registry builds from the grid: one namespaced branch per (seed, sparsity)."""

from __future__ import annotations

import copy

import pytest
import yaml

from cts_pipeline import active_config
from cts_pipeline.context import with_branch_parameters
from cts_pipeline.grid import Branch, cts_method_name, sparsity_label
from cts_pipeline.pipeline_registry import register_pipelines

from ..conftest import PROJECT_ROOT


class Loader(dict):
    """Stands in for the session's config loader."""


@pytest.fixture
def params():
    raw = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters.yml").read_text())
    raw["grid"] = {"sparsities": [0.982, 0.9926], "seeds": [0, 1]}
    yield raw
    active_config.forget()


def pipelines_for(params):
    active_config.remember(Loader(parameters=params))
    return register_pipelines()


def test_one_branch_per_seed_and_sparsity(params):
    cts = pipelines_for(params)["cts"]
    namespaces = {n.namespace for n in cts.nodes if n.namespace}
    assert namespaces == {
        "dense.seed0", "dense.seed1",
        "cts_kl.seed0.sp98_20", "cts_kl.seed0.sp99_26", "cts_kl.seed1.sp98_20", "cts_kl.seed1.sp99_26",
    }
    branch = [n.name.rsplit(".", 1)[1] for n in cts.nodes if n.namespace == "cts_kl.seed1.sp99_26"]
    assert branch == ["search", "binary_mask", "retrain", "evaluate"]  # topological order
    search = next(n for n in cts.nodes if n.name == "cts_kl.seed1.sp99_26.search")
    assert "dense.seed1.theta_rewind" in search.inputs
    assert "params:cts_kl.seed1.sp99_26.branch" in search.inputs and "params:cts" in search.inputs
    report = next(n for n in cts.nodes if n.name == "cts_report")
    assert len(report.inputs) == 6 and set(report.outputs) == {"cts_results_table", "cts_accuracy_plot"}


def test_search_at_init_uses_theta_0_and_its_own_namespace(params):
    params["cts"]["search_at"] = "init"
    cts = pipelines_for(params)["cts"]
    search = next(n for n in cts.nodes if n.name.endswith("seed0.sp98_20.search"))
    assert search.namespace == "cts_kl_at_init.seed0.sp98_20"
    assert "dense.seed0.theta_init" in search.inputs


def test_branch_parameters_match_the_pipeline(params):
    nodes = pipelines_for(params)["cts"].nodes
    wanted = {i for n in nodes for i in n.inputs if i.endswith(".branch")}
    flat = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, Branch):
                flat[f"params:{prefix}{k}"] = v
            elif isinstance(v, dict):
                walk(v, f"{prefix}{k}.")

    walk(with_branch_parameters(copy.deepcopy(params)), "")
    assert set(flat) == wanted
    assert flat["params:cts_kl.seed1.sp99_26.branch"] == Branch("cts_kl", 1, 0.9926)


def test_branch_parameters_refuse_to_overwrite_a_user_parameter(params):
    params["dense"] = 3
    with pytest.raises(ValueError, match="dense"):
        with_branch_parameters(params)


def test_names():
    assert sparsity_label(0.9926) == "sp99_26" and sparsity_label(0.5) == "sp50_00"
    assert cts_method_name({"objective": "kl"}) == "cts_kl"
    assert cts_method_name({"objective": "ce", "search_length": "short", "search_at": "init"}) == "cts_ce_short_at_init"
    assert cts_method_name({"objective": "kl", "epochs": 3, "balance": "lagrangian"}) == "cts_kl_3ep_lagrangian"

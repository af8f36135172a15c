"""The DAG the registry builds from the sweep: one namespaced branch per method, seed and sparsity."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml

from cts_pipeline.config import active as active_config
from cts_pipeline.config.identity import cts_method_name
from cts_pipeline.config.sweep import Branch, plan, sparsity_label
from cts_pipeline.core.cts import SearchConfig
from cts_pipeline.framework.context import with_branch_parameters
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


def namespaces(pipeline) -> set[str]:
    return {n.namespace for n in pipeline.nodes if n.namespace}


def test_cts_has_one_batched_search_per_seed_fanning_out_to_each_sparsity(params):
    cts = pipelines_for(params)["cts"]
    assert namespaces(cts) == {
        "dense.seed0", "dense.seed1", "cts_kl.seed0", "cts_kl.seed1",
        "cts_kl.seed0.sp98_20", "cts_kl.seed0.sp99_26", "cts_kl.seed1.sp98_20", "cts_kl.seed1.sp99_26",
    }
    search = next(n for n in cts.nodes if n.name == "cts_kl.seed1.search")
    assert search.namespace == "cts_kl.seed1"
    assert search.inputs[4] == "dense.seed1.theta_rewind"  # after the data and the settings
    assert search.inputs[-2:] == ["params:cts_kl.seed1.sp98_20.branch", "params:cts_kl.seed1.sp99_26.branch"]
    assert set(search.outputs) == {"cts_kl.seed1.sp98_20.scores", "cts_kl.seed1.sp98_20.mask_log",
                                   "cts_kl.seed1.sp99_26.scores", "cts_kl.seed1.sp99_26.mask_log"}
    branch = [n.name.rsplit(".", 1)[1] for n in cts.nodes if n.namespace == "cts_kl.seed1.sp99_26"]
    assert branch == ["binary_mask"]
    group = [n.name.rsplit(".", 1)[1] for n in cts.nodes if n.namespace == "cts_kl.seed1"]
    assert group == ["search", "retrain", "evaluate_sp98_20", "evaluate_sp99_26"]  # topological order
    retrain = next(n for n in cts.nodes if n.name == "cts_kl.seed1.retrain")
    assert retrain.inputs[5] == "dense.seed1.theta_rewind"  # after the data and the settings
    assert {"cts_kl.seed1.sp98_20.mask", "cts_kl.seed1.sp99_26.mask"} <= set(retrain.inputs)
    assert set(retrain.outputs) == {"cts_kl.seed1.sp98_20.final_weights", "cts_kl.seed1.sp98_20.retrain_log",
                                    "cts_kl.seed1.sp99_26.final_weights", "cts_kl.seed1.sp99_26.retrain_log"}
    evaluate = next(n for n in cts.nodes if n.name == "cts_kl.seed1.evaluate_sp99_26")
    assert evaluate.outputs == ["cts_kl.seed1.sp99_26.metrics", "cts_kl.seed1.sp99_26.ticket"]
    assert "metrics" in evaluate.tags
    report = next(n for n in cts.nodes if n.name == "cts_report")
    assert report.inputs[:2] == ["params:report", "run_identity"] and len(report.inputs) == 8  # 2 dense + 4 tickets
    assert "cts_results_table" in report.outputs and "cts_layer_density_plot" in report.outputs


def test_cts_without_batching_has_one_search_per_branch(params):
    params["runtime"]["batch_sparsities"] = False
    cts = pipelines_for(params)["cts"]
    assert namespaces(cts) == {
        "dense.seed0", "dense.seed1",
        "cts_kl.seed0.sp98_20", "cts_kl.seed0.sp99_26", "cts_kl.seed1.sp98_20", "cts_kl.seed1.sp99_26",
    }
    branch = [n.name.rsplit(".", 1)[1] for n in cts.nodes if n.namespace == "cts_kl.seed1.sp99_26"]
    assert branch == ["search", "binary_mask", "retrain", "evaluate"]  # topological order
    search = next(n for n in cts.nodes if n.name == "cts_kl.seed1.sp99_26.search")
    assert "dense.seed1.theta_rewind" in search.inputs
    assert "params:cts_kl.seed1.sp99_26.branch" in search.inputs


def test_network_objectives_keep_one_search_per_branch(params):
    params["cts"]["objective"] = "feature_mse"
    cts = pipelines_for(params)["cts"]
    assert "cts_feature_mse.seed0.sp99_26.search" in {n.name for n in cts.nodes}
    assert "cts_feature_mse.seed0.search" not in {n.name for n in cts.nodes}


def test_compare_holds_every_method_and_shares_the_dense_runs(params):
    params["methods"]["cts_variants"] = [{"search_length": "short"}, {"objective": "ce", "search_at": "init"}]
    pipelines = pipelines_for(params)
    compare = pipelines["compare"]
    methods = {ns.split(".")[0] for ns in namespaces(compare)}
    assert methods == {"dense", "cts_kl", "cts_kl_short", "cts_ce_at_init", "ltr",
                       "snip", "grasp", "synflow", "magnitude", "random"}
    assert len([n for n in compare.nodes if n.name.endswith("train_dense")]) == 2, "one dense run per seed"
    prune = next(n for n in compare.nodes if n.name == "ltr.seed0.prune")
    assert {"dense.seed0.theta_rewind", "dense.seed0.final_weights"} <= set(prune.inputs)
    select = next(n for n in compare.nodes if n.name == "ltr.seed0.sp99_26.select_level")
    assert "ltr.seed0.level_masks" in select.inputs
    snip = next(n for n in compare.nodes if n.name == "snip.seed0.sp98_20.score")
    assert "dense.seed0.theta_init" in snip.inputs, "SNIP scores at initialisation by default"
    init_search = next(n for n in compare.nodes if n.name == "cts_ce_at_init.seed0.search")
    assert "dense.seed0.theta_init" in init_search.inputs
    # Every pipeline reuses the same retraining and evaluation nodes (no copies).
    assert pipelines["cts"].only_nodes("cts_kl.seed0.retrain").nodes == compare.only_nodes("cts_kl.seed0.retrain").nodes
    for method in ("snip", "ltr", "cts_kl_short"):  # every family retrains a seed's tickets together
        assert f"{method}.seed0.retrain" in {n.name for n in compare.nodes}


def test_sanity_branches_reuse_the_checked_branches(params):
    pipelines = pipelines_for(params)
    sanity = pipelines["sanity"]
    checks = {ns for ns in namespaces(sanity) if ns.split(".")[0].endswith(("shuffled", "inverted", "reinit"))}
    assert checks == {f"{m}.seed{s}.sp99_26" for s in (0, 1)
                      for m in ("cts_kl_shuffled", "cts_kl_inverted", "cts_kl_reinit", "snip_shuffled", "snip_inverted",
                                "snip_reinit")}
    shuffle = next(n for n in sanity.nodes if n.name == "cts_kl_shuffled.seed0.sp99_26.shuffle_mask")
    assert "cts_kl.seed0.sp99_26.mask" in shuffle.inputs
    invert = next(n for n in sanity.nodes if n.name == "snip_inverted.seed1.sp99_26.invert_mask")
    assert "snip.seed1.sp99_26.scores" in invert.inputs
    retrain = next(n for n in sanity.nodes if n.name == "snip_reinit.seed0.sp99_26.retrain")
    assert "snip_reinit.seed0.sp99_26.theta_start" in retrain.inputs, "reinit trains from fresh weights"
    assert "snip.seed0.sp99_26.mask" in retrain.inputs
    assert {"snip.seed0.evaluate_sp99_26", "cts_kl.seed1.evaluate_sp99_26"} <= {n.name for n in sanity.nodes}
    assert set(pipelines["__default__"].nodes) >= set(pipelines["compare"].nodes) | set(sanity.nodes)


def test_pai_at_rewind_scores_theta_k(params):
    params["pai"]["at"] = "rewind"
    compare = pipelines_for(params)["compare"]
    score = next(n for n in compare.nodes if n.name == "grasp_at_rewind.seed0.sp98_20.score")
    assert "dense.seed0.theta_rewind" in score.inputs


def test_branch_parameters_match_the_pipelines(params):
    nodes = pipelines_for(params)["__default__"].nodes
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
    cts = flat["params:cts_kl.seed1.sp99_26.branch"]
    assert (cts.method, cts.seed, cts.sparsity, cts.family) == ("cts_kl", 1, 0.9926, "cts")
    assert SearchConfig(**cts.settings) == SearchConfig(**params["cts"])
    assert flat["params:ltr.seed0.branch"].settings == {"max_level": 22, "levels": [18, 22]}
    assert flat["params:snip_reinit.seed1.sp99_26.branch"].start == "init"
    assert flat["params:cts_kl_reinit.seed1.sp99_26.branch"].start == "init", "a fresh network: the whole schedule"


def test_branch_parameters_refuse_to_overwrite_a_user_parameter(params):
    params["dense"] = 3
    with pytest.raises(ValueError, match="dense"):
        with_branch_parameters(params)


@pytest.mark.parametrize("change", [{"methods": ["nope"]}, {"sparsities": [0.5]}])
def test_unrunnable_sanity_settings_stop_only_runs_that_check(params, change):
    params["sanity"] = {**params["sanity"], **change}
    p = plan(params)  # other pipelines still build
    assert p.sanity == [] and p.problems and p.cts
    p.check(["cts", "compare"])
    for pipelines in (["sanity"], None, ["__default__"]):
        with pytest.raises(ValueError, match=r"sanity\.(methods|sparsities)"):
            p.check(pipelines)


def test_sanity_aliases_resolve_to_the_planned_names(params):
    params["cts"]["epochs"] = 3
    params["pai"]["at"] = "rewind"
    names = {b.method for b in plan(params).sanity}
    assert names == {"cts_kl_3ep_shuffled", "cts_kl_3ep_inverted", "cts_kl_3ep_reinit", "snip_at_rewind_shuffled",
                     "snip_at_rewind_inverted", "snip_at_rewind_reinit"}, "reinit applies to masks found at θ_k too"


@pytest.mark.parametrize(("change", "named"), [
    ({"sanity": {"checks": ["flip"]}}, "sanity.checks"),
    ({"methods": {"pai": ["obd"]}}, "methods.pai"),
    ({"methods": {"cts_variants": [{"objective": "kl"}]}}, "methods.cts_variants"),
    ({"pai": {"at": "end"}}, "pai.at"),
])
def test_bad_sweep_settings_are_named(params, change, named):
    for section, values in change.items():
        params[section] = {**params.get(section, {}), **values}
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        plan(params)


def test_every_search_setting_is_in_the_branch_name():
    """Branch artifacts are keyed on the recipe only, so the name must spell out every choice."""
    base = SearchConfig()
    changed = {"objective": "fkl", "search_length": "short", "epochs": 7, "balance": "lagrangian",
               "lr": 0.05, "search_at": "init", "loss_scale": 1.0, "min_kept_per_layer": 16,
               "schedule": "authors", "feature_capture": "activations"}
    assert set(changed) == {f.name for f in dataclasses.fields(SearchConfig)}
    for field, value in changed.items():
        # feature_capture changes only feature_mse's computation, and only its name.
        start = dataclasses.replace(base, objective="feature_mse") if field == "feature_capture" else base
        other = dataclasses.replace(start, **{field: value})
        assert cts_method_name(other.as_dict()) != cts_method_name(start.as_dict()), field


def test_names():
    assert sparsity_label(0.9926) == "sp99_26" and sparsity_label(0.5) == "sp50_00"
    assert cts_method_name({"objective": "kl"}) == "cts_kl"
    assert cts_method_name({"objective": "ce", "search_length": "short", "search_at": "init"}) == "cts_ce_short_at_init"
    assert cts_method_name({"objective": "kl", "epochs": 3, "balance": "lagrangian"}) == "cts_kl_3ep_lagrangian"
    assert cts_method_name({"objective": "kl", "loss_scale": 1.0}) == "cts_kl_ls1"
    assert cts_method_name({"objective": "kl", "loss_scale": 0.5, "min_kept_per_layer": 8}) == "cts_kl_ls0p5_floor8"


def test_the_seeds_share_nodes_only_where_runtime_stack_seeds_says(params, monkeypatch):
    """true: one dense node and one retraining node per method for every seed; false, or auto on a
    CPU: a node per seed; auto on an accelerator: shared (the node then probes)."""
    import torch

    params["grid"]["seeds"] = [0, 1, 2]

    def names(stack_seeds, cuda=False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        params["runtime"]["stack_seeds"] = stack_seeds
        return {n.name for n in pipelines_for(params)["compare"].nodes}

    stacked = names(True)
    assert "dense.seeds.train" in stacked and not any(n.endswith("train_dense") for n in stacked)
    for method in ("cts_kl", "ltr", "snip"):
        assert f"{method}.seeds.retrain" in stacked and f"{method}.seed0.retrain" not in stacked
    assert "cts_kl.seeds.evaluate_seed2_sp99_26" in stacked
    assert "cts_kl.search_seeds" in stacked and "cts_kl.seed1.search" not in stacked
    per_seed = names(False)
    assert {"dense.seed0.train_dense", "dense.seed2.train_dense", "cts_kl.seed1.retrain"} <= per_seed
    assert "dense.seeds.train" not in per_seed
    assert names("auto") == per_seed, "auto keeps a node per seed on a CPU"
    assert names("auto", cuda=True) == stacked, "and shares them on an accelerator"


@pytest.mark.parametrize("stack_seeds", [True, False])
def test_every_namespace_is_one_contiguous_piece_of_the_dag(params, stack_seeds):
    """No path leaves a namespace's nodes and comes back into them: kedro-viz collapses each
    namespace to one node, which must not make a cycle (a group's search, the branches' masks, the
    group's retraining)."""
    params["grid"]["seeds"] = [0, 1]
    params["runtime"]["stack_seeds"] = stack_seeds
    params["methods"]["cts_variants"] = [{"objective": "feature_mse"}]
    pipeline = pipelines_for(params)["__default__"]
    parents = {n: set(p) for n, p in pipeline.node_dependencies.items()}
    children: dict = {n: set() for n in pipeline.nodes}
    for child, ps in parents.items():
        for p in ps:
            children[p].add(child)

    def below(start: set) -> set:
        seen, todo = set(), list(start)
        while todo:
            for c in children[todo.pop()]:
                if c not in seen:
                    seen.add(c)
                    todo.append(c)
        return seen

    prefixes = {".".join(n.namespace.split(".")[:i]) for n in pipeline.nodes if n.namespace
                for i in range(1, n.namespace.count(".") + 2)}
    for prefix in sorted(prefixes):
        inside = {n for n in pipeline.nodes if n.namespace and (n.namespace == prefix or
                                                                 n.namespace.startswith(prefix + "."))}
        outside_below = below(inside) - inside
        assert not below(outside_below) & inside, f"namespace {prefix} is not contiguous"

"""Your model (issue 36): ``model.name: "<package.module>:<callable>"`` or ``"torchvision:<name>"``.
The factory's own initialisation under the branch's seed (seeds differ, a seed repeats, the global
RNG is untouched), and the pipelines run on it as on a built-in network."""

from __future__ import annotations

import json

import pytest
import torch

from cts_pipeline.core.device.runtime import generator
from cts_pipeline.core.nets.masks import count_prunable, kept_count
from cts_pipeline.core.nets.registry import build_model, check_model_fits

from .conftest import latest, run_pipeline


def built(name: str, seed: int, **options):
    return build_model(name, image_shape=(3, 32, 32), num_classes=7, generator=generator("cpu", seed, "model-init"),
                       **options)


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v3_small",
                                  "tests.own_models:tiny_mlp"])
def test_an_own_model_is_initialised_by_its_factory_under_the_seed_and_leaves_the_global_rng_alone(name):
    before = torch.get_rng_state()
    first, again, other = built(name, 0), built(name, 0), built(name, 1)
    assert torch.equal(torch.get_rng_state(), before), "the global RNG moved"
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), f"{key}: one seed, two initialisations"
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in first.state_dict().items()
               if v.is_floating_point() and v.numel() > 1), "two seeds, one initialisation"
    with torch.no_grad():
        assert first.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_the_factory_gets_the_class_count_and_image_shape_where_its_signature_takes_them():
    mlp = build_model("tests.own_models:tiny_mlp", image_shape=(1, 8, 8), num_classes=10, hidden=16)
    assert mlp[1].in_features == 64 and mlp[1].out_features == 16 and mlp[3].out_features == 10
    cnn = build_model("tests.own_models:small_cnn", image_shape=(1, 8, 8), num_classes=4, width=6)
    assert cnn[-1].out_features == 4 and cnn[0].out_channels == 6
    check_model_fits("tests.own_models:small_cnn", image_shape=(1, 8, 8), num_classes=4)
    with pytest.raises(ValueError, match="the factory raised TypeError: .*unexpected keyword argument 'depth'"):
        build_model("tests.own_models:small_cnn", image_shape=(1, 8, 8), num_classes=4, depth=3)


def test_the_compare_pipeline_runs_on_an_own_model(project):
    """Every method finds, retrains and reports tickets of a network defined outside the project,
    with exact kept counts."""
    name = "tests.own_models:small_cnn"
    run_pipeline(project, pipeline="compare", params={"model": {"name": name, "options": {"width": 6}},
                                                      "methods": {"pai": ["snip", "magnitude"]}})
    prunable = count_prunable(build_model(name, image_shape=(1, 8, 8), num_classes=10, width=6))
    records = [json.loads(p.read_text()) for p in project.glob("data/08_reporting/smoke/*/*/*/metrics.json/*/metrics.json")]
    methods = {r["method"] for r in records}
    assert methods == {"cts_kl", "ltr", "snip", "magnitude"}
    for record in records:
        assert record["model"] == name and record["prunable_weights"] == prunable
        if record["method"] != "ltr":
            assert record["kept_weights"] == kept_count(record["target_density"], prunable), record["namespace"]
    from cts_pipeline.api import load_ticket

    _, mask, manifest = load_ticket(latest(project, "data/07_model_output/smoke/cts_kl-*/seed0/sp90_00/ticket.safetensors"))
    assert manifest["model"] == name and manifest["model_options"] == {"width": 6}
    assert sum(int(m.sum()) for m in mask.values()) == kept_count(0.1, prunable)

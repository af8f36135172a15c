"""Your model, your data (issue 36), end to end: the ``compare`` and ``sanity`` pipelines on networks
and data the project has never seen, with exact kept counts for every method, the prunable
selection honoured everywhere, and a rerun with ``--only-missing-outputs`` that recomputes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cts_pipeline.core.nets.masks import kept_count

from .conftest import run_pipeline

EVERY_METHOD = {"cts_kl", "ltr", "snip", "grasp", "synflow", "magnitude", "random"}


def artifacts(project: Path) -> set[Path]:
    return {p for p in (project / "data").rglob("*") if p.is_file()}


def records(project: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in project.glob("data/08_reporting/**/metrics.json/*/metrics.json")]


def own_env(project: Path) -> str:
    """An environment with the smoke preset's sizes but none of its model options (a preset's
    ``model.options`` are its own network's)."""
    import yaml

    smoke = yaml.safe_load((project / "conf/smoke/parameters.yml").read_text())
    smoke.pop("model", None)
    (project / "conf/own").mkdir(exist_ok=True)
    (project / "conf/own/parameters.yml").write_text(yaml.safe_dump(smoke))
    return "own"


def run_everything(project: Path, params: dict) -> list[dict]:
    """``compare`` and ``sanity`` (the default pipeline), then the same run with
    ``--only-missing-outputs``, which must find nothing to do. Returns the branches' metrics."""
    env = own_env(project)
    run_pipeline(project, env=env, pipeline="__default__", params=params)
    before = artifacts(project)
    run_pipeline(project, env=env, pipeline="__default__", params=params, only_missing_outputs=True)
    assert artifacts(project) == before, sorted(map(str, artifacts(project) - before))[:5]
    return records(project)


def check_exact_counts(found: list[dict], prunable: int, layers: set[str]) -> None:
    assert {r["method"] for r in found} >= EVERY_METHOD
    assert {r["family"] for r in found} >= {"sanity"}
    for record in found:
        assert record["prunable_weights"] == prunable, record["namespace"]
        if record["family"] == "dense":
            continue
        assert set(record["layer_kept"]) == layers, record["namespace"]
        if record["method"] != "ltr":
            assert record["kept_weights"] == kept_count(record["target_density"], prunable), record["namespace"]


def test_a_transformer_with_its_attention_in_projection_pruned(project, logged):
    params = {"model": {"name": "tests.own_models:tiny_transformer", "options": {"width": 16},
                        "prunable": ["Linear", "*.in_proj_weight"]},
              "sanity": {"sparsities": [0.9]}}
    found = run_everything(project, params)
    # its tickets (two sparsities per method) would stack, but attention does not: one line says why
    why = [r.getMessage() for r in logged if "one at a time, not stacked" in r.getMessage()]
    assert why and "does not know the model's LayerNorm, MultiheadAttention, _TinyTransformer" in why[0], why
    layers = {"embed.weight", "attention.in_proj_weight", "attention.out_proj.weight", "head.weight"}
    check_exact_counts(found, 16 * 8 + 48 * 16 + 16 * 16 + 10 * 16, layers)
    cts = next(r for r in found if r["method"] == "cts_kl" and r["target_sparsity"] == 0.9)
    assert 0 < cts["layer_kept"]["attention.in_proj_weight"] < 48 * 16
    # the ticket rebuilds the model by importing its factory, with the same selection
    from cts_pipeline.api import load_ticket

    from .conftest import latest

    model, mask, manifest = load_ticket(latest(project, "data/07_model_output/default/cts_kl-*/seed0/sp90_00/ticket.safetensors"))
    assert manifest["model_prunable"] == ["Linear", "*.in_proj_weight"] and set(mask) == layers
    assert int(mask["attention.in_proj_weight"].sum()) == cts["layer_kept"]["attention.in_proj_weight"]
    # the table and MLflow say how many weights are prunable, in how many layers, chosen how
    import pandas as pd
    from mlflow.tracking import MlflowClient

    table = pd.read_csv(latest(project, "data/08_reporting/default/report-*/compare_results.csv"))
    assert set(table["prunable"]) == {"Linear, *.in_proj_weight"} and set(table["prunable_layers"]) == {4}
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("cts-pipeline").experiment_id])
    child = next(r for r in runs if r.data.params.get("method") == "cts_kl")
    assert child.data.params["prunable"] == "Linear, *.in_proj_weight"
    assert child.data.metrics["prunable_layers"] == 4 and child.data.metrics["prunable_weights"] == 16 * 8 + 48 * 16 + 16 * 16 + 10 * 16


def digits_table(path: Path, rows: slice) -> None:
    """Scikit-learn's digits as a CSV of 64 feature columns and a text label column."""
    from sklearn.datasets import load_digits

    digits = load_digits(as_frame=True).frame.iloc[rows]
    digits = digits.rename(columns={"target": "digit"}).assign(digit=lambda f: "d" + f["digit"].astype(str))
    path.parent.mkdir(parents=True, exist_ok=True)
    digits.to_csv(path, index=False)


CSV_CATALOG = """\
digits_train_table:
  type: pandas.CSVDataset
  filepath: data/01_raw/digits_train.csv
digits_test_table:
  type: pandas.CSVDataset
  filepath: data/01_raw/digits_test.csv
"""


def test_an_mlp_on_a_csv_through_the_kedro_catalog(project):
    digits_table(project / "data/01_raw/digits_train.csv", slice(0, 1200))
    digits_table(project / "data/01_raw/digits_test.csv", slice(1200, None))
    (project / "conf/own").mkdir(exist_ok=True)
    (project / "conf/own/catalog.yml").write_text(CSV_CATALOG)
    params = {"data": {"name": "catalog", "train": "digits_train_table", "test": "digits_test_table",
                       "label_column": "digit"},
              "model": {"name": "tests.own_models:tabular_mlp", "options": {"width": 24}},
              "sanity": {"sparsities": [0.9]}}
    found = run_everything(project, params)
    check_exact_counts(found, 64 * 24 + 24 * 10, {"0.weight", "2.weight"})
    dense = next(r for r in found if r["method"] == "dense")
    assert dense["dataset"] == "catalog" and dense["test_accuracy"] > 15  # it learns (chance: 10 %), in 3 epochs


def write_image_folder(root: Path, classes: int = 3, train: int = 24, test: int = 8) -> None:
    """``train/<class>/*.jpg`` and ``val/<class>/*.jpg``, 32×32 (a few 40×40, to be resized): each
    class a colour of its own under noise, so that a network can learn them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", test)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                side = 40 if i % 8 == 7 else 32
                base = np.zeros((side, side, 3)) + 60
                base[..., c % 3] += 120
                pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)


@pytest.mark.parametrize(("name", "options", "prunable"), [
    # A selection by module names: SynFlow ranks its 100 rounds over 0.16 M weights instead of all
    # 11 M (the default selection would make this the suite's slowest test by far).
    ("resnet18", {}, ["conv1", "layer1", "fc"]),
    # The default selection, with a depthwise network and hard-swish; width_mult reaches
    # torchvision's factory through model.options.
    ("mobilenet_v3_small", {"width_mult": 0.5}, None),
])
def test_torchvision_networks_on_a_folder_of_jpegs(project, name, options, prunable):
    from cts_pipeline.core.nets.masks import count_prunable, prunable_parameters
    from cts_pipeline.core.nets.registry import build_model
    from cts_pipeline.core.nets.selection import select_prunable

    write_image_folder(project / "data/01_raw/shapes")
    # Tracking off: drawing every branch's per-layer figure for MLflow, on both runs, was a third
    # of this test's time; the transformer's test checks what MLflow records of a selection.
    (project / "conf/own").mkdir(exist_ok=True)
    (project / "conf/own/mlflow.yml").write_text("enabled: false\n")
    params = {"data": {"name": "image_folder", "root": "data/01_raw/shapes"},
              "model": {"name": f"torchvision:{name}", "options": options, "prunable": prunable},
              "grid": {"sparsities": [0.9]}, "sanity": {"sparsities": [0.9], "methods": ["cts"]},
              "training": {"epochs": 2}}
    found = run_everything(project, params)
    net = select_prunable(build_model(f"torchvision:{name}", image_shape=(3, 32, 32), num_classes=3, **options), prunable)
    layers = set(prunable_parameters(net))
    if prunable:
        assert layers == {"conv1.weight", "fc.weight"} | {f"layer1.{b}.conv{c}.weight" for b in (0, 1) for c in (1, 2)}
    check_exact_counts(found, count_prunable(net), layers)
    assert {r["dataset"] for r in found} == {"image_folder"}


def test_a_run_starts_from_a_state_dict_and_another_file_is_another_run(project):
    """``model.weights``: every seed's dense run starts from the file's tensors; a file whose
    contents change is a new configuration (its digest is in the catalog key), never a stale hit."""
    import torch
    from safetensors.torch import save_file

    from cts_pipeline.config.sections import ModelConfig

    from .conftest import latest

    config = ModelConfig(name="convnet", options={"width": 8})
    start = config.build((1, 8, 8), 10, generator=torch.Generator().manual_seed(1234)).state_dict()
    save_file(start, project / "start.safetensors")
    params = {"model": {"weights": "start.safetensors"}, "grid": {"sparsities": [0.9], "seeds": [0, 1]}}
    run_pipeline(project, params=params)
    for seed in (0, 1):
        theta = torch.load(latest(project, f"data/06_models/smoke/dense-*/seed{seed}/theta_init.pt"), weights_only=True)
        assert all(torch.equal(theta[k], v) for k, v in start.items())
    first = {p.parent.parent.parent.parent for p in project.glob("data/06_models/smoke/dense-*/seed0/theta_init.pt/*/*")}

    save_file({k: v + 1 if v.is_floating_point() else v for k, v in start.items()}, project / "start.safetensors")
    run_pipeline(project, params=params, only_missing_outputs=True)
    keys = {p.parent.parent.parent.parent for p in project.glob("data/06_models/smoke/dense-*/seed0/theta_init.pt/*/*")}
    assert len(keys) == 2 and first < keys, "the new file's run has a key of its own"


def test_the_example_preset_is_ready_for_a_folder_laid_out_as_the_readme_shows(project):
    """``conf/example_own_model``: the README's layout under ``data/01_raw/my_images`` passes every
    check a run makes before training (the model on the folder's images resized to 64×64, every
    sparsity against its prunable count), and the README names the preset and the layout."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from cts_pipeline.config.validate import validate_run

    from .conftest import PROJECT_ROOT

    readme = (PROJECT_ROOT / "README.md").read_text()
    assert "kedro run --env=example_own_model" in readme and "data/01_raw/my_images/" in readme
    write_image_folder(project / "data/01_raw/my_images", classes=2, train=2, test=1)
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env="example_own_model") as session:
        context = session.load_context()
        params = context.params
        sections = validate_run(params, ["__default__"], load=context.catalog.load)
    assert sections["model"].name == "torchvision:resnet18" and sections["data"].image_size == 64


def test_a_folder_too_large_for_memory_is_streamed_through_the_pipeline(project, monkeypatch):
    """Above ``user_folders.IN_MEMORY_BYTES`` (here: any folder) the prepared data record where
    the images are, not their pixels, and every stage reads them batch by batch."""
    import torch

    from cts_pipeline.core.data import user_folders

    monkeypatch.setattr(user_folders, "IN_MEMORY_BYTES", 0)
    write_image_folder(project / "data/01_raw/shapes", classes=3, train=16, test=4)
    params = {"data": {"name": "image_folder", "root": "data/01_raw/shapes"},
              "model": {"name": "tests.own_models:tiny_mlp", "options": {"hidden": 16}},
              "grid": {"sparsities": [0.9]}, "runtime": {"data_workers": 0}}
    env = own_env(project)
    run_pipeline(project, env=env, params=params)
    prepared = torch.load(next(project.glob("data/05_model_input/*/data-*/train.pt")), weights_only=True)
    assert "images" not in prepared and prepared["streamed"]["split"] == "train"
    assert prepared["info"]["source"] == "image-folder" and tuple(prepared["info"]["image_shape"]) == (3, 32, 32)
    before = artifacts(project)
    run_pipeline(project, env=env, params=params, only_missing_outputs=True)
    assert artifacts(project) == before
    found = records(project)
    cts = next(r for r in found if r["method"] == "cts_kl")
    assert cts["kept_weights"] == kept_count(0.1, 3 * 32 * 32 * 16 + 16 * 3)


def test_a_catalog_entry_whose_file_changed_is_prepared_again(project, logged):
    """The entries' contents are the raw data's identity: a CSV edited after a run makes
    ``--only-missing-outputs`` prepare the data again, and everything computed from them."""
    import pandas as pd

    digits_table(project / "data/01_raw/digits_train.csv", slice(0, 300))
    digits_table(project / "data/01_raw/digits_test.csv", slice(300, 400))
    (project / "conf/own").mkdir(exist_ok=True)
    (project / "conf/own/catalog.yml").write_text(CSV_CATALOG)
    params = {"data": {"name": "catalog", "train": "digits_train_table", "test": "digits_test_table",
                       "label_column": "digit"},
              "model": {"name": "tests.own_models:tabular_mlp", "options": {"width": 8}},
              "grid": {"sparsities": [0.9]}}
    env = own_env(project)
    run_pipeline(project, env=env, params=params)
    run_pipeline(project, env=env, params=params, only_missing_outputs=True)
    assert not [r for r in logged if "changed since the data were prepared" in r.getMessage()]
    edited = pd.read_csv(project / "data/01_raw/digits_train.csv")
    edited.iloc[0, 0] += 1.0
    edited.to_csv(project / "data/01_raw/digits_train.csv", index=False)
    prepared = next(project.glob("data/05_model_input/*/data-*/train.pt"))
    first = torch.load(prepared, weights_only=True)["images"][0, 0].item()
    run_pipeline(project, env=env, params=params, only_missing_outputs=True)
    said = [r.getMessage() for r in logged if "changed since the data were prepared" in r.getMessage()]
    assert said and "entries 'digits_train_table' and 'digits_test_table'" in said[0]
    assert torch.load(prepared, weights_only=True)["images"][0, 0].item() == first + 1


def test_the_readmes_table_example_passes_every_check_a_run_makes(project, monkeypatch):
    """The README's ``conf/my_table`` files, as written there, with a ``my_lab.nets:mlp`` of the
    signature it gives and CSVs of the columns it names: every run-start check passes."""
    import re

    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from cts_pipeline.config.validate import validate_run

    from .conftest import PROJECT_ROOT

    readme = (PROJECT_ROOT / "README.md").read_text()
    for name in ("catalog.yml", "parameters.yml"):
        block = re.search(rf"^```yaml\n# conf/my_table/{name}.*?\n(.*?)^```", readme, flags=re.S | re.M)
        assert block, f"the README shows conf/my_table/{name}"
        (project / "conf/my_table").mkdir(exist_ok=True)
        (project / "conf/my_table" / name).write_text(block[1])
    (project / "my_lab").mkdir()
    (project / "my_lab/__init__.py").write_text("")
    (project / "my_lab/nets.py").write_text(
        "from torch import nn\n\n\ndef mlp(num_classes, image_shape, width=64):\n"
        "    return nn.Sequential(nn.Linear(image_shape[0], width), nn.ReLU(), nn.Linear(width, num_classes))\n")
    monkeypatch.syspath_prepend(str(project))
    for split in ("train", "test"):
        rows = "".join(f"{i / 10},{i % 7},{'yes' if i % 3 else 'no'}\n" for i in range(30))
        (project / f"data/01_raw/patients_{split}.csv").parent.mkdir(parents=True, exist_ok=True)
        (project / f"data/01_raw/patients_{split}.csv").write_text("age,dose,outcome\n" + rows)
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env="my_table") as session:
        context = session.load_context()
        sections = validate_run(context.params, ["__default__"], load=context.catalog.load)
    assert sections["data"].label_column == "outcome" and sections["model"].options == {"width": 256}

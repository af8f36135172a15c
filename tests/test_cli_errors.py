"""The catalogue of bad inputs: each gives a non-zero exit, a first line naming the culprit, and no
traceback unless ``--verbose`` asks for one. Run through the project's ``kedro run`` in-process."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from kedro.framework.startup import bootstrap_project

from cts_pipeline.cli import run

CASES = [
    # (--params or other options, what the first line must name)
    (["--params", "grid.sparsities=[0]"], "grid.sparsities: 0 is outside (0, 1)"),
    (["--params", "grid.sparsities=[1]"], "grid.sparsities: 1 is outside (0, 1)"),
    (["--params", "grid.sparsities=[1.5]"], "grid.sparsities: 1.5 is outside (0, 1)"),
    (["--params", "grid.sparsities=[-0.1]"], "grid.sparsities: -0.1 is outside (0, 1)"),
    (["--params", "grid.sparsities=[99.26]"], "0.9926"),
    (["--params", "grid.sparsities=[high]"], "grid.sparsities"),
    (["--params", "data.name=svhn"], "data.name"),
    (["--params", "data.name=imagenet"], "dataset 'imagenet' not found under data.root"),
    (["--params", "model.name=alexnet"], "model.name"),
    (["--params", "cts.objective=hinge"], "cts.objective"),
    (["--params", "cts.search_length=medium"], "cts.search_length"),
    (["--params", "model.name=vgg16"], "vgg16"),
    (["--params", "training.rewind_epoch=7"], "training.rewind_epoch"),
    (["--params", "grid.seeds=[]"], "grid.seeds"),
    (["--params", "training.lr=fast"], "training.lr"),
    (["--params", "training.learning_rate=0.1"], "learning_rate"),
    (["--params", "trainig.lr=0.001"], "trainig"),
    (["--params", "runtime.device=cuda:3"], "runtime.device"),
    (["--params", "runtime.batch_sparsities=sometimes"], "runtime.batch_sparsities must be auto, true or false"),
    (["--params", "runtime.batch_sparsities=1"], "runtime.batch_sparsities must be auto, true or false, got 1"),
    (["--params", "training.eval_batch_size=12.5"], "training.eval_batch_size must be a positive integer, got 12.5"),
    (["--pipelines=sanity", "--params", "sanity.sparsities=[0.42]"], "sanity.sparsities"),
    # Your own model (model.name: "<module>:<callable>" or "torchvision:<name>"), refused before any
    # training; --env=local: the base options ({}), not the smoke preset's width for its convnet
    (["--env=local", "--params", "model.name=no_such_package.nets:build"], "module 'no_such_package.nets' does not import"),
    (["--env=local", "--params", "model.name=tests.own_models:missing"], "module 'tests.own_models' has no 'missing'"),
    (["--env=local", "--params", "model.name=tests.own_models:not_a_module"], "the factory returned dict, not an nn.Module"),
    (["--env=local", "--params", "model.name=tests.own_models:broken"],
     "the factory raised RuntimeError: this factory needs a file"),
    (["--env=local", "--params", "model.name=tests.own_models:three_outputs"], "output has shape (2, 3), expected (2, 10)"),
    (["--env=local", "--params", "model.name=torchvision:resnet9000"], "torchvision has no classification model 'resnet9000'"),
    (["--env=local", "--params", "model.name=torchvision:resnet18"], "cannot take inputs of shape (1, 8, 8)"),
    # the preset's options reach the factory as keyword arguments: a factory without them says so
    (["--params", "model.name=tests.own_models:tiny_mlp"], "unexpected keyword argument 'width'"),
    (["--pipelines=ltr", "--params", "methods.ltr=false"], "methods.ltr is false"),
]


@pytest.fixture
def invoke(project, monkeypatch):
    monkeypatch.delenv("CTS_VERBOSE", raising=False)
    bootstrap_project(project)

    def call(*args: str):
        pipeline = [] if any(a.startswith("--pipelines") for a in args) else ["--pipelines=cts"]
        return CliRunner().invoke(run, ["--env=smoke", *pipeline, *args])
    return call


@pytest.mark.parametrize(("args", "named"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_gives_one_message_naming_the_culprit(invoke, project, args, named):
    result = invoke(*args)
    output = result.output
    assert result.exit_code == 2, output
    first = next(line for line in output.splitlines() if line.startswith("Error:"))
    assert named in output.split("(the traceback")[0], output
    assert first.startswith("Error: ")
    assert "Traceback" not in output
    assert not (project / "data" / "06_models").exists(), "nothing may be computed"


def test_verbose_shows_the_traceback(invoke):
    result = invoke("--params", "grid.sparsities=[1.5]", "--verbose")
    assert result.exit_code != 0
    assert "outside (0, 1)" in str(result.exception)


def test_mnist_files_of_random_bytes_are_named(invoke, project, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(bytes(range(256)) * 40)
    result = invoke("--params", f"data.name=mnist,data.root={tmp_path}")
    assert result.exit_code == 2, result.output
    first = next(line for line in result.output.splitlines() if line.startswith("Error:"))
    assert "train-images-idx3-ubyte is not a valid MNIST-format idx file" in first
    assert "Traceback" not in result.output


def test_a_mask_from_another_model_stops_the_rerun_naming_its_file(invoke, project):
    import shutil

    import torch

    from cts_pipeline.datasets import TorchDataset

    from .conftest import latest

    assert invoke().exit_code == 0
    mask = latest(project, "data/07_model_output/smoke/cts_kl-*/seed0/sp90_00/mask.pt")
    payload = torch.load(mask, weights_only=True)
    for part in ("masks", "kept", "total"):
        payload[part] = {f"other.{name}": value for name, value in payload[part].items()}
    TorchDataset(filepath=str(mask)).save(payload)  # well-formed, with its record, for other layers
    for metrics in project.glob("data/08_reporting/smoke/cts_kl-*/seed0/sp90_00/metrics.json"):
        shutil.rmtree(metrics)
    result = invoke("--only-missing-outputs")
    assert result.exit_code == 1, result.output  # a node failed, after the run started
    first = next(line for line in result.output.splitlines() if line.startswith("Error:"))
    assert "cts_kl.seed0.sp90_00.mask: mask does not match the model" in first
    assert f"file: {mask}" in first
    assert "Traceback" not in result.output


@pytest.mark.parametrize("runner", [None, "ParallelRunner"], ids=["sequential", "parallel"])
def test_a_failing_node_exits_1_with_its_error_type_under_every_runner(invoke, runner):
    """The exit code is read off the error (errors.exit_code), so a node that fails in a worker
    process is reported as the sequential run reports it."""
    result = invoke("--params", "training.lr=1e12", *([f"--runner={runner}"] if runner else []))
    assert result.exit_code == 1, result.output
    first = next(line for line in result.output.splitlines() if line.startswith("Error:"))
    assert first.startswith("Error: NonFiniteLossError: dense.seed0 dense: the loss became"), first


def test_a_poisoned_cifar_batch_runs_nothing_and_exits_2(invoke, project, tmp_path):
    """A problem with the data, found before any compute: exit 2 naming the file, and the
    pickle's payload never runs."""
    import numpy as np

    from .core.test_data import _WritesAFile, write_cifar10, write_pickle

    write_cifar10(tmp_path, np.random.default_rng(0))
    marker = tmp_path / "the-pickle-ran"
    write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {"data": _WritesAFile(marker), "labels": [0]})
    result = invoke("--params", f"data.name=cifar10,data.root={tmp_path}")
    assert result.exit_code == 2, result.output
    first = next(line for line in result.output.splitlines() if line.startswith("Error:"))
    assert "test_batch is not a readable CIFAR pickle batch" in first and "Traceback" not in result.output
    assert not marker.exists()


def test_a_cifar_batch_declaring_more_than_a_batch_exits_2_before_allocating(invoke, project, tmp_path):
    import numpy as np

    from .core.test_data import _DeclaredArray, write_cifar10, write_pickle

    write_cifar10(tmp_path, np.random.default_rng(0))
    write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {"data": _DeclaredArray((2**40, 3072)), "labels": [0]})
    result = invoke("--params", f"data.name=cifar10,data.root={tmp_path}")
    assert result.exit_code == 2, result.output
    first = next(line for line in result.output.splitlines() if line.startswith("Error:"))
    assert "test_batch is not a readable CIFAR pickle batch: it declares an array of shape" in first
    assert "Traceback" not in result.output
    assert not (project / "data" / "05_model_input").exists(), "nothing prepared"


def test_a_key_given_twice_in_a_yaml_file_names_the_file_and_the_line(invoke, project):
    preset = project / "conf" / "smoke" / "parameters.yml"
    preset.write_text(preset.read_text() + "training:\n  epochs: 4\n")
    result = invoke()
    assert result.exit_code == 2, result.output
    first = next(line for line in result.output.splitlines() if line.startswith("Error:"))
    assert first.startswith(f"Error: {preset}, line ") and "found duplicate key training" in first, first


def test_an_unknown_runner_is_one_line(invoke, project):
    result = invoke("--runner=Bogus")
    assert result.exit_code == 2, result.output
    assert "Error: --runner=Bogus: no such runner; use SequentialRunner (the default), ThreadRunner" in result.output
    assert "Traceback" not in result.output and not (project / "data").exists()


def test_a_data_folder_that_cannot_be_written_is_named_before_any_compute(invoke, project):
    """A file where the data folder should be (root ignores permissions, a file it cannot ignore)."""
    (project / "data").write_text("not a folder")
    result = invoke()
    assert result.exit_code == 2, result.output
    first = next(line for line in result.output.splitlines() if line.startswith("Error:"))
    assert f"the data folder {project / 'data'} (globals.yml data_root) cannot be written" in first, first


def test_to_outputs_without_a_pipeline_runs_the_pipeline_that_holds_them(project, monkeypatch):
    """kedro-viz suggests `kedro run --to-outputs=cts_results_table`, without --pipelines; the
    default pipeline (compare and sanity) has no cts report, so the project picks the smallest
    pipeline that holds it, and says so. Outputs of the default pipeline change nothing."""
    import cts_pipeline.cli as cli

    bootstrap_project(project)
    assert cli.pipeline_holding(["cts_results_table"], "smoke", None, {}) == "cts"
    assert cli.pipeline_holding(["pai_results_table"], "smoke", None, {}) == "pai"
    assert cli.pipeline_holding(["compare_results_table"], "smoke", None, {}) is None
    assert cli.pipeline_holding(["no_such_table"], "smoke", None, {}) is None
    seen = {}
    monkeypatch.setattr(cli.kedro_run, "callback", lambda **kwargs: seen.update(kwargs))
    result = CliRunner().invoke(run, ["--env=smoke", "--to-outputs=cts_results_table"])
    assert result.exit_code == 0, result.output
    assert seen["pipelines"] == ["cts"]
    assert "--to-outputs=cts_results_table is in the cts pipeline, not the default one: running --pipelines=cts" \
        in result.output
    CliRunner().invoke(run, ["--env=smoke", "--pipelines=compare", "--to-outputs=cts_results_table"])
    assert seen["pipelines"] == ["compare"]  # a pipeline given is never second-guessed


# --------------------------------------------------------------------------------------------
# Your model and your data (issue 36): each refused before any training, in one line, exit 2


def _image(path, side: int = 8, value: int = 0) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, side), (value, 255 - value, 128)).save(path)


def _folder_with_one_class(project):
    for split in ("train", "val"):
        for i in range(3):
            _image(project / f"data/01_raw/pics/{split}/cats/{i}.png", value=40 * i)
    return ["--params", "data.name=image_folder,data.root=data/01_raw/pics"]


def _folder_without_images(project):
    for split in ("train", "val"):
        for label in ("cats", "dogs"):
            (project / f"data/01_raw/pics/{split}/{label}").mkdir(parents=True)
    return ["--params", "data.name=image_folder,data.root=data/01_raw/pics"]


def _csv(project, header: str, rows: list[str]) -> list[str]:
    path = project / "data/01_raw/table.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    (project / "conf/smoke/catalog.yml").write_text(
        "table:\n  type: pandas.CSVDataset\n  filepath: data/01_raw/table.csv\n")
    return ["--params", "data.name=catalog,data.train=table,data.test=table"]


def _csv_without_the_label_column(project):
    return _csv(project, "f0,f1,target", ["0.1,0.2,0", "0.3,0.1,1", "0.5,0.9,1"])


def _csv_with_a_text_feature(project):
    return _csv(project, "f0,colour,label", ["0.1,red,0", "0.3,blue,1", "0.5,red,1"])


def _a_catalog_entry_that_is_not_declared(project):
    _csv(project, "f0,f1,label", ["0.1,0.2,0", "0.3,0.1,1", "0.5,0.9,1"])
    return ["--params", "data.name=catalog,data.train=table,data.test=tabel"]


def _a_selection_of_nothing(project):
    return ["--params", "model.prunable=[Embedding]"]


def _weights_of_another_model(project):
    import torch
    from safetensors.torch import save_file

    save_file({"0.weight": torch.zeros(3, 3)}, project / "other.safetensors")
    return ["--params", "model.weights=other.safetensors"]


OWN_CASES = [
    (_folder_with_one_class, "an image folder needs at least two class folders, found ['cats']"),
    (_folder_without_images, "the class folder holds no image"),
    (_csv_without_the_label_column, "catalog entry 'table': no label column 'label' (data.label_column)"),
    (_csv_with_a_text_feature, "feature columns ['colour'] are not numeric"),
    (_a_catalog_entry_that_is_not_declared, "data.test: catalog entry 'tabel' cannot be loaded"),
    (_a_selection_of_nothing, "model.prunable entry 'Embedding' matches no module type"),
    (_weights_of_another_model, "model.weights 'other.safetensors' does not fit the model"),
]


@pytest.mark.parametrize(("setup", "named"), OWN_CASES, ids=[s.__name__.strip("_") for s, _ in OWN_CASES])
def test_own_model_or_data_that_cannot_work_is_one_line_before_any_training(invoke, project, setup, named):
    result = invoke(*setup(project))
    assert result.exit_code == 2, result.output
    assert named in result.output.split("(the traceback")[0], result.output
    assert "Traceback" not in result.output
    assert not (project / "data" / "06_models").exists(), "nothing may be computed"
    assert not (project / "data" / "05_model_input").exists(), "nothing prepared"

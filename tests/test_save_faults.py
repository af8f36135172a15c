"""A full disk: one clear message, nothing under a final name, and no finished work lost."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import fsspec
import pytest

from cts_pipeline.core.artifacts.checkpoints import Checkpoint
from cts_pipeline.datasets import TorchDataset
from cts_pipeline.datasets._atomic import atomic_write

from .conftest import latest, run_pipeline


def no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    fs = fsspec.filesystem("file")
    target = tmp_path / "plot.png"
    monkeypatch.setattr(fs, "mv", no_space)
    with pytest.raises(OSError, match=r"no space left on the device holding .*plot.png \(5 bytes to write\)"):
        atomic_write(fs, str(target), b"12345")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fails", ["the file", "the record"])
def test_a_disk_filling_up_during_the_record_leaves_no_file_without_it(tmp_path, monkeypatch, fails):
    fs = fsspec.filesystem("file")
    target = tmp_path / "metrics.json"
    real_open = fs.open

    def filling_up(path, mode="rb", **kwargs):
        if "w" in mode and (".record.json" in path) == (fails == "the record"):
            no_space()
        return real_open(path, mode, **kwargs)

    monkeypatch.setattr(fs, "open", filling_up)
    with pytest.raises(OSError, match=rf"^\[Errno 28\] no space left on the device holding {target} \(2 bytes"):
        atomic_write(fs, str(target), b"{}")
    assert list(tmp_path.iterdir()) == [], "neither the file nor its record, nor a partial one"


def test_a_full_disk_is_one_line_naming_the_file(project, monkeypatch):
    """Kedro wraps a failed save in its DatasetError, whose message starts with the dataset's long
    repr: the user reads the disk's own line, and exit 1 (the run had started)."""
    from click.testing import CliRunner
    from kedro.framework.startup import bootstrap_project

    from cts_pipeline import cli
    from cts_pipeline.datasets import json_dataset

    def full_disk_for_dense_metrics(fs, path, payload):
        atomic_write(_FullDisk() if "dense-" in path else fs, path, payload)

    monkeypatch.setattr(json_dataset, "atomic_write", full_disk_for_dense_metrics)
    bootstrap_project(project)
    result = CliRunner().invoke(cli.run, ["--pipelines=cts", "--env=smoke"])
    assert result.exit_code == 1, result.output
    first = next(line for line in result.output.splitlines() if line.startswith("Error:"))
    assert first.startswith("Error: OSError: [Errno 28] no space left on the device holding ") and \
        "dense-" in first and "nothing was written" in first, first


class _FullDisk:
    """A filesystem whose writes fail for want of space, as a full disk's do."""

    def open(self, *_args, **_kwargs):
        no_space()

    def exists(self, _path):
        return False


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    checkpoint = Checkpoint(tmp_path / "dense.pt", key="k")
    checkpoint.save({"epochs_done": 1})
    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_bytes", no_space)
        with pytest.raises(OSError, match=r"no space left on the device holding the checkpoint .*dense.pt"):
            checkpoint.save({"epochs_done": 2})
    assert checkpoint.load()["epochs_done"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["dense.pt"]


def test_a_failed_save_keeps_the_checkpoint_and_the_rerun_resumes(project, monkeypatch, finished_smoke_data):
    """Checkpoints go only once the node's outputs are saved; the rerun after space is freed ends
    where an uninterrupted run does (the same process: the same arithmetic, so the same bits)."""
    save = TorchDataset.save

    def full_disk_for_dense_weights(self, data):
        if "dense-" in str(self._filepath) and "final_weights" in str(self._filepath):
            no_space()
        save(self, data)

    with monkeypatch.context() as patch:
        patch.setattr(TorchDataset, "save", full_disk_for_dense_weights)
        with pytest.raises(OSError, match="No space left on device"):
            run_pipeline(project)
    assert list(project.glob("data/06_models/checkpoints/dense.seed0/dense-*.pt")), "the checkpoint must stay"

    run_pipeline(project, only_missing_outputs=True)
    metrics = json.loads(latest(project, "data/08_reporting/smoke/dense-*/seed0/metrics.json").read_text())
    assert metrics["resumed_after_epoch"] == 2, "the rerun resumes after the last checkpointed epoch (of 3)"
    import torch

    for artifact in ("06_models/smoke/dense-*/seed0/final_weights.pt", "07_model_output/smoke/cts_kl-*/seed0/sp90_00/mask.pt"):
        rerun = torch.load(latest(project, f"data/{artifact}"), weights_only=True)
        uninterrupted = torch.load(latest(finished_smoke_data.parent, f"data/{artifact}"), weights_only=True)
        tensors = rerun.get("masks", rerun)
        assert all(torch.equal(t, uninterrupted.get("masks", uninterrupted)[k]) for k, t in tensors.items()), artifact
    assert not list(project.glob("data/06_models/checkpoints/**/*.pt")), "saved outputs: checkpoints removed"

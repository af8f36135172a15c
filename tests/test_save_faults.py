"""A full disk: one clear message, nothing under a final name, and no finished work lost."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import fsspec
import pytest

from cts_pipeline.core.checkpoints import Checkpoint
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


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    checkpoint = Checkpoint(tmp_path / "dense.pt", key="k")
    checkpoint.save({"epochs_done": 1})
    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_bytes", no_space)
        with pytest.raises(OSError, match=r"no space left on the device holding the checkpoint .*dense.pt"):
            checkpoint.save({"epochs_done": 2})
    assert checkpoint.load()["epochs_done"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["dense.pt"]


def test_a_failed_save_keeps_the_checkpoint_and_the_rerun_resumes(project, monkeypatch):
    """Checkpoints go only once the node's outputs are saved."""
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
    assert not list(project.glob("data/06_models/checkpoints/**/*.pt")), "saved outputs: checkpoints removed"

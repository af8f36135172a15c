"""A run killed mid-training (SIGKILL, no clean-up) resumes from its last checkpoint and ends
exactly where an uninterrupted run with the same seed ends (CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent('''
    import os, signal, sys, torch
    from cts_pipeline.core import cts
    from cts_pipeline.core.checkpoints import Checkpoint
    from cts_pipeline.core.data import load_splits
    from cts_pipeline.core.models import build_model
    from cts_pipeline.core.training import TrainRecipe, train

    what, checkpoint_path, out, kill_after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(1)
    train_split, test_split = load_splits("digits")
    train_split, test_split = train_split.subset(256), test_split.subset(64)
    recipe = TrainRecipe(epochs=4, batch_size=32, lr=0.05, milestones=[3], rewind_epoch=1)
    net = build_model("convnet", image_shape=(1, 8, 8), num_classes=10, generator=torch.Generator().manual_seed(0),
                      width=4)
    checkpoint = Checkpoint(checkpoint_path, key="test") if checkpoint_path != "-" else None

    def die():
        os.kill(os.getpid(), signal.SIGKILL)  # no exception handler, no atexit: like a power cut

    if what == "train":
        def maybe_die(done, model):
            if done == kill_after:
                die()
        result = train(net, train_split, test_split, recipe, seed=3, stage="t", checkpoint=checkpoint,
                       snapshot_epochs={1}, on_epoch_end=maybe_die, progress=False)
        torch.save({"weights": net.state_dict(), "rewind": result.snapshots[1], "resumed_at": result.resumed_at,
                    "history": [r["train_loss"] for r in result.history]}, out)
    else:
        real_batches, calls = cts.iterate_batches, []
        def batches(*args, **kwargs):
            calls.append(1)
            if len(calls) == kill_after + 1:  # the epoch after `kill_after` has started: its checkpoint exists
                die()
            return real_batches(*args, **kwargs)
        cts.iterate_batches = batches
        density = 0.1 if what == "search" else [0.1, 0.03]  # one search, or a batched one
        found = cts.concrete_search(net, train_split, density=density, config=cts.SearchConfig(epochs=4),
                                    recipe=recipe, seed=3, checkpoint=checkpoint, progress=False)
        results = found if isinstance(found, list) else [found]
        torch.save({"scores": {f"{i}.{n}": s for i, r in enumerate(results) for n, s in r.scores.items()},
                    "resumed_at": results[0].resumed_at,
                    "history": [r["loss"] for res in results for r in res.history]}, out)
''')


def run(tmp_path, what: str, checkpoint: str, out: str, kill_after: int) -> int:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), what, checkpoint, str(tmp_path / out), str(kill_after)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode not in (0, -9):
        raise AssertionError(done.stderr[-3000:])
    return done.returncode


@pytest.mark.parametrize("what", ["train", "search", "batched_search"])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, what):
    checkpoint = str(tmp_path / "ckpt.pt")
    assert run(tmp_path, what, checkpoint, "killed.pt", kill_after=2) == -9, "the first run must die"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epochs_done"] == 2 and saved["key"] == "test"
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name], "no half-written checkpoint"

    assert run(tmp_path, what, checkpoint, "resumed.pt", kill_after=99) == 0
    assert run(tmp_path, what, "-", "straight.pt", kill_after=99) == 0
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    straight = torch.load(tmp_path / "straight.pt", weights_only=True)
    assert resumed["resumed_at"] == 2 and straight["resumed_at"] is None
    assert resumed["history"] == straight["history"], "the same losses, epoch by epoch"
    key = "weights" if what == "train" else "scores"
    for name, value in straight[key].items():
        assert torch.equal(resumed[key][name], value), f"{name} differs after resuming"
    if what == "train":
        for name, value in straight["rewind"].items():
            assert torch.equal(resumed["rewind"][name], value), "θ_k must survive the kill"
    assert not os.path.exists(checkpoint), "a finished run removes its checkpoint"


def test_checkpoint_of_another_configuration_is_not_resumed(tmp_path, caplog):
    from cts_pipeline.core.checkpoints import Checkpoint

    path = tmp_path / "c.pt"
    Checkpoint(path, "a").save({"epochs_done": 3})
    assert Checkpoint(path, "b").load() is None
    assert "another configuration" in caplog.text
    path.write_bytes(b"truncated")
    assert Checkpoint(path, "a").load() is None

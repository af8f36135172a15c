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
    from dataclasses import replace
    from cts_pipeline.core import cts
    from cts_pipeline.core.artifacts.checkpoints import Checkpoint
    from cts_pipeline.core.data.splits import load_splits
    from cts_pipeline.core.nets.registry import build_model
    from cts_pipeline.core.train.loop import train
    from cts_pipeline.core.train.recipe import TrainRecipe

    torch.set_num_threads(1)
    train_split, test_split = load_splits("digits")
    train_split, test_split = train_split.subset(256), test_split.subset(64)
    recipe = TrainRecipe(epochs=4, batch_size=32, lr=0.05, milestones=[3], rewind_epoch=1)
    real_batches = cts.search.iterate_batches


    def die():
        os.kill(os.getpid(), signal.SIGKILL)  # no exception handler, no atexit: like a power cut


    def job(what, checkpoint_path, out, kill_after):
        net = build_model("convnet", image_shape=(1, 8, 8), num_classes=10,
                          generator=torch.Generator().manual_seed(0), width=4)
        checkpoint = Checkpoint(checkpoint_path, key="test") if checkpoint_path != "-" else None
        if what.startswith("train"):
            def maybe_die(done, model):
                if done == kill_after:
                    die()
            # train_ranks: the authors' 4 GPUs in one pass (ghost BatchNorm's buffers are views then)
            ranks = 4 if what == "train_ranks" else 1
            result = train(net, train_split, test_split, replace(recipe, virtual_ranks=ranks), seed=3, stage="t",
                           checkpoint=checkpoint, snapshot_epochs={1}, on_epoch_end=maybe_die, progress=False,
                           rank_passes="one")
            torch.save({"weights": net.state_dict(), "rewind": result.snapshots[1], "resumed_at": result.resumed_at,
                        "history": [r["train_loss"] for r in result.history]}, out)
            return
        calls = []
        def batches(*args, **kwargs):
            calls.append(1)
            if len(calls) == kill_after + 1:  # the epoch after `kill_after` has started: its checkpoint exists
                die()
            return real_batches(*args, **kwargs)
        cts.search.iterate_batches = batches
        density = 0.1 if what == "search" else [0.1, 0.03]  # one search, or a batched one
        found = cts.concrete_search(net, train_split, density=density, config=cts.SearchConfig(epochs=4),
                                    recipe=recipe, seed=3, checkpoint=checkpoint, progress=False)
        cts.search.iterate_batches = real_batches
        results = found if isinstance(found, list) else [found]
        torch.save({"scores": {f"{i}.{n}": s for i, r in enumerate(results) for n, s in r.scores.items()},
                    "resumed_at": results[0].resumed_at,
                    "history": [r["loss"] for res in results for r in res.history]}, out)


    # One job per argument, "what|checkpoint|out|kill_after", run one after another in this process.
    for spec in sys.argv[1:]:
        what, checkpoint_path, out, kill_after = spec.split("|")
        job(what, checkpoint_path, out, int(kill_after))
''')

WHATS = ("train", "train_ranks", "search", "batched_search")


def run(folder, *jobs: tuple[str, str, str, int]) -> int:
    """The jobs (what, checkpoint or "-", output file, epochs before the kill) in one fresh process."""
    script = folder / "job.py"
    script.write_text(SCRIPT)
    specs = [f"{what}|{checkpoint}|{folder / out}|{kill_after}" for what, checkpoint, out, kill_after in jobs]
    done = subprocess.run([sys.executable, str(script), *specs], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode not in (0, -9):
        raise AssertionError(done.stderr[-3000:])
    return done.returncode


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """Each loop killed (SIGKILL) after 2 of its 4 epochs, then resumed, next to the same loop run
    straight through: a process per kill, one for the three resumptions and one for the three
    uninterrupted runs (each job builds its own model and seeds, so sharing a process changes
    nothing they compute)."""
    folder = tmp_path_factory.mktemp("resume")
    killed = {}
    for what in WHATS:
        killed[what] = run(folder, (what, str(folder / f"{what}.ckpt.pt"), f"{what}.killed.pt", 2))
    saved = {what: torch.load(folder / f"{what}.ckpt.pt", weights_only=True) for what in WHATS}
    partial = [p.name for p in folder.iterdir() if ".partial-" in p.name]
    resumed = run(folder, *[(what, str(folder / f"{what}.ckpt.pt"), f"{what}.resumed.pt", 99) for what in WHATS])
    straight = run(folder, *[(what, "-", f"{what}.straight.pt", 99) for what in WHATS])
    return folder, killed, saved, partial, (resumed, straight)


@pytest.mark.parametrize("what", WHATS)
def test_killed_run_resumes_to_the_uninterrupted_result(killed_and_resumed, what):
    folder, killed, saved, partial, finished = killed_and_resumed
    assert killed[what] == -9, "the first run must die"
    assert saved[what]["epochs_done"] == 2 and saved[what]["key"] == "test"
    assert not partial, "no half-written checkpoint"
    assert finished == (0, 0)
    resumed = torch.load(folder / f"{what}.resumed.pt", weights_only=True)
    straight = torch.load(folder / f"{what}.straight.pt", weights_only=True)
    assert resumed["resumed_at"] == 2 and straight["resumed_at"] is None
    assert resumed["history"] == straight["history"], "the same losses, epoch by epoch"
    key = "weights" if what.startswith("train") else "scores"
    for name, value in straight[key].items():
        assert torch.equal(resumed[key][name], value), f"{name} differs after resuming"
    if what.startswith("train"):
        for name, value in straight["rewind"].items():
            assert torch.equal(resumed["rewind"][name], value), "θ_k must survive the kill"
    assert not (folder / f"{what}.ckpt.pt").exists(), "a finished run removes its checkpoint"


def test_checkpoint_of_another_configuration_is_not_resumed(tmp_path, caplog):
    from cts_pipeline.core.artifacts.checkpoints import Checkpoint

    path = tmp_path / "c.pt"
    Checkpoint(path, "a").save({"epochs_done": 3})
    assert Checkpoint(path, "b").load() is None
    assert "another configuration" in caplog.text
    path.write_bytes(b"truncated")
    assert Checkpoint(path, "a").load() is None


def test_finished_checkpoints_wait_for_their_results_to_be_stored(tmp_path):
    """PendingRemovals: a loop that finishes while a set is started hands its checkpoint over; the
    set removes them once the results are stored, keeps them if storing failed, or hands them to
    another process. Without a set (or once it is closed) a finished loop removes its own file,
    and a set started on one thread is not another thread's."""
    import contextvars
    import threading

    from cts_pipeline.core.artifacts.checkpoints import Checkpoint, PendingRemovals

    contextvars.copy_context().run(_pending_removals_in_one_context, tmp_path, threading, Checkpoint,
                                   PendingRemovals)


def _pending_removals_in_one_context(tmp_path, threading, Checkpoint, PendingRemovals):  # noqa: N803
    """(In a context of its own, so the sets it starts end with it.)"""

    def finished_loop(name: str) -> Checkpoint:
        checkpoint = Checkpoint(tmp_path / name, "key")
        checkpoint.save({"epochs_done": 1})
        checkpoint.finish()
        return checkpoint

    pending = PendingRemovals.start()
    stored, failed = finished_loop("stored.pt"), finished_loop("failed.pt")
    assert stored.path.exists() and failed.path.exists(), "kept until the results are stored"
    elsewhere = []
    other = threading.Thread(target=lambda: elsewhere.append(finished_loop("other_thread.pt")))
    other.start()
    other.join()
    assert not elsewhere[0].path.exists(), "another thread has no set: its loop removes its own file"
    pending.remove()
    assert not stored.path.exists() and not failed.path.exists()
    assert not finished_loop("after.pt").path.exists(), "a closed set: the loop removes its own file"

    kept = PendingRemovals.start()
    survivor = finished_loop("survivor.pt")
    kept.keep()
    assert survivor.path.exists(), "storing failed: the rerun resumes from it"

    handed = PendingRemovals.start()
    rank_file = finished_loop("rank.pt")
    assert handed.take() == [rank_file.path] and rank_file.path.exists()
    driver = PendingRemovals.start()
    PendingRemovals.defer_or_remove([rank_file.path])
    assert rank_file.path.exists()
    driver.remove()
    assert not rank_file.path.exists()

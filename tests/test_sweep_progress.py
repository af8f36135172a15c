"""The whole-sweep display on a terminal: it follows nodes and epochs, and stays off elsewhere."""

from __future__ import annotations

import io
import logging

from rich.console import Console
from tqdm.auto import tqdm

from cts_pipeline import settings
from cts_pipeline.core.train import epochs
from cts_pipeline.terminal import progress as sweep_progress
from cts_pipeline.terminal.progress import SweepProgress

from .conftest import run_pipeline


def terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=120)


def test_the_display_follows_nodes_and_the_epochs_core_logs(monkeypatch):
    logger = logging.getLogger("cts_pipeline")
    monkeypatch.setattr(logger, "level", logger.level)  # restored after the test
    logger.setLevel(logging.INFO)  # as conf/logging.yml sets it
    display = SweepProgress(terminal(), total_nodes=4)
    display.start()
    try:
        display.node_started("cts_kl.seed0.search")
        logging.getLogger("cts_pipeline.core.cts").info(
            "search epoch 3/8", extra={"stage": "cts_kl.seed0 search x2", "epoch": 3, "epochs": 8})
        logging.getLogger("cts_pipeline.core.cts").info("a line without a stage")
        assert display.progress.tasks[0].completed == 3 / 8, "the sweep moves inside a long node"
        display.node_done()
        sweep, stage = display.progress.tasks
        assert (sweep.completed, sweep.total) == (1, 4)
        assert (stage.completed, stage.total, stage.description.strip()) == (3, 8, "cts_kl.seed0 search x2")
    finally:
        display.stop()
    assert display.handler not in logging.getLogger("cts_pipeline").handlers


def test_off_a_terminal_or_when_asked_nothing_is_drawn(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("CTS_VERBOSE", raising=False)
    monkeypatch.delenv("CTS_PROGRESS", raising=False)
    assert not sweep_progress.wanted(io.StringIO())
    assert sweep_progress.wanted(Tty())
    monkeypatch.setenv("CTS_PROGRESS", "0")
    assert not sweep_progress.wanted(Tty())
    monkeypatch.setenv("CTS_PROGRESS", "1")
    monkeypatch.setenv("CTS_VERBOSE", "1")
    assert not sweep_progress.wanted(Tty())


def test_a_run_on_a_terminal_shows_the_sweep_and_hides_the_loop_bars(project, monkeypatch):
    console = terminal()
    seen = {"started": 0, "done": 0, "epochs": 0, "loop_bars": []}

    class Spy(SweepProgress):
        def node_started(self, name):
            seen["started"] += 1
            super().node_started(name)

        def node_done(self):
            seen["done"] += 1
            super().node_done()

        def epoch(self, *args, **kwargs):
            seen["epochs"] += 1
            super().epoch(*args, **kwargs)

    monkeypatch.setattr(sweep_progress, "rich_console", lambda: console)
    monkeypatch.setattr(sweep_progress, "wanted", lambda stream=None: True)
    monkeypatch.setattr(sweep_progress, "SweepProgress", Spy)

    def loop_bar(*args, disable=None, **kwargs):  # every epoch loop's tqdm bar, as core.train.epochs makes it
        seen["loop_bars"].append(not disable)
        return tqdm(*args, disable=True, **kwargs)

    monkeypatch.setattr(epochs, "tqdm", loop_bar)
    run_pipeline(project, params={"runtime": {"progress": True}})  # the smoke preset's is false
    assert seen["started"] == seen["done"] > 5
    assert seen["epochs"] > 0, "the stage line must follow the epochs"
    assert seen["loop_bars"] and not any(seen["loop_bars"]), "the loops' own bars stay hidden under the display"
    hook = next(h for h in settings.HOOKS if isinstance(h, sweep_progress.SweepProgressHook))
    assert hook.display is None, "the display closes before the table is printed"


def test_a_run_says_first_what_it_will_run():
    """Issue 24: plain `kedro run` started the whole compare-and-sanity sweep without a word."""
    from types import SimpleNamespace

    nodes = [SimpleNamespace(namespace=ns) for ns in (
        "dense.seed0", "cts_kl.seed0", "cts_kl.seed0.sp89_26", "cts_kl.seed0.sp99_53", "snip.seed0.sp89_26",
        "snip.seed0.sp99_53", "cts_kl.seed1.sp89_26", None)]
    line = sweep_progress.describe_sweep(None, SimpleNamespace(nodes=nodes), 42)
    assert line == ("kedro run: __default__ (compare + sanity: every method, then the sanity checks), 42 nodes; "
                    "5 branches: 2 methods, 2 sparsities, 2 seeds")
    assert sweep_progress.describe_sweep(["cts"], SimpleNamespace(nodes=nodes[:1]), 3) == "kedro run: cts, 3 nodes"


def test_progress_false_turns_the_live_display_off_on_a_terminal_too(project, monkeypatch):
    """``runtime.progress: false`` hid the loops' bars but not the sweep's live display."""
    shown = []

    class Spy(SweepProgress):
        def start(self):
            shown.append(True)
            super().start()

    monkeypatch.setattr(sweep_progress, "rich_console", lambda: terminal())
    monkeypatch.setattr(sweep_progress, "wanted", lambda stream=None: True)
    monkeypatch.setattr(sweep_progress, "SweepProgress", Spy)
    run_pipeline(project, params={"runtime": {"progress": False}})
    assert shown == []

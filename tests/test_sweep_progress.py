"""The whole-sweep display on a terminal: it follows nodes and epochs, and stays off elsewhere."""

from __future__ import annotations

import io
import logging

from rich.console import Console

from cts_pipeline import sweep_progress
from cts_pipeline.sweep_progress import SweepProgress

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
    seen = {"started": 0, "done": 0, "epochs": 0, "loop_bars": set()}

    class Spy(SweepProgress):
        def node_started(self, name):
            seen["started"] += 1
            from cts_pipeline.pipelines.common import loop_bars

            seen["loop_bars"].add(loop_bars(type("R", (), {"progress": True})()))
            super().node_started(name)

        def node_done(self):
            seen["done"] += 1
            super().node_done()

        def epoch(self, *args, **kwargs):
            seen["epochs"] += 1
            super().epoch(*args, **kwargs)

    monkeypatch.setattr(sweep_progress, "_rich_console", lambda: console)
    monkeypatch.setattr(sweep_progress, "wanted", lambda stream=None: True)
    monkeypatch.setattr(sweep_progress, "SweepProgress", Spy)
    run_pipeline(project)
    assert seen["started"] == seen["done"] > 5
    assert seen["epochs"] > 0, "the stage line must follow the epochs"
    assert seen["loop_bars"] == {False}, "the loops' own bars stay hidden under the display"
    assert not sweep_progress.display_active(), "the display closes before the table is printed"

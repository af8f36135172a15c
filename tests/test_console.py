"""The console: warnings and one line per finished branch; every epoch stays in info.log."""

from __future__ import annotations

import logging

import pytest

from cts_pipeline.console import PROGRESS_LOGGER, QuietConsole, install


def record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "message", None, None)


@pytest.mark.parametrize(("name", "level", "shown"), [
    ("kedro.io.data_catalog", logging.INFO, False),           # every dataset load and save
    ("cts_pipeline.core.training", logging.INFO, False),      # every epoch
    ("cts_pipeline.core.training", logging.WARNING, True),
    ("kedro.runner", logging.ERROR, True),
    (PROGRESS_LOGGER, logging.INFO, True),                    # a finished branch
    ("mlflow.store", logging.INFO, True),
])
def test_the_console_shows_warnings_and_finished_branches(monkeypatch, name, level, shown):
    monkeypatch.delenv("CTS_VERBOSE", raising=False)
    assert QuietConsole().filter(record(name, level)) is shown
    monkeypatch.setenv("CTS_VERBOSE", "1")
    assert QuietConsole().filter(record(name, level)) is True


def test_install_swaps_kedros_rich_handler_for_plain_lines_off_a_terminal(monkeypatch):
    from kedro.logging import RichHandler

    root = logging.getLogger()
    saved = list(root.handlers)
    rich = RichHandler()
    monkeypatch.setattr(root, "handlers", [rich])
    try:
        install()
        install()  # idempotent
        [console] = root.handlers
        assert isinstance(console, logging.StreamHandler) and not isinstance(console, RichHandler), \
            "pytest's stdout is not a terminal: plain lines"
        assert sum(isinstance(f, QuietConsole) for f in console.filters) == 1
    finally:
        root.handlers = saved

"""The console: warnings and one line per finished branch; every epoch stays in info.log."""

from __future__ import annotations

import logging

import pytest

from cts_pipeline.terminal.console import PROGRESS_LOGGER, QuietConsole, install


def record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "message", None, None)


@pytest.mark.parametrize(("name", "level", "shown"), [
    ("kedro.io.data_catalog", logging.INFO, False),           # every dataset load and save
    ("cts_pipeline.core.train.loop", logging.INFO, False),      # every epoch
    ("cts_pipeline.core.train.loop", logging.WARNING, True),
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


def test_a_log_file_that_cannot_be_written_is_one_warning_not_a_traceback_per_record(tmp_path, capsys):
    import logging.handlers

    from cts_pipeline.terminal import console

    (tmp_path / "info.log").mkdir()  # a directory where the log file should be
    handler = logging.handlers.RotatingFileHandler(tmp_path / "info.log", delay=True)
    root = logging.getLogger()
    root.addHandler(handler)
    warned = []
    catcher = logging.Handler(logging.WARNING)
    catcher.emit = warned.append
    logging.getLogger("cts_pipeline.terminal.console").addHandler(catcher)
    try:
        console.install()
        assert handler not in root.handlers
        logging.getLogger("cts_pipeline").warning("a record after the check")
    finally:
        root.removeHandler(handler)
        logging.getLogger("cts_pipeline.terminal.console").removeHandler(catcher)
    assert [r.getMessage() for r in warned] == [
        f"the log file {tmp_path / 'info.log'} cannot be written (Is a directory); logging to the terminal only"]
    assert "Logging error" not in capsys.readouterr().err


def test_a_link_is_printed_whole_at_100_columns(tmp_path):
    """Issue 24: the MLflow link, cut by the log handler at the terminal's width, gave a broken URL
    when copied. It is printed as one soft-wrapped line: the terminal folds it, the text stays whole."""
    import io

    from rich.console import Console

    from cts_pipeline.terminal.console import show_unwrapped

    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=True, color_system=None)
    url = ("http://127.0.0.1:5000/#/experiments/1/runs/0123456789abcdef0123456789abcdef"
           "?workflowType=machine_learning")
    show_unwrapped(f"MLflow: {url}", console)
    assert out.getvalue() == f"MLflow: {url}\n"

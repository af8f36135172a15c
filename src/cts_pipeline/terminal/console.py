"""What the terminal shows during a run: warnings, one line per finished branch, the results.

The full per-epoch log still goes to ``info.log`` (``conf/logging.yml``). On the console, INFO
records of Kedro (every dataset load and save) and of ``core`` (every epoch) are left out, unless
``CTS_VERBOSE=1`` is set. Off a terminal
(CI, a log file) lines are plain and never wrapped; on one, Kedro's rich handler draws them.
"""

from __future__ import annotations

import logging
import os
import sys

PROGRESS_LOGGER = "cts_pipeline.progress"  # one line per finished branch: always shown
QUIET_PREFIXES = ("kedro", "cts_pipeline")  # their INFO records stay in info.log
# Dependency warnings that ask nothing of the user: kept in info.log, off the console.
NOT_ACTIONABLE = (
    "Workflow tracking is disabled",  # kedro-viz: no run-events file under a non-sequential runner
)


class QuietConsole(logging.Filter):
    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = verbose or os.environ.get("CTS_VERBOSE", "") not in ("", "0")

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.verbose and isinstance(record.msg, str) and record.msg.startswith(NOT_ACTIONABLE):
            return False
        if self.verbose or record.levelno >= logging.WARNING or record.name.startswith(PROGRESS_LOGGER):
            return True
        return not record.name.startswith(QUIET_PREFIXES)


class _PlainStdout(logging.StreamHandler):
    """Plain lines to whatever ``sys.stdout`` is now (a captured or redirected stream may change)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def install(verbose: bool | None = None) -> None:
    """Put :class:`QuietConsole` on the console handlers of ``conf/logging.yml`` and, off a
    terminal, draw them as plain unwrapped lines. Idempotent.

    Kedro refuses project classes and factories in ``logging.yml`` (only ``logging`` and
    ``kedro.logging`` unless ``KEDRO_LOGGING_MODULE_ALLOWLIST`` names them), so the project
    adjusts the handlers Kedro built, from its context (every ``kedro run``, viz, notebook).
    """
    from kedro.logging import RichHandler

    root = logging.getLogger()
    _drop_unwritable_log_files(root)
    for handler in list(root.handlers):
        if not isinstance(handler, RichHandler) or getattr(handler, "_cts_console", False):
            continue
        console = handler
        if not sys.stdout.isatty():
            console = _PlainStdout()
            root.removeHandler(handler)
            root.addHandler(console)
        console.addFilter(QuietConsole(bool(verbose)))
        console._cts_console = True


def _drop_unwritable_log_files(root: logging.Logger) -> None:
    """A log file that cannot be opened (``info.log`` made a directory, a read-only folder) would
    print a ``--- Logging error ---`` traceback for every record: drop its handler instead, with
    one warning, and let logging go on to the terminal."""
    for handler in list(root.handlers):
        path = getattr(handler, "baseFilename", None)
        if path is None:
            continue
        try:
            with open(path, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            root.removeHandler(handler)
            handler.close()
            logging.getLogger(__name__).warning("the log file %s cannot be written (%s); logging to the terminal only",
                                                path, exc.strerror or exc)


def rich_console():
    """The console of Kedro's rich log handler (a terminal), or None (off a terminal, in a worker)."""
    from kedro.logging import RichHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, RichHandler):
            return handler.console
    return None


def show_unwrapped(line: str, console=None) -> None:
    """A line that must survive copying whole (a URL): printed as one soft-wrapped line on the
    terminal, so the terminal folds it visually and a copy or a click gets the whole of it, where
    a log handler would cut it into pieces at the width; a plain progress record off a terminal.
    ``info.log`` gets it either way."""
    console = console if console is not None else rich_console()
    if console is None:
        logging.getLogger(PROGRESS_LOGGER).info("%s", line)
        return
    for handler in logging.getLogger().handlers:  # the log file still records it
        if getattr(handler, "baseFilename", None):
            handler.handle(logging.LogRecord(PROGRESS_LOGGER, logging.INFO, __file__, 0, "%s", (line,), None))
    console.print(line, soft_wrap=True, markup=False, highlight=False, emoji=False)


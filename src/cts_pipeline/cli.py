"""``kedro run`` for this project: Kedro's own command, with errors as one clear message.

Kedro loads ``<package>.cli`` and lets its commands override the built-in ones (Kedro's
"add or modify CLI commands" use case). This ``run`` takes every option of Kedro's ``run`` and
``--verbose``. A failure prints ``Error: <what and where>`` (every line of a configuration error,
each naming its parameter), then where the full traceback went, and exits non-zero: 2 for a
configuration that cannot run, 1 for a run that failed. ``--verbose`` (or ``CTS_VERBOSE=1``)
shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys

import click
from kedro.framework.cli.project import run as kedro_run

logger = logging.getLogger(__name__)

CONFIGURATION_EXIT = 2
FAILED_RUN_EXIT = 1


def describe(error: BaseException) -> tuple[str, int]:
    """The user's message for ``error`` and the exit code."""
    from .hooks import run_state

    text = str(error).strip() or type(error).__name__
    notes = [n for n in getattr(error, "__notes__", ()) if n]
    if notes:  # e.g. the file behind a refused artifact (hooks.ArtifactPathHook)
        text = f"{text} ({'; '.join(notes)})"
    if not run_state["nodes_started"]:  # the configuration, the data files or the tracking store
        return text, CONFIGURATION_EXIT
    name = type(error).__name__
    return (text if text.startswith(name) else f"{name}: {text}"), FAILED_RUN_EXIT


def _run(verbose: bool, **kwargs):
    from .hooks import run_state

    run_state["nodes_started"] = False
    verbose = verbose or os.environ.get("CTS_VERBOSE", "") not in ("", "0")
    try:
        return kedro_run.callback(**kwargs)
    except (KeyboardInterrupt, SystemExit, click.exceptions.ClickException):
        raise
    except Exception as error:
        if verbose:
            raise
        message, code = describe(error)
        logger.info("the run failed", exc_info=error)  # the traceback, for info.log (off the console)
        click.echo(f"Error: {message}", err=True)
        click.echo("(the traceback is in info.log; `kedro run --verbose ...` shows it here)", err=True)
        sys.exit(code)


run = click.Command(
    name="run",
    callback=_run,
    params=[*kedro_run.params,
            click.Option(["--verbose"], is_flag=True, default=False,
                         help="On failure, show the full traceback instead of one message.")],
    help=kedro_run.help,
    short_help=kedro_run.short_help,
)


@click.group(name="cts-pipeline")
def cli() -> None:
    """This project's commands (they override Kedro's built-in ones of the same name)."""


cli.add_command(run)

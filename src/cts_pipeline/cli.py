"""``kedro run`` for this project: Kedro's own command, with errors as one clear message.

Kedro loads ``<package>.cli`` and lets its commands override the built-in ones (Kedro's
"add or modify CLI commands" use case). This ``run`` takes every option of Kedro's ``run`` and
``--verbose``. A failure prints ``Error: <what and where>`` (every line of a configuration error,
each naming its parameter), then where the full traceback went, and exits non-zero: 2 for a
configuration that cannot run, 1 for a run that failed. ``--verbose`` (or ``CTS_VERBOSE=1``)
shows the traceback instead.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from pathlib import Path

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


def is_the_program() -> bool:
    """Whether this process is ``kedro run`` itself, not a test or a notebook calling the command."""
    program = Path(sys.argv[0])  # kedro's __main__ renames itself "python -m kedro"
    return program.name in ("kedro", "python -m kedro") or program.parts[-2:] == ("kedro", "__main__.py")


def _skip_teardown(code: int) -> None:
    """The last step of the process: skip the interpreter's teardown of its modules, which takes
    about 2 s after every run here (torch's, MLflow's and scikit-learn's; `docs/performance.md`).
    It runs as an exit handler, so Kedro's after-command hooks and every handler registered after
    this one have run; the log handlers are flushed here. Everything a run leaves is written by
    then: artifacts atomically, MLflow synchronously, its monitor stopped."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_with(code: int) -> None:
    if is_the_program() and os.environ.get("CTS_FAST_EXIT", "1") != "0":
        atexit.register(_skip_teardown, code)
    sys.exit(code)


def _run(verbose: bool, **kwargs):
    from . import torchrun
    from .core.distributed import under_torchrun
    from .hooks import run_state

    run_state["nodes_started"] = False
    verbose = verbose or os.environ.get("CTS_VERBOSE", "") not in ("", "0")
    if under_torchrun():
        if (kwargs.get("runner") or "SequentialRunner").rsplit(".", 1)[-1] != "SequentialRunner":
            click.echo(f"Error: --runner={kwargs['runner']} under torchrun: every rank must enter the same "
                       "training at the same time, so nodes run one after another (leave --runner out)", err=True)
            exit_with(CONFIGURATION_EXIT)
        if torchrun.is_follower():  # runs what rank 0 announces; rank 0 alone opens the Kedro session
            try:
                torchrun.follow()
            except Exception as error:
                if verbose:
                    raise
                click.echo(f"Error: rank {os.environ['RANK']}: {type(error).__name__}: {error}", err=True)
                exit_with(FAILED_RUN_EXIT)
            exit_with(0)
    try:
        kedro_run.callback(**kwargs)
    except (KeyboardInterrupt, SystemExit, click.exceptions.ClickException):
        raise
    except Exception as error:
        if verbose:
            raise
        message, code = describe(error)
        logger.info("the run failed", exc_info=error)  # the traceback, for info.log (off the console)
        click.echo(f"Error: {message}", err=True)
        click.echo("(the traceback is in info.log; `kedro run --verbose ...` shows it here)", err=True)
        exit_with(code)
    finally:
        if under_torchrun():
            torchrun.release()
    exit_with(0)


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

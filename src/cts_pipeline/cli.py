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
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
from pathlib import Path

import click
from kedro.framework.cli.project import run as kedro_run

from .errors import CONFIGURATION_EXIT, FAILED_RUN_EXIT, causes, describe
from .terminal import console

logger = logging.getLogger(__name__)


def is_the_program() -> bool:
    """Whether this process is ``kedro run`` itself, not a test or a notebook calling the command."""
    program = Path(sys.argv[0])  # kedro's __main__ renames itself "python -m kedro"
    return program.name in ("kedro", "python -m kedro") or program.parts[-2:] == ("kedro", "__main__.py")


def _skip_teardown(code: int) -> None:
    """The last step of the process: skip the interpreter's teardown of its modules, which takes
    about 2 s after every run here (torch's, MLflow's and scikit-learn's; `docs/performance.md`).
    It runs as an exit handler, so Kedro's after-command hooks and every handler registered after
    this one have run; the log handlers are flushed here. Everything a run leaves is written by
    then: artifacts atomically, MLflow synchronously, its monitor stopped.

    Child processes still alive (a failing ParallelRunner leaves its manager and pool behind) are
    ended by multiprocessing's own exit handler, which a fast exit would skip and orphan them: the
    interpreter then exits the usual way, a few seconds slower."""
    if multiprocessing.active_children():
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_with(code: int) -> None:
    if is_the_program() and os.environ.get("CTS_FAST_EXIT", "1") != "0":
        atexit.register(_skip_teardown, code)
    sys.exit(code)


@contextlib.contextmanager
def signals_as_interrupts():
    """SIGTERM (a scheduler's, a container's stop) stops the run as Ctrl-C does: the same clean
    stop, instead of the process vanishing with its tracking run left open. Yields the signals
    received (SIGINT is Python's own KeyboardInterrupt and is not recorded)."""
    received: list[int] = []

    def interrupt(signum, _frame):
        received.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_hooks() -> list[str]:
    """Tell the project's hooks the run was stopped (the live display closes, the MLflow run ends
    as KILLED); returns the nodes that were running. Kedro calls no hook for an interrupt: its
    session catches ``Exception`` only."""
    from kedro.framework.project import settings

    running: list[str] = []
    for hook in settings.HOOKS:
        on_interrupt = getattr(hook, "on_interrupt", None)
        if on_interrupt is None:
            continue
        try:
            running += on_interrupt() or []
        except Exception:  # a stop must never fail on its own clean-up
            logger.info("a hook's clean-up after the interrupt failed", exc_info=True)
    return running


def pipeline_holding(outputs: list[str], env: str | None, conf_source: str | None,
                     params: dict | None) -> str | None:
    """For ``--to-outputs`` without ``--pipelines``: the smallest registered pipeline that holds
    every named output, where the default one does not (None where it does, or none does).

    kedro-viz suggests ``kedro run --to-outputs=<dataset>`` for a dataset, without the pipeline it
    belongs to, and ``__default__`` (compare and sanity) lacks the ``cts`` pipeline's report; the
    project can decide which pipeline was meant, so the suggested command works."""
    from .config import active as active_config
    from .pipeline_registry import build_pipelines

    loader = active_config.project_config_loader(env, conf_source, params)
    registered = build_pipelines(active_config.parameters(loader))
    wanted = set(outputs)
    if wanted <= registered["__default__"].datasets():
        return None
    holding = sorted((len(p.nodes), name) for name, p in registered.items()
                     if name != "__default__" and wanted <= p.datasets())
    return holding[0][1] if holding else None


def _run(verbose: bool, **kwargs):
    from .core.device.distributed import under_torchrun
    from .pipelines import torchrun

    verbose = verbose or os.environ.get("CTS_VERBOSE", "") not in ("", "0")
    # The quiet console from the first line: an error before the session opens (an unknown
    # --runner) would otherwise print its INFO traceback record on the terminal.
    console.install(verbose)
    if kwargs.get("runner"):
        try:
            from kedro.utils import load_obj

            load_obj(kwargs["runner"], "kedro.runner")
        except (AttributeError, ImportError, ValueError):
            click.echo(f"Error: --runner={kwargs['runner']}: no such runner; use SequentialRunner (the default), "
                       "ThreadRunner, ParallelRunner or cts_pipeline.runners.DaskRunner", err=True)
            exit_with(CONFIGURATION_EXIT)
    if under_torchrun():
        if (kwargs.get("runner") or "SequentialRunner").rsplit(".", 1)[-1] != "SequentialRunner":
            click.echo(f"Error: --runner={kwargs['runner']} under torchrun: every rank must enter the same "
                       "training at the same time, so nodes run one after another (leave --runner out)", err=True)
            exit_with(CONFIGURATION_EXIT)
        if torchrun.is_follower():  # runs what rank 0 announces; rank 0 alone opens the Kedro session
            try:
                torchrun.follow(torchrun.run_device(kwargs.get("env"), kwargs.get("conf_source"),
                                                    kwargs.get("params")))
            except Exception as error:
                if verbose:
                    raise
                click.echo(f"Error: rank {os.environ['RANK']}: {type(error).__name__}: {error}", err=True)
                exit_with(FAILED_RUN_EXIT)
            exit_with(0)
    if kwargs.get("to_outputs") and not (kwargs.get("pipeline") or kwargs.get("pipelines")):
        try:
            chosen = pipeline_holding(kwargs["to_outputs"], kwargs.get("env"), kwargs.get("conf_source"),
                                      kwargs.get("params"))
        except Exception:  # a configuration Kedro itself will name in one line when the run starts
            logger.info("could not look for the pipeline of --to-outputs", exc_info=True)
            chosen = None
        if chosen is not None:
            click.echo(f"--to-outputs={','.join(kwargs['to_outputs'])} is in the {chosen} pipeline, not the "
                       f"default one: running --pipelines={chosen}", err=True)
            kwargs["pipelines"] = [chosen]
    ended_by = None  # what ended the run, for torchrun's followers (torchrun.release)
    try:
        with signals_as_interrupts() as received:
            kedro_run.callback(**kwargs)
    except KeyboardInterrupt as interrupt:
        ended_by = interrupt
        stopped_at = interrupted_hooks()
        where = f" during {', '.join(stopped_at)}" if stopped_at else ""
        name = signal.Signals(received[-1]).name if received else "SIGINT"
        click.echo(f"Stopped by {name}{where}: finished outputs and the per-epoch checkpoints are kept; run the "
                   "same command to resume (add --only-missing-outputs to skip finished branches)", err=True)
        exit_with(128 + (received[-1] if received else signal.SIGINT))
    except (SystemExit, click.exceptions.ClickException):
        raise
    except Exception as error:
        ended_by = error
        if verbose:
            raise
        message, code = describe(error)
        logger.info("the run failed", exc_info=error)  # the traceback, for info.log (off the console)
        click.echo(f"Error: {message}", err=True)
        click.echo("(the traceback is in info.log; `kedro run --verbose ...` shows it here)", err=True)
        exit_with(code)
    finally:
        if under_torchrun():
            try:
                device = torchrun.run_device(kwargs.get("env"), kwargs.get("conf_source"), kwargs.get("params"))
            except Exception:  # the error that ended the run has been said; the followers stopped on it too
                device = None
            torchrun.release(device, causes(ended_by))
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

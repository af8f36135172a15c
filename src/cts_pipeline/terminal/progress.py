"""On a terminal, one live display for the whole sweep: how many nodes are done, and what runs now
(the branch, its stage and its epoch). Finished branches print their line above it, and the
results table follows when it closes.

The display is rich's ``Progress``, drawn on the console of Kedro's rich log handler, so log lines
scroll above it instead of tearing it. The epochs come from the per-epoch log records of ``core``:
each carries ``stage``, ``epoch`` and ``epochs`` as record attributes (``logging``'s ``extra``), so
``core`` stays free of any display code, and the records that Dask forwards from its workers move
the display too. Off a terminal, with ``CTS_VERBOSE=1`` or ``CTS_PROGRESS=0``, nothing is drawn and
the loops keep their own tqdm bars (which tqdm itself hides off a terminal).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from kedro.framework.hooks import hook_impl

from ..config.sections import RuntimeConfig
from .console import PROGRESS_LOGGER, rich_console

CORE_LOGGER = "cts_pipeline"


def wanted(stream=None) -> bool:
    stream = stream or sys.stdout
    off = os.environ.get("CTS_PROGRESS", "1") in ("0", "") or os.environ.get("CTS_VERBOSE", "") not in ("", "0")
    return not off and stream.isatty()


class _EpochRecords(logging.Handler):
    """Moves the display on each record that says which epoch of which stage just ended."""

    def __init__(self, display: SweepProgress) -> None:
        super().__init__(level=logging.INFO)
        self.display = display

    def emit(self, record: logging.LogRecord) -> None:
        stage, epoch, epochs = (getattr(record, k, None) for k in ("stage", "epoch", "epochs"))
        if stage is not None and epoch is not None and epochs:
            self.display.epoch(str(stage), int(epoch), int(epochs), getattr(record, "unit", "epoch"))


class SweepProgress:
    """Two lines: the sweep (nodes done of those to run) and the stage now running."""

    def __init__(self, console, total_nodes: int) -> None:
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        # The time left, from the pace so far ("-:--:--" until there is one): the sweep moves by
        # nodes and, inside a long node, by its epochs, so the pace exists before the first node ends.
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=30),
                                 TextColumn("{task.fields[count]}"), TimeElapsedColumn(), TextColumn("left"),
                                 TimeRemainingColumn(), console=console, transient=True, refresh_per_second=4)
        self.total_nodes = total_nodes
        self.sweep = self.progress.add_task("sweep", total=total_nodes, count=f"0/{total_nodes} nodes")
        self.stage = self.progress.add_task("starting", total=1, count="", visible=False)
        self.done = 0
        self.handler = _EpochRecords(self)

    def start(self) -> None:
        self.progress.start()
        logging.getLogger(CORE_LOGGER).addHandler(self.handler)

    def stop(self) -> None:
        logging.getLogger(CORE_LOGGER).removeHandler(self.handler)
        self.progress.stop()

    def node_started(self, name: str) -> None:
        self.progress.update(self.stage, description=f"  {name}", completed=0, total=1, count="", visible=True)

    def node_done(self) -> None:
        self.done += 1
        self.progress.update(self.sweep, completed=self.done, count=f"{self.done}/{self.total_nodes} nodes")

    def epoch(self, stage: str, epoch: int, epochs: int, unit: str = "epoch") -> None:
        self.progress.update(self.stage, description=f"  {stage}", completed=epoch, total=epochs,
                             count=f"{unit} {epoch}/{epochs}", visible=True)
        # The running node's share of its own work, so the bar (and the time left) moves during
        # a long search or training; never a whole node before the node is done.
        self.progress.update(self.sweep, completed=self.done + min(epoch / epochs, 0.99))


def nodes_to_run(pipeline, catalog, only_missing_outputs: bool) -> int:
    """How many nodes the run will start: all of them, or under ``--only-missing-outputs`` those
    with an output that is missing (or flagged stale), as Kedro's filter decides."""
    if not only_missing_outputs:
        return len(pipeline.nodes)
    return sum(1 for node in pipeline.nodes
               if not node.outputs or any(name in catalog and not catalog.exists(name) for name in node.outputs))


def describe_sweep(pipeline_names: list[str] | None, pipeline, nodes: int) -> str:
    """What a run is about to do, in one line: the pipelines, how many nodes will run, and the
    branches (method, seed, sparsity namespaces) they make, e.g. ``kedro run: __default__ (compare
    + sanity), 126 nodes; 38 branches: 10 methods, 5 sparsities, 1 seed``."""
    names = ", ".join(pipeline_names or ["__default__"])
    if names == "__default__":
        names = "__default__ (compare + sanity: every method, then the sanity checks)"
    branches = {n.namespace for n in pipeline.nodes if n.namespace and len(n.namespace.split(".")) == 3}
    parts = [ns.split(".") for ns in branches]
    counts = [(len({p[0] for p in parts}), "method"), (len({p[2] for p in parts}), "sparsity"),
              (len({p[1] for p in parts}), "seed")]
    grid = ", ".join(f"{n} {what if n == 1 else 'sparsities' if what == 'sparsity' else what + 's'}"
                     for n, what in counts)
    return f"kedro run: {names}, {nodes} nodes" + (f"; {len(branches)} branches: {grid}" if branches else "")


def _progress_setting(catalog) -> bool:
    """``runtime.progress``: false turns the live display off as well as the loops' own bars."""
    try:
        runtime = catalog.load("parameters").get("runtime")
    except Exception as exc:  # a catalog without the parameters (a test's): the display's default
        logging.getLogger(__name__).debug("no runtime.progress to read (%s)", exc)
        return True
    if isinstance(runtime, RuntimeConfig):  # typed by the validation hook
        return runtime.progress
    return bool((runtime or {}).get("progress", True))


class SweepProgressHook:
    """Owns the sweep's display for one run. While it draws, each node is handed ``runtime`` with
    ``progress: false``, so the loops' own tqdm bars give way to it (``before_node_run`` may
    replace a node's inputs): the nodes never have to ask whether a display is up."""

    def __init__(self) -> None:
        self.display: SweepProgress | None = None

    @hook_impl(trylast=True)  # after FreshnessHook has flagged what must be recomputed
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        total = nodes_to_run(pipeline, catalog, bool(run_params.get("only_missing_outputs")))
        logging.getLogger(PROGRESS_LOGGER).info("%s", describe_sweep(run_params.get("pipeline_names"), pipeline,
                                                                     total))
        console = rich_console()
        if self.display is not None or console is None or not wanted() or not _progress_setting(catalog):
            return
        self.display = SweepProgress(console, total)
        self.display.start()

    @hook_impl
    def before_node_run(self, node, inputs: dict[str, Any]) -> dict[str, Any] | None:
        if self.display is None:
            return None
        self.display.node_started(node.name)
        return {name: value.replace(progress=False) for name, value in inputs.items()
                if isinstance(value, RuntimeConfig) and value.progress} or None

    @hook_impl
    def after_node_run(self) -> None:
        if self.display is not None:
            self.display.node_done()

    @hook_impl(tryfirst=True)  # gone before the results table is printed
    def after_pipeline_run(self) -> None:
        self.close()

    @hook_impl(tryfirst=True)
    def on_pipeline_error(self) -> None:
        self.close()

    def on_interrupt(self) -> None:  # cli.interrupted_hooks: the display must not outlive the run
        self.close()

    def close(self) -> None:
        display, self.display = self.display, None
        if display is not None:
            display.stop()

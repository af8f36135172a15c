"""``DaskRunner``: the DAG on a dask.distributed cluster, one task per node.

``kedro run --runner=cts_pipeline.runners.DaskRunner`` reads ``conf/<env>/dask.yml``:
``address: null`` starts a ``LocalCluster`` of ``n_workers`` processes with
``threads_per_worker`` threads; ``address: tcp://host:8786`` joins a running scheduler.
``--runner-params address=...,n_workers=...`` override the file.

Written against Kedro 1.7's ``AbstractRunner`` (Kedro's documented Dask recipe predates it):

* A node is submitted as soon as its inputs exist, not level by level, so a long LTR chain never
  holds back the CTS branches; the scheduler places it on a free worker.
* Tasks exchange data only through the catalog's files, never through Dask: a run refuses a
  pipeline whose intermediate data would live in one process's memory. Across machines the data
  folder (``globals.yml``'s ``data_root``) must be shared storage; a worker that cannot read an
  input names it.
* Nodes tagged ``gpu`` (training, search, scoring, retraining, evaluation) ask for one unit of
  the ``GPU`` resource when some worker declares it (``dask worker --resources GPU=1``), so such
  a worker runs one at a time; on a cluster without resources they run unconstrained.
* Torch uses as many threads as the worker has (``runtime.num_threads`` overrides), so two
  one-thread workers on two cores do not oversubscribe them.
* Hooks: node hooks run in the driver (``before_node_run`` at submission, ``after_node_run`` with
  empty ``outputs`` once the outputs are saved, ``on_node_error``), so MLflow tracking stays in
  one process; dataset hooks do not run, as under Kedro's ParallelRunner.
* A worker that dies mid-task (SIGKILL, OOM, a lost machine) has its task rescheduled on another
  worker, up to ``distributed.scheduler.allowed-failures`` times; the task resumes from its
  per-epoch checkpoint. A node that raises stops the run with the node's name and its error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin
from kedro.framework.hooks.manager import _NullPluginManager
from kedro.io import MemoryDataset
from kedro.runner import AbstractRunner
from kedro.runner.task import Task

from .config.sections import DaskSettings
from .config.typed import read_section
from .core.artifacts.checkpoints import PendingRemovals
from .pipelines.common import GPU_TAG
from .terminal.console import PROGRESS_LOGGER, QuietConsole

logger = logging.getLogger(__name__)

GPU_RESOURCE = "GPU"
FORWARDED_LOGGERS = ("cts_pipeline", "kedro")
# How a LocalCluster runs this project's tasks:
# - a task holds a worker's event loop for a whole training, so Dask's "event loop was
#   unresponsive" warning says nothing actionable; worker lifecycle lines stay off the terminal;
# - worker-saturation 1.0: a worker is handed a task only when a thread is free, so a short task
#   never waits behind a long LTR chain queued on a busy worker (Dask's 1.1 queues one extra);
# - no MALLOC_TRIM_THRESHOLD_: Dask's 64 KiB default makes glibc return memory to the OS after
#   every step, which slows torch's CPU training about 1.7x (benchmarks/dask_worker_speed.py,
#   docs/performance.md).
CLUSTER_CONFIG = {"distributed.admin.tick.limit": "1h", "logging.distributed": "warning",
                  "distributed.scheduler.worker-saturation": 1.0,
                  "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                  # non-daemonic workers may start processes of their own: the DataLoader workers
                  # of a streamed dataset, and runtime.distributed's ranks
                  "distributed.worker.daemon": False}


@contextlib.contextmanager
def worker_environment():
    """The environment a LocalCluster's workers inherit: quiet logging (their records are
    forwarded instead). Set here because a spawned worker imports Kedro, which configures its
    logging, before the Nanny's own ``env`` reaches it."""
    wanted = {"KEDRO_LOGGING_CONFIG": str(Path(__file__).with_name("worker_logging.yml")),
              "DASK_DISTRIBUTED__ADMIN__TICK__LIMIT": CLUSTER_CONFIG["distributed.admin.tick.limit"],
              "DASK_LOGGING__DISTRIBUTED": "warning"}
    # The Nanny copies its pre-spawn variables into this process's environment (and prefers
    # what it finds there): restore the environment afterwards, the user's settings first.
    saved = dict(os.environ)
    if os.environ.get("MALLOC_TRIM_THRESHOLD_") == "65536":  # left by an earlier Nanny in this process
        del os.environ["MALLOC_TRIM_THRESHOLD_"]
    os.environ.update({k: v for k, v in wanted.items() if k not in saved})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class DaskNodeError(RuntimeError):
    """A node failed on a worker; the message names the node and its original error."""


class SchedulerUnreachable(ConnectionError):
    """``dask.yml``'s scheduler did not answer: the run's configuration, found before any node."""


@contextlib.contextmanager
def connect(settings: DaskSettings):
    """A client of the scheduler at ``settings.address``, or one line naming it within
    ``connect_timeout`` seconds (Dask's own default waits 30 s, then prints its retries)."""
    from distributed import Client

    try:
        client = Client(settings.address, timeout=settings.connect_timeout)
    except (OSError, TimeoutError) as exc:
        raise SchedulerUnreachable(
            f"dask.yml: the Dask scheduler at {settings.address} did not answer within {settings.connect_timeout:g} s "
            f"({type(exc).__name__}); start it (`dask scheduler`) or set address: null for a local cluster") from None
    with client:
        yield client


def _dask_config() -> dict[str, Any]:
    """``dask.yml`` of the session's environment (the context handed its loader to config.active)."""
    from kedro.config import MissingConfigException

    from .config import active as active_config

    try:
        return dict(active_config.config_loader()["dask"])
    except (KeyError, MissingConfigException):
        return {}


class DaskRunner(AbstractRunner):
    """Runs each node as a dask.distributed task; see the module docstring."""

    def __init__(self, is_async: bool = False, client: Any = None, **settings: Any):
        """``settings`` override ``dask.yml``; ``client`` runs on an existing ``distributed.Client``."""
        super().__init__(is_async=is_async)
        self._overrides = settings
        self._client = client

    def _get_executor(self, max_workers: int) -> None:  # tasks go to the cluster, not a pool
        return None

    def settings(self) -> DaskSettings:
        return read_section(DaskSettings, {**_dask_config(), **self._overrides})

    def _run(self, pipeline, catalog, hook_manager=None, run_id: str | None = None) -> None:
        from distributed import Client

        hooks = hook_manager or _NullPluginManager()
        check_catalog(pipeline, catalog)
        if not QuietConsole().verbose:  # the cluster's own INFO lines: start, stop, connections
            logging.getLogger("distributed").setLevel(logging.WARNING)
        settings = self.settings()
        if self._client is not None:
            self._schedule(pipeline, catalog, hooks, run_id, self._client, settings)
            return
        if settings.address is not None:
            with connect(settings) as client:
                self._schedule(pipeline, catalog, hooks, run_id, client, settings)
            return
        with local_cluster(settings.n_workers, settings.threads_per_worker, settings.dashboard_address) as cluster, \
                Client(cluster) as client:
            self._schedule(pipeline, catalog, hooks, run_id, client, settings)

    def _schedule(self, pipeline, catalog, hooks, run_id, client, settings: DaskSettings) -> None:
        from distributed import as_completed

        if settings.forward_logs:
            for name in FORWARDED_LOGGERS:
                client.forward_logging(name, level=logging.INFO)
        workers = client.scheduler_info()["workers"]
        dashboard = self._client is None and settings.address is None and settings.dashboard_address
        logging.getLogger(PROGRESS_LOGGER).info(
            "Dask: %d workers (%d threads) at %s%s", len(workers), sum(w["nthreads"] for w in workers.values()),
            client.scheduler.address, f"; dashboard {client.dashboard_link}" if dashboard else "")
        gpu = any(GPU_RESOURCE in w.get("resources", {}) for w in workers.values())
        forget_resolved_versions(catalog, pipeline.datasets())  # what the driver resolved before the run may be stale
        # The catalog travels with each task, not scattered once: Dask counts scattered data as
        # lost when any worker holding it dies, and would then cancel instead of retrying.
        project = str(Path.cwd())
        client.register_plugin(ProjectWorker(project))
        dependencies = pipeline.node_dependencies
        todo, done, running = set(dependencies), set(), {}
        futures = as_completed()

        def submit_ready() -> None:
            ready = sorted((n for n in todo if dependencies[n] <= done), key=lambda n: n.name)
            for node in ready:
                todo.discard(node)
                hooks.hook.before_node_run(node=node, catalog=catalog, inputs={}, is_async=self._is_async,
                                           run_id=run_id)
                resources = {GPU_RESOURCE: 1} if gpu and GPU_TAG in node.tags else None
                future = client.submit(run_node_on_worker, node, catalog, run_id, self._is_async,
                                       key=f"{node.name}-{uuid.uuid4().hex[:8]}", resources=resources, pure=False)
                running[future] = node
                futures.add(future)

        submit_ready()
        for future in futures:
            node = running.pop(future)
            try:
                future.result()
            except Exception as exc:
                hooks.hook.on_node_error(error=exc, node=node, catalog=catalog, inputs={}, is_async=self._is_async,
                                         run_id=run_id)
                client.cancel(list(running))
                self._suggest_resume_scenario(pipeline, done, catalog)
                notes = "".join(f" ({note})" for note in getattr(exc, "__notes__", ()))
                raise DaskNodeError(f"node {node.name!r} failed on a Dask worker: "
                                    f"{type(exc).__name__}: {exc}{notes}") from exc
            done.add(node)
            hooks.hook.after_node_run(node=node, catalog=catalog, inputs={}, outputs={}, is_async=self._is_async,
                                      run_id=run_id)
            self._logger.info("Completed node: %s (%d of %d)", node.name, len(done), len(dependencies))
            submit_ready()
        if todo:
            self._raise_runtime_error(todo, done, set(), None)


@contextlib.contextmanager
def local_cluster(n_workers: int, threads_per_worker: int, dashboard_address: str | None = None, **kwargs):
    """A ``LocalCluster`` of worker processes set up for this project (``CLUSTER_CONFIG``)."""
    import dask
    from distributed import LocalCluster

    with dask.config.set(CLUSTER_CONFIG), worker_environment(), LocalCluster(
            n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
            dashboard_address=dashboard_address, **kwargs) as cluster:
        yield cluster


def check_catalog(pipeline, catalog) -> None:
    """Refuse data that one task would hand another through memory: a Dask worker cannot see it."""
    free_inputs = pipeline.inputs()
    in_memory = sorted(
        name for name in pipeline.datasets()
        if name not in free_inputs and isinstance(catalog.get(name, fallback_to_runtime_pattern=True), MemoryDataset)
    )
    if in_memory:
        raise ValueError(
            f"DaskRunner: {', '.join(in_memory)} would be held in one process's memory, where another worker "
            "cannot read it; give each a file-backed catalog entry (conf/base/catalog.yml)")


def forget_resolved_versions(catalog, names) -> None:
    """A versioned dataset caches the version it last found; another process may since have saved
    a newer one (``release`` clears the cache; memory datasets, the parameters, are left alone)."""
    for name in names:
        if not isinstance(catalog.get(name, fallback_to_runtime_pattern=True), MemoryDataset):
            catalog.release(name)


class ProjectWorker(WorkerPlugin):
    """Each worker process, once as it joins (Dask runs ``setup`` on every worker, present or
    started later): the project folder as working directory (relative paths such as ``data.root``
    and ``runtime.checkpoint_dir`` resolve as on the driver), torch threads = the worker's
    threads, and INFO records of ``cts_pipeline`` kept for forwarding."""

    name = "cts-pipeline-project"

    def __init__(self, project: str):
        self.project = project

    def setup(self, worker) -> None:
        import torch

        if Path(self.project).is_dir():
            os.chdir(self.project)
        root = logging.getLogger()  # a worker prints and files nothing itself: its records go to the driver
        for handler in list(root.handlers):
            root.removeHandler(handler)
        torch.set_num_threads(max(1, worker.state.nthreads))
        logging.getLogger("cts_pipeline").setLevel(logging.INFO)


def check_inputs(node, catalog) -> None:
    """Every input of ``node`` readable here; else name it and the shared-storage requirement."""
    from distributed import get_worker

    files = [name for name in node.inputs if not isinstance(catalog.get(name), MemoryDataset)]
    forget_resolved_versions(catalog, files)
    for name in files:
        if not catalog.exists(name):
            dataset = catalog.get(name)
            where = getattr(dataset, "_filepath", None) or dataset
            raise FileNotFoundError(
                f"worker {get_worker().address} cannot read input {name!r} of node {node.name!r} at {where}: "
                "on several machines the data folder must be shared storage at the same path "
                "(an NFS mount, or an fsspec URL in globals.yml's data_root)")


def run_node_on_worker(node, catalog, run_id: str | None, is_async: bool) -> str:
    """One node on a Dask worker (set up by :class:`ProjectWorker`): inputs from the catalog's
    files, outputs back to them."""
    check_inputs(node, catalog)
    pending = PendingRemovals.start()  # the node's checkpoints go only once its outputs are saved
    try:
        Task(node=node, catalog=catalog, hook_manager=_NullPluginManager(), is_async=is_async, run_id=run_id).execute()
    except BaseException:
        pending.keep()
        raise
    pending.remove()
    return node.name

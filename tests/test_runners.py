"""The sweep under every runner: Dask (a LocalCluster of 2 worker processes), Kedro's ParallelRunner
and ThreadRunner give the sequential run's masks and metrics, and the same MLflow runs."""

from __future__ import annotations

import copy
import json
import operator
import os
import signal
import threading
import time

import pytest
import torch
from distributed import Client
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline, node
from kedro.runner import ParallelRunner, ThreadRunner
from mlflow.tracking import MlflowClient

from cts_pipeline.config.sections import DaskSettings
from cts_pipeline.config.typed import read_section
from cts_pipeline.datasets import JSONDataset
from cts_pipeline.runners import (
    DaskNodeError,
    DaskRunner,
    check_catalog,
    local_cluster,
)

from .conftest import copy_project, run_pipeline

ONE_THREAD = {"runtime": {"num_threads": 1}}  # what a one-thread Dask worker gives torch
TIMES = ("seconds", "started_at", "retrain_started_at", "finished_at", "eval_seconds", "history",
         "retrain_history", "search_group_seconds", "levels", "resumed_after_epoch")


@pytest.fixture(scope="module")
def cluster():
    """Two one-thread worker processes, each declaring one GPU, as `dask worker --resources GPU=1`."""
    with local_cluster(2, 1, resources={"GPU": 1}) as local, Client(local) as client:
        yield client


def newest(project, pattern: str) -> list:
    """The newest version of each versioned artifact matching ``pattern``."""
    versions = {}
    for path in project.glob(f"{pattern}/*/{pattern.rsplit('/', 1)[1]}"):
        versions.setdefault(path.parent.parent, []).append(path)
    return [sorted(v)[-1] for v in versions.values()]


def results(project) -> dict[str, dict]:
    """The newest mask and metrics of every branch (times left out), by branch."""
    out = {}
    for path in newest(project, "data/08_reporting/smoke/*/seed0/**/metrics.json"):
        metrics = json.loads(path.read_text())
        name = metrics.get("namespace") or f"{metrics['method']}.seed{metrics['seed']}"
        out[name] = {"metrics": {k: v for k, v in metrics.items() if k not in TIMES}}
    for path in newest(project, "data/07_model_output/smoke/*/seed0/*/mask.pt"):
        method, sparsity = path.parents[4].name.split("-")[0], path.parents[2].name
        out.setdefault(f"{method}.seed0.{sparsity}", {})["mask"] = torch.load(path, weights_only=True)
    return out


def assert_same(reference: dict, other: dict) -> None:
    assert sorted(reference) == sorted(other)
    for name, ref in reference.items():
        assert other[name]["metrics"] == ref["metrics"], name
        if "mask" in ref:
            for layer, keep in ref["mask"]["masks"].items():
                assert torch.equal(other[name]["mask"]["masks"][layer], keep), f"{name}: {layer}"


def child_runs(parent_index: int = 0) -> dict[str, tuple[dict, dict]]:
    """The children of the newest-but-``parent_index`` parent run: name -> (params, metrics)."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name("cts-pipeline")
    runs = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    parent = parents[parent_index]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    out = {}
    for child in children:
        # The branch's real wall-clock: it spans at least its own training.
        stages = child.data.metrics.get("seconds_retrain", child.data.metrics.get("seconds_train"))
        assert child.info.end_time - child.info.start_time >= 1000 * stages - 50, child.info.run_name
        metrics = {k: v for k, v in child.data.metrics.items() if not k.startswith("seconds_")}
        out[child.info.run_name] = (child.data.params, metrics)
    return out


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, empty_mlflow_store):
    """The compare sweep run by the SequentialRunner with one torch thread (what a one-thread Dask
    worker gives torch): the masks, metrics and MLflow children every runner must reproduce."""
    import shutil

    project = copy_project(tmp_path_factory.mktemp("sequential"))
    shutil.copy(empty_mlflow_store, project / "mlflow.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{(project / 'mlflow.db').as_posix()}")
        run_pipeline(project, pipeline="compare", params=ONE_THREAD)
        return results(project), child_runs()


def test_dask_runner_matches_the_sequential_run(project, cluster, sequential):
    """Two worker processes of one thread each compute what one process with one thread does: the
    same kernels in the same order, so the same bits (docs/architecture.md, "What is bit-exact
    where")."""
    reference, reference_runs = sequential
    run_pipeline(project, pipeline="compare", runner=DaskRunner(client=cluster))
    assert_same(reference, results(project))
    assert child_runs() == reference_runs
    hardware = {r["metrics"]["hardware"] for r in results(project).values() if "metrics" in r}
    assert all("1 threads" in h for h in hardware), f"torch must use the worker's one thread: {hardware}"

    # A rerun computes nothing and logs the whole sweep from the catalog.
    written = sorted(project.glob("data/**/*.json"))
    run_pipeline(project, pipeline="compare", runner=DaskRunner(client=cluster), only_missing_outputs=True)
    assert sorted(project.glob("data/**/*.json")) == written
    assert child_runs() == reference_runs
    client = MlflowClient()
    experiment = client.get_experiment_by_name("cts-pipeline")
    newest_parent = client.search_runs([experiment.experiment_id], "tags.`kedro.only_missing_outputs` = 'True'")
    reused = client.search_runs([experiment.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{newest_parent[0].info.run_id}'")
    assert {r.data.tags.get("computed_in_an_earlier_run") for r in reused} == {"true"}


@pytest.mark.parametrize("runner", [ThreadRunner, ParallelRunner], ids=["thread", "parallel"])
def test_kedro_parallel_runners_keep_results_and_tracking(project, runner, sequential):
    reference, reference_runs = sequential
    run_pipeline(project, pipeline="compare", params=ONE_THREAD, runner=runner(max_workers=2))
    other = results(project)
    # Several tickets train at once in one process (threads) or in two (processes): the same masks
    # and accuracies, up to float rounding.
    assert sorted(other) == sorted(reference)
    for name, ref in reference.items():
        for key in ("test_accuracy", "kept_weights", "achieved_sparsity"):
            assert other[name]["metrics"][key] == pytest.approx(ref["metrics"][key], abs=1e-6), (name, key)
    assert sorted(child_runs()) == sorted(reference_runs)


def test_a_node_failing_on_a_worker_stops_the_run_naming_it(tmp_path, cluster):
    catalog = DataCatalog({"numerator": MemoryDataset(1), "denominator": MemoryDataset(0),
                           "ratio": JSONDataset(filepath=str(tmp_path / "ratio.json"))})
    pipeline = Pipeline([node(operator.truediv, ["numerator", "denominator"], "ratio", name="divide")])
    with pytest.raises(DaskNodeError, match=r"node 'divide' failed on a Dask worker: ZeroDivisionError: division by zero"):
        DaskRunner(client=cluster).run(pipeline, catalog)
    assert not (tmp_path / "ratio.json").exists()


def test_a_worker_that_cannot_read_an_input_names_it(tmp_path, cluster):
    catalog = DataCatalog({"weights": JSONDataset(filepath=str(tmp_path / "elsewhere" / "weights.json")),
                           "copy": JSONDataset(filepath=str(tmp_path / "copy.json"))})
    pipeline = Pipeline([node(copy.copy, "weights", "copy", name="copy_weights")])
    with pytest.raises(DaskNodeError, match=r"cannot read input 'weights' of node 'copy_weights' at .*elsewhere.*"
                                            r"shared storage"):
        DaskRunner(client=cluster).run(pipeline, catalog)


def test_data_held_in_one_process_memory_is_refused():
    pipeline = Pipeline([node(abs, "x", "y", name="a"), node(abs, "y", "z", name="b")])
    catalog = DataCatalog({"x": MemoryDataset(-1)})
    with pytest.raises(ValueError, match=r"DaskRunner: y, z would be held in one process's memory"):
        check_catalog(pipeline, catalog)


def test_dask_settings_refuse_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match=r"dask.yml: unknown key 'n_worker' \(did you mean 'n_workers'\?\)"):
        read_section(DaskSettings, {"n_worker": 2})
    with pytest.raises(ValueError, match=r"dask.yml: threads_per_worker must be a positive integer"):
        read_section(DaskSettings, {"threads_per_worker": 0})
    with pytest.raises(ValueError, match=r"address must be null or a URL"):
        read_section(DaskSettings, {"address": "localhost"})


def test_a_scheduler_that_does_not_answer_is_named_within_its_timeout():
    """Nothing listens on port 9 of this machine: one line naming the address, after the
    configured wait rather than Dask's own 30 s of retries."""
    from cts_pipeline.errors import CONFIGURATION_EXIT, describe
    from cts_pipeline.runners import SchedulerUnreachable, connect

    started = time.monotonic()
    with pytest.raises(SchedulerUnreachable) as failure, connect(DaskSettings(address="tcp://127.0.0.1:9",
                                                                              connect_timeout=2)):
        pass
    assert time.monotonic() - started < 25, "Dask's default wait would be 30 s"
    message, code = describe(failure.value)
    assert code == CONFIGURATION_EXIT
    assert message.startswith("dask.yml: the Dask scheduler at tcp://127.0.0.1:9 did not answer within 2 s")
    with pytest.raises(ValueError, match="connect_timeout must be a positive number"):
        DaskSettings(connect_timeout=0)


LONG_DENSE = {"training": {"epochs": 60}}  # a dense training of a few seconds, killed halfway


def test_a_worker_killed_mid_training_is_replaced_and_the_task_resumes(project, cluster):
    """SIGKILL the worker running the dense training once its checkpoint exists: the scheduler runs
    the task on the other worker, which resumes from the checkpoint, to the same weights."""
    dense_only = {"to_outputs": ["dense.seed0.metrics"]}
    run_pipeline(project, pipeline="cts", params={**LONG_DENSE, **ONE_THREAD}, **dense_only)
    reference = results(project)
    weights = "data/06_models/smoke/dense-*/seed0/final_weights.pt"
    reference_weights = torch.load(newest(project, weights)[0], weights_only=True)
    killed = []

    def kill_the_trainer() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if any(project.glob("data/06_models/checkpoints/dense.seed0/dense-*.pt")):
                busy = [addr for addr, keys in cluster.processing().items()
                        if any(str(k).startswith("dense.seed0.train_dense") for k in keys)]
                if busy:
                    pid = cluster.run(os.getpid, workers=busy)[busy[0]]
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_trainer)
    killer.start()
    run_pipeline(project, pipeline="cts", params=LONG_DENSE, runner=DaskRunner(client=cluster), **dense_only)
    killer.join()
    assert killed, "the dense training ended before its worker could be killed"
    assert_same(reference, results(project))
    resumed = torch.load(newest(project, weights)[0], weights_only=True)
    assert all(torch.equal(resumed[k], v) for k, v in reference_weights.items())
    metrics = json.loads(newest(project, "data/08_reporting/smoke/dense-*/seed0/metrics.json")[0].read_text())
    assert metrics["resumed_after_epoch"] >= 1, "the replacement should resume, not start over"
    cluster.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker


def test_every_node_that_computes_on_the_device_asks_for_a_gpu():
    from cts_pipeline.pipeline_registry import register_pipelines
    from cts_pipeline.pipelines.common import GPU_TAG

    nodes = register_pipelines()["__default__"].nodes
    light = {n.name.rsplit(".", 1)[-1] for n in nodes if GPU_TAG not in n.tags}
    assert light == {"prepare_data", "binary_mask", "select_level", "shuffle_mask", "invert_mask", "reinitialise",
                     "compare_report", "sanity_report"}

"""Shared fixtures: a throwaway copy of the project to run Kedro sessions in."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")  # no network here, and none wanted in tests

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = PROJECT_ROOT.parent / "shared" / "data"


def copy_project(folder: Path) -> Path:
    """The project's configuration under ``folder``/project, with an empty conf/local."""
    root = folder / "project"
    shutil.copytree(PROJECT_ROOT / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    (root / "src").mkdir()  # bootstrap_project puts it on sys.path; the package itself is installed
    shutil.copy(PROJECT_ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables made, and no run: creating the tables (MLflow's
    alembic migrations) costs about 2 s, which each test's fresh store would otherwise pay."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{path.as_posix()}").search_experiments()
    return path


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_mlflow_store: Path) -> Path:
    """The project's configuration in a temporary folder, so a run's data and MLflow store land there."""
    root = copy_project(tmp_path)
    shutil.copy(empty_mlflow_store, root / "mlflow.db")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{(root / 'mlflow.db').as_posix()}")
    monkeypatch.delenv("KEDRO_ENV", raising=False)
    return root


@pytest.fixture(scope="session")
def finished_smoke_data(tmp_path_factory, empty_mlflow_store: Path) -> Path:
    """The data folder of one finished ``kedro run --pipelines=cts --env=smoke``, made once."""
    root = copy_project(tmp_path_factory.mktemp("finished-smoke"))
    shutil.copy(empty_mlflow_store, root / "mlflow.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{(root / 'mlflow.db').as_posix()}")
        patch.delenv("KEDRO_ENV", raising=False)
        run_pipeline(root)
    return root / "data"


@pytest.fixture
def finished_project(project: Path, finished_smoke_data: Path) -> Path:
    """``project`` after ``kedro run --pipelines=cts --env=smoke``: a copy of one such run's data
    folder (records and version timestamps included), without its MLflow runs or its log lines.
    For tests whose first run is only their starting point."""
    shutil.copytree(finished_smoke_data, project / "data", copy_function=shutil.copy2, dirs_exist_ok=True)
    return project


def run_pipeline(project: Path, env: str = "smoke", params: dict | None = None,
                 pipeline: str = "cts", **run_kwargs) -> dict:
    """Run one pipeline through a real Kedro session, as ``kedro run`` does."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    with KedroSession.create(project_path=project, env=env, runtime_params=params) as session:
        return session.run(pipeline_names=[pipeline], **run_kwargs)


def latest(project: Path, pattern: str) -> Path:
    """The newest version of a versioned artifact; ``pattern`` may hold wildcards for the
    configuration keys, e.g. ``data/08_reporting/smoke/report-*/cts_results.csv``."""
    versions = sorted(project.glob(pattern + "/*/"), key=lambda v: v.name)
    assert versions, f"no version of {pattern} was written"
    return versions[-1] / Path(pattern).name


@pytest.fixture
def logged(monkeypatch):
    """Every record of the project's loggers during the test. Kedro reconfigures logging whenever a
    session is created (``dictConfig`` drops the handlers of ``cts_pipeline`` and its children, and
    caplog's), so records are taken where every logger hands them to its handlers."""
    import logging

    records: list[logging.LogRecord] = []
    call_handlers = logging.Logger.callHandlers

    def keep(self, record):
        if record.name.startswith("cts_pipeline"):
            records.append(record)
        call_handlers(self, record)

    monkeypatch.setattr(logging.Logger, "callHandlers", keep)
    return records

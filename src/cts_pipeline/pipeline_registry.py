"""Project pipelines, built from the ``grid`` and ``cts`` parameters of the active environment."""

from __future__ import annotations

import warnings

from kedro.pipeline import Pipeline

from . import active_config
from .grid import GridConfig, dense_branches
from .pipelines.cts.pipeline import create_pipeline as cts_pipeline
from .pipelines.data_processing.pipeline import create_pipeline as data_pipeline
from .pipelines.dense.pipeline import create_pipeline as dense_pipeline
from .pipelines.reporting.pipeline import create_pipeline as report_pipeline


def register_pipelines() -> dict[str, Pipeline]:
    # Branches read datasets of other namespaces on purpose (each CTS branch reads its seed's
    # dense.seed<N>.theta_rewind; the report reads every branch's metrics). Kedro warns about
    # dotted names crossing top-level namespaces; here that is the design, not a slip.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="One or more dataset names contain '.' characters")
        return _build()


def _build() -> dict[str, Pipeline]:
    params = active_config.parameters()
    grid = GridConfig.from_params(params)
    dense = dense_pipeline(grid)
    cts, cts_metrics = cts_pipeline(grid, params.get("cts") or {})
    dense_metrics = [f"{b.namespace}.metrics" for b in dense_branches(grid)]
    main = data_pipeline() + dense + cts + report_pipeline("cts", dense_metrics + cts_metrics)
    return {"cts": main, "__default__": main}

from collections.abc import Mapping

from kedro.pipeline import Pipeline, node

from ...core.data.tables import NAME as CATALOG
from .nodes import prepare_catalog_data, prepare_data


def create_pipeline(data: Mapping | None = None) -> Pipeline:
    """The data node; with ``data.name: catalog`` it reads the catalog entries ``data.train`` and
    ``data.test`` as its inputs (Kedro loads them, so any dataset type the catalog knows will do)."""
    data = data or {}
    if data.get("name") == CATALOG and data.get("train") and data.get("test"):
        prepared = node(prepare_catalog_data, ["params:data", data["train"], data["test"]],
                        ["train_data", "test_data"], name="prepare_data")
    else:
        prepared = node(prepare_data, "params:data", ["train_data", "test_data"], name="prepare_data")
    return Pipeline([prepared], tags="data")

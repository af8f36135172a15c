"""Checks at run start, and node errors marked and told (the file behind a refused artifact)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl

from ...config.typed import ConfigError
from ...config.validate import validate_run
from ...errors import mark_failed_node
from ...pipelines.common import ArtifactMismatch
from .catalog import artifact_path


class RunValidationHook:
    """Check the whole configuration once, before the first node and before tracking starts; mark
    an error a node raises as the node's (``errors.exit_code``: exit 1, not 2), in the process
    that ran it."""

    def __init__(self) -> None:
        self.running: list[str] = []  # the nodes started and not yet ended, in this process
        self.data_root = "data"  # globals.yml's data_root

    @hook_impl
    def after_context_created(self, context) -> None:
        try:
            self.data_root = str(context.config_loader["globals"].get("data_root", "data"))
        except (KeyError, MissingConfigException):
            self.data_root = "data"

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self.running = []
        validate_run(catalog.load("parameters"), run_params.get("pipeline_names"), load=catalog.load)
        check_writable(self.data_root)

    @hook_impl
    def before_node_run(self, node) -> None:
        self.running.append(node.name)

    @hook_impl
    def after_node_run(self, node) -> None:
        if node.name in self.running:
            self.running.remove(node.name)

    @hook_impl(tryfirst=True)
    def on_node_error(self, error: Exception, node) -> None:
        mark_failed_node(error, node.name)
        self.after_node_run(node)

    def on_interrupt(self) -> list[str]:
        return list(self.running)


def check_writable(data_root: str) -> None:
    """Refuse, before any compute, a local data folder that cannot take the run's artifacts (a
    file in its place, no permission, a read-only mount): otherwise the first save fails after
    the first training. fsspec URLs (``s3://…``) are left to their store."""
    import tempfile

    if "://" in data_root:
        return
    folder = Path(data_root)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"the data folder {folder.resolve()} (globals.yml data_root) cannot be written: "
                          f"{exc.strerror or exc}; make it writable or point data_root elsewhere") from None


class ArtifactPathHook:
    """Name the file behind an artifact a node refused (``common.ArtifactMismatch``)."""

    @hook_impl
    def on_node_error(self, error: Exception, catalog) -> None:
        if isinstance(error, ArtifactMismatch):
            error.add_note(f"file: {artifact_path(catalog, error.dataset)}")

"""What the hooks read from the catalog: which datasets are results, their files, and fresh loads."""

from __future__ import annotations

from typing import Any

RESULT_TABLE_SUFFIX = "_results_table"


def is_result(dataset_name: str, node) -> bool:
    """A branch's (or the dense run's) metrics: what becomes a child run."""
    return "metrics" in node.tags and dataset_name.endswith(".metrics")


def load_fresh(catalog, name: str) -> Any:
    """``name`` as saved by whichever process ran its node: a versioned dataset caches the version
    it last resolved, which is stale when another process saved a newer one."""
    catalog.release(name)
    return catalog.load(name)


def artifact_path(catalog, name: str) -> str:
    """Where ``name``'s data were read from: the version folder's file for a versioned dataset."""
    dataset = catalog.get(name, fallback_to_runtime_pattern=True)
    for where in ("_get_load_path", "_get_save_path"):
        try:
            return str(getattr(dataset, where)())
        except Exception:
            continue
    return str(getattr(dataset, "_filepath", name))


def shown_path(catalog, name: str) -> str:
    """:func:`artifact_path` relative to the working directory when under it (a terminal line)."""
    from pathlib import Path

    path = artifact_path(catalog, name)
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except (ValueError, OSError):
        return path

"""Each artifact's record of itself, so that ``--only-missing-outputs`` can tell a file it may
skip from one it must recompute.

Every file the project's datasets write gets a sidecar ``<file>.record.json`` with its SHA-256, its
size and when it was written. A file that no longer matches its record was truncated or replaced
after it was written; a file without one was not written by this project. At run start
``hooks.FreshnessHook`` flags such artifacts, and those older than an input, as stale
(:meth:`RecordedArtifact.mark_stale`): they then count as missing, so Kedro's own
``--only-missing-outputs`` filter recomputes them.

Kedro keeps no digests of its own (its versioning is by timestamp only), hence this module.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec
from kedro.io.core import get_filepath_str

from ..core.artifacts.records import RECORD_SUFFIX, payload_mismatch, record_for

__all__ = ["RECORD_SUFFIX", "NO_RECORD", "RecordedArtifact", "check_file", "payload_mismatch", "read_record",
           "record_for"]

def read_record(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    try:
        with fs.open(f"{path}{RECORD_SUFFIX}", "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None


NO_RECORD = "it has no record: it was not written by this project (or by an older version of it)"


def check_file(fs: fsspec.AbstractFileSystem, path: str) -> tuple[dict[str, Any] | None, str | None]:
    """The file's record, and why the file at ``path`` cannot be trusted as this project wrote it
    (``NO_RECORD`` when it has no record), or None."""
    record = read_record(fs, path)
    if record is None:
        return None, NO_RECORD
    with fs.open(path, "rb") as f:
        return record, payload_mismatch(f.read(), record)


class RecordedArtifact:
    """Mixin for the project's datasets: ``exists()`` is False while the artifact is flagged stale,
    until some process rewrites it (its record then changes). The flag travels with the dataset
    when a runner pickles the catalog to its workers."""

    _stale_record: dict[str, Any] | None = None

    def load_path(self) -> str:
        return get_filepath_str(self._get_load_path(), self._protocol)

    def mark_stale(self) -> None:
        self._stale_record = read_record(self._fs, self.load_path()) or {}

    def refresh_if_stale(self) -> None:
        if self._stale_record is not None:
            self._release()  # another process may have written a newer version since

    def not_stale(self) -> bool:
        return self._stale_record is None or (read_record(self._fs, self.load_path()) or {}) != self._stale_record

    def _exists(self) -> bool:
        self.refresh_if_stale()
        return super()._exists() and self.not_stale()

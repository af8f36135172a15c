"""An artifact's record of itself: ``<file>.record.json`` with the file's SHA-256, its size and
when it was written. The project's datasets write one beside every file (``datasets/_atomic.py``)
and check it on load and under ``--only-missing-outputs`` (``datasets/_records.py``);
``load_ticket`` checks it too, without Kedro."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

RECORD_SUFFIX = ".record.json"


def record_for(payload: bytes) -> bytes:
    record = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload), "written_at": time.time()}
    return json.dumps(record).encode()


def payload_mismatch(payload: bytes, record: dict[str, Any]) -> str | None:
    """Why ``payload`` is not what its record says was written, or None."""
    if len(payload) != record.get("bytes"):
        return f"it holds {len(payload)} bytes where {record.get('bytes')} were written (truncated or replaced)"
    if hashlib.sha256(payload).hexdigest() != record.get("sha256"):
        return "its contents changed after it was written (replaced)"
    return None

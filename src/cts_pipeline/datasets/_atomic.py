"""Write a file whole or not at all, and its record (``_records.py``) after it.

A run killed mid-save must not leave a truncated checkpoint under the name a later run loads
(with versioning, the newest version folder is what loads). So bytes go to a temporary sibling
first and are renamed into place, which is atomic on a local filesystem; object stores write
whole objects anyway.
"""

from __future__ import annotations

import errno
import uuid

import fsspec

from ._records import RECORD_SUFFIX, record_for


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, payload: bytes) -> None:
    # A run killed between the two writes leaves a file without a record: recomputed, never trusted.
    _write_whole(fs, path, payload)
    _write_whole(fs, f"{path}{RECORD_SUFFIX}", record_for(payload))


def _write_whole(fs: fsspec.AbstractFileSystem, path: str, payload: bytes) -> None:
    partial = f"{path}.partial-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(partial, "wb") as f:
            f.write(payload)
        fs.mv(partial, path)
    except BaseException as exc:
        if fs.exists(partial):
            fs.rm(partial)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on the device holding {path} "
                                        f"({len(payload)} bytes to write); nothing was written") from exc
        raise

"""Write a file whole or not at all, together with its record (``_records.py``).

A run killed mid-save must not leave a truncated checkpoint under the name a later run loads
(with versioning, the newest version folder is what loads). So the bytes and the record go to
temporary siblings first and are renamed into place, the record last; a rename is atomic on a
local filesystem and needs no space, so a full disk leaves neither under its final name (object
stores write whole objects anyway).
"""

from __future__ import annotations

import errno
import uuid

import fsspec

from ._records import RECORD_SUFFIX, record_for


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, payload: bytes) -> None:
    # A run killed between the two renames leaves a file without a record: recomputed, never trusted.
    record = f"{path}{RECORD_SUFFIX}"
    partials = {final: f"{final}.partial-{uuid.uuid4().hex[:8]}" for final in (path, record)}
    try:
        for final, data in ((path, payload), (record, record_for(payload))):
            with fs.open(partials[final], "wb") as f:
                f.write(data)
        fs.mv(partials[path], path)
        try:
            fs.mv(partials[record], record)
        except BaseException:
            fs.rm(path)  # never a file under its final name without its record
            raise
    except BaseException as exc:
        for partial in partials.values():
            if fs.exists(partial):
                fs.rm(partial)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on the device holding {path} "
                                        f"({len(payload)} bytes to write); nothing was written") from exc
        raise

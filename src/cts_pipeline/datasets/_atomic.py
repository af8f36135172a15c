"""Write a file whole or not at all.

A run killed mid-save must not leave a truncated checkpoint under the name a later run loads
(with versioning, the newest version folder is what loads). So bytes go to a temporary sibling
first and are renamed into place, which is atomic on a local filesystem; object stores write
whole objects anyway.
"""

from __future__ import annotations

import errno
import uuid

import fsspec


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, payload: bytes) -> None:
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

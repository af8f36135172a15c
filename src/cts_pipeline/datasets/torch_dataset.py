"""``TorchDataset``: tensors and plain containers of them (state dicts, masks) via ``torch.save``."""

from __future__ import annotations

import io
from copy import deepcopy
from pathlib import PurePosixPath
from typing import Any

import fsspec
import torch
from kedro.io.core import (
    AbstractVersionedDataset,
    DatasetError,
    Version,
    get_filepath_str,
    get_protocol_and_path,
)

from ._atomic import atomic_write
from ._records import RecordedArtifact, payload_mismatch, read_record


class TorchDataset(RecordedArtifact, AbstractVersionedDataset[Any, Any]):
    """Save with ``torch.save``; load with ``torch.load(weights_only=True)`` onto the CPU.

    ``weights_only`` means a file can hold tensors, dicts, lists, strings and numbers but never
    code, so loading a file from elsewhere cannot execute anything. Saves are atomic.

    Example catalog entry::

        "{method}.{seed}.{sparsity}.mask":
          type: cts_pipeline.datasets.TorchDataset
          filepath: data/07_model_output/{method}/{seed}/{sparsity}/mask.pt
          versioned: true
    """

    def __init__(
        self,
        *,
        filepath: str,
        version: Version | None = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        protocol, path = get_protocol_and_path(filepath, version)
        fs_args = deepcopy(fs_args) or {}
        if protocol == "file":
            fs_args.setdefault("auto_mkdir", True)
        self._protocol = protocol
        self._fs = fsspec.filesystem(protocol, **(credentials or {}), **fs_args)
        self.metadata = metadata
        super().__init__(
            filepath=PurePosixPath(path),
            version=version,
            exists_function=self._fs.exists,
            glob_function=self._fs.glob,
        )

    def load(self) -> Any:
        path = get_filepath_str(self._get_load_path(), self._protocol)
        payload = self.read_checked(path)
        try:
            return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated zip, wrong format, disallowed object...
            raise DatasetError(
                f"{path} is corrupted or not a torch file ({type(exc).__name__}: {exc}). "
                "Delete it (or its version folder) and rerun the branch that writes it."
            ) from exc

    def read_checked(self, path: str) -> bytes:
        """The file's bytes, refused when they are not what its record says was written."""
        with self._fs.open(path, "rb") as f:
            payload = f.read()
        record = read_record(self._fs, path)
        problem = payload_mismatch(payload, record) if record is not None else None
        if problem:
            raise DatasetError(f"{path}: {problem}. Delete its version folder and rerun the branch that "
                               "writes it (`kedro run --only-missing-outputs` does)")
        return payload

    def save(self, data: Any) -> None:
        buffer = io.BytesIO()
        torch.save(data, buffer)
        path = get_filepath_str(self._get_save_path(), self._protocol)
        atomic_write(self._fs, path, buffer.getvalue())
        self._fs.invalidate_cache(path)

    def _exists(self) -> bool:  # RecordedArtifact's, for a base without an _exists of its own
        self.refresh_if_stale()
        try:
            path = get_filepath_str(self._get_load_path(), self._protocol)
        except DatasetError:
            return False
        return self._fs.exists(path) and self.not_stale()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "protocol": self._protocol, "version": self._version}

    def _release(self) -> None:
        super()._release()
        self._fs.invalidate_cache(get_filepath_str(self._filepath, self._protocol))

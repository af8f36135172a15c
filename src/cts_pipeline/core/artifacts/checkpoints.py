"""Per-epoch checkpoints of long loops (training, search), written whole or not at all.

A checkpoint is a plain ``torch.save`` payload tagged with a ``key`` (the caller's digest of
everything that determines the result: configuration, start weights, mask, seed). A loop resumes
only from a checkpoint with its own key, so a stale file from another configuration is never
picked up. The file is removed once the loop finishes: its result is then the caller's to keep.
A caller that must first store that result safely (a pipeline node, whose outputs are written
after it returns) defers the removal with :class:`PendingRemovals`: started before the loop,
removed once the result is stored, or kept if storing failed, so a rerun resumes instead of
starting over.
"""

from __future__ import annotations

import contextvars
import errno
import io
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FORMAT = "cts-pipeline/checkpoint-v1"


# `auto` keeps the time spent writing checkpoints at or under this share of the loop's time.
AUTO_CHECKPOINT_SHARE = 0.05


def parse_interval(every: int | str) -> tuple[str, float]:
    """``runtime.checkpoint_every`` as (kind, amount): ``N`` epochs, ``"Ns"`` / ``"Nmin"`` of
    wall-clock, or ``"auto"`` (a checkpoint whenever writing it costs at most 5 % of the training
    time since the last one: every epoch where that is cheap, further apart where it is not)."""
    if isinstance(every, int) and not isinstance(every, bool) and every >= 1:
        return "epochs", float(every)
    if every == "auto":
        return "auto", AUTO_CHECKPOINT_SHARE
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|min)\s*", every) if isinstance(every, str) else None
    if match is None or float(match[1]) <= 0:
        raise ValueError(f"runtime.checkpoint_every must be a number of epochs (1, 2, ...), a time such as "
                         f"'600s' or '10min', or 'auto'; got {every!r}")
    return "seconds", float(match[1]) * (60.0 if match[2] == "min" else 1.0)


class Checkpoint:
    """One loop's checkpoint file at ``path``, valid only for ``key``, written at the interval
    ``every`` asks for (:func:`parse_interval`; after every epoch by default).

    With ``background`` (the GPU's choice, ``pipelines.common.checkpoint_for``), :meth:`save`
    copies the state to the CPU, which is all the loop waits for, and a writer thread serialises
    and writes it while the next epoch runs: a VGG-16 search's 1.2 GB no longer stalls the GPU.
    One write is in flight at a time (the next save waits for it), a failed write is raised by the
    next save or by :meth:`finish`, and the file still appears whole or not at all.
    """

    def __init__(self, path: str | Path, key: str, every: int | str = 1, background: bool = False):
        self.path = Path(path)
        self.key = key
        self.kind, self.amount = parse_interval(every)
        self.background = background
        self._epochs_since = 0
        self._seconds_since = 0.0  # the loop's wall-clock since the last save
        self._save_seconds: float | None = None  # what the last save took
        self._writer: threading.Thread | None = None
        self._write_error: BaseException | None = None

    def due(self, epoch_seconds: float) -> bool:
        """After an epoch that took ``epoch_seconds``: is a checkpoint due now?"""
        self._epochs_since += 1
        self._seconds_since += epoch_seconds
        if self.kind == "epochs":
            return self._epochs_since >= self.amount
        if self.kind == "seconds":
            return self._seconds_since >= self.amount
        return self._save_seconds is None or self._save_seconds <= self.amount * self._seconds_since

    def load(self) -> dict | None:
        """The saved state, or None when there is none for this key (a mismatch is logged). In a
        process group, rank 0 reads the file and every rank resumes from what it read: rank 0
        alone writes checkpoints, and the other ranks (on other machines, under ``torchrun``)
        may not see its disk."""
        from ..device.distributed import broadcast_object, rank_and_world

        return broadcast_object(self._read() if rank_and_world()[0] == 0 else None)

    def _read(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupted file cannot be resumed from; start over
            logger.warning("ignoring unreadable checkpoint %s (%s); starting from the beginning", self.path, exc)
            return None
        if state.get("format") != FORMAT or state.get("key") != self.key:
            logger.warning("ignoring checkpoint %s: it belongs to another configuration", self.path)
            return None
        return state

    def save(self, state: Mapping[str, Any]) -> None:
        started = time.perf_counter()
        if not self.background:
            self._write(state)
            self._save_seconds = time.perf_counter() - started
        else:
            self.wait()  # one write in flight; raises what the previous one met
            # The loop goes on changing its tensors: what is written is a copy taken now.
            snapshot = _on_cpu({**state})
            self._save_seconds = time.perf_counter() - started  # what the loop waited for
            self._writer = threading.Thread(target=self._write_in_background, args=(snapshot,),
                                            name=f"checkpoint {self.path.name}")
            self._writer.start()
        self._epochs_since, self._seconds_since = 0, 0.0

    def wait(self) -> None:
        """Until the write in flight (if any) is done; raises the error it met."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._write_error is not None:
            error, self._write_error = self._write_error, None
            raise error

    def _write_in_background(self, state: Mapping[str, Any]) -> None:
        try:
            self._write(state)
        except BaseException as exc:  # handed to the loop's thread by wait()
            self._write_error = exc

    def _write(self, state: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f"{self.path.name}.partial-{uuid.uuid4().hex[:8]}")
        # Serialised in memory first: torch.save straight to a full disk fails with an opaque
        # "unexpected pos" error, a plain write with ENOSPC.
        buffer = io.BytesIO()
        torch.save({**state, "format": FORMAT, "key": self.key}, buffer)
        try:
            partial.write_bytes(buffer.getbuffer())
            os.replace(partial, self.path)  # atomic: the old checkpoint or the new one, never half
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise OSError(errno.ENOSPC, f"no space left on the device holding the checkpoint {self.path} "
                                            f"({buffer.getbuffer().nbytes} bytes); the previous epoch's "
                                            "checkpoint is kept") from exc
            raise
        finally:
            partial.unlink(missing_ok=True)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def finish(self) -> None:
        """The loop is done: remove the file now, or once the caller has stored the result (a
        write in flight is waited for first, so it cannot land after the removal)."""
        self.wait()
        PendingRemovals.defer_or_remove([self.path])


def _on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it copied to the CPU (nested dicts, lists and tuples)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_on_cpu(v) for v in value)
    return value


class PendingRemovals:
    """Checkpoints of loops that finished while their caller still has to store the results.

    Whoever owns a node's lifetime (``CheckpointHook``, the Dask worker, a rank of a distributed
    node) calls :meth:`start` before the node runs; every loop that finishes on this thread (this
    context) then hands its checkpoint here instead of removing it. Once the results are stored,
    :meth:`remove`; if storing failed, :meth:`keep`, so a rerun resumes; to hand them to another
    process, :meth:`take`. After any of those, a loop that still finishes removes its own file.

    The loops reach it through a context variable, not an argument: they are called from Kedro
    nodes, whose signatures are their datasets, and the hook that owns the node's lifetime has no
    other way in. Each thread (and each process) has its own.
    """

    def __init__(self) -> None:
        self._paths: list[Path] = []
        self._open = True

    @classmethod
    def start(cls) -> PendingRemovals:
        """A new set for this thread's loops from now on."""
        pending = cls()
        _current_removals.set(pending)
        return pending

    @staticmethod
    def defer_or_remove(paths: list[Path]) -> None:
        """Finished loops' checkpoints: to this thread's set, or removed now if there is none."""
        pending = _current_removals.get()
        if pending is not None:
            pending.add(paths)
        else:
            for path in paths:
                Path(path).unlink(missing_ok=True)

    def add(self, paths: list[Path]) -> None:
        """Finished loops' checkpoints: kept until :meth:`remove`, or removed now if the set is closed."""
        if self._open:
            self._paths.extend(Path(p) for p in paths)
        else:
            for path in paths:
                Path(path).unlink(missing_ok=True)

    def remove(self) -> None:
        """The results are stored: remove the checkpoints."""
        for path in self._paths:
            path.unlink(missing_ok=True)
        self._close()

    def keep(self) -> None:
        """Storing the results failed: keep the checkpoints for the rerun to resume from."""
        self._close()

    def take(self) -> list[Path]:
        """The checkpoints, handed to another process to remove (a rank of a multi-process
        training gives them to the driver, which stores the results)."""
        paths = list(self._paths)
        self._close()
        return paths

    def _close(self) -> None:
        self._paths = []
        self._open = False


_current_removals: contextvars.ContextVar[PendingRemovals | None] = contextvars.ContextVar(
    "pending_checkpoint_removals", default=None)

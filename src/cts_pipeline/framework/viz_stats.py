"""kedro-viz's run statistics, kept per preset.

kedro-viz's own hooks write the last run's dataset statistics (``.viz/stats.json``: rows, size)
and node events (``.viz/kedro_pipeline_events.json``: the workflow view's "Skipped", "Success")
to one place in the project, whatever the preset, and ``kedro viz`` shows them for every preset:
after a smoke run, the default preset's results table read "3 rows" and its nodes "Skipped".
So each run's files are also kept under ``.viz/presets/<preset>/``, and opening a project for a
preset (``kedro viz run --env=<env>`` opens one) puts that preset's files back in place, or
removes another preset's.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

VIZ_FILES = ("stats.json", "kedro_pipeline_events.json")  # what kedro-viz writes and reads
KEPT = Path(".viz") / "presets"
SHOWN = Path(".viz") / "shown_preset.json"  # which preset's files are in .viz/ now


def keep(project_path: Path, preset: str, run: str) -> None:
    """Copy kedro-viz's files of the run that just ended to ``.viz/presets/<preset>/``."""
    _optional(_keep, Path(project_path), preset, run)


def show(project_path: Path, preset: str) -> None:
    """Put ``preset``'s kept files where kedro-viz reads them; when it has none, take another
    preset's out (they stay kept under their own preset)."""
    _optional(_show, Path(project_path), preset)


def _optional(step, *args) -> None:
    """kedro-viz's view is optional: a file fault costs one warning, never the run (``show`` runs
    whenever a context is created, before any work)."""
    try:
        step(*args)
    except OSError as exc:
        logger.warning("kedro-viz statistics per preset: %s (the run goes on; kedro-viz may show "
                       "another preset's statistics)", exc)


def _keep(project: Path, preset: str, run: str) -> None:
    viz, kept = project / ".viz", project / KEPT / preset
    found = [name for name in VIZ_FILES if (viz / name).exists()]
    if not found:
        return
    kept.mkdir(parents=True, exist_ok=True)
    for name in found:
        _write(kept / name, (viz / name).read_bytes())
    label = json.dumps({"preset": preset, "run": run, "saved_at": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
    _write(kept / "label.json", label)
    _write(project / SHOWN, label)


def _show(project: Path, preset: str) -> None:
    viz, kept = project / ".viz", project / KEPT / preset
    if not viz.is_dir() or _read(project / SHOWN).get("preset") == preset:
        return
    for name in VIZ_FILES:
        if (kept / name).exists():
            _write(viz / name, (kept / name).read_bytes())
        elif (viz / name).exists():
            (viz / name).unlink()
    _write(project / SHOWN, json.dumps({"preset": preset, **_read(kept / "label.json")}).encode())


def _write(path: Path, data: bytes) -> None:
    """Whole or not at all: kedro-viz (or a run) may read ``path`` meanwhile. (Not the catalog's
    ``atomic_write``: these files are kedro-viz's and carry no record.)"""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}

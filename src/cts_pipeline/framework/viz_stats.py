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
import os
import shutil
import time
from pathlib import Path

VIZ_FILES = ("stats.json", "kedro_pipeline_events.json")  # what kedro-viz writes and reads
KEPT = Path(".viz") / "presets"
SHOWN = Path(".viz") / "shown_preset.json"  # which preset's files are in .viz/ now


def keep(project_path: Path, preset: str, run: str) -> None:
    """Copy kedro-viz's files of the run that just ended to ``.viz/presets/<preset>/``."""
    viz = Path(project_path) / ".viz"
    kept = Path(project_path) / KEPT / preset
    found = [name for name in VIZ_FILES if (viz / name).exists()]
    if not found:
        return
    kept.mkdir(parents=True, exist_ok=True)
    for name in found:
        _replace(viz / name, kept / name)
    label = json.dumps({"preset": preset, "run": run, "saved_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    _write(kept / "label.json", label)
    _write(Path(project_path) / SHOWN, label)


def show(project_path: Path, preset: str) -> None:
    """Put ``preset``'s kept files where kedro-viz reads them; when it has none, take another
    preset's out (they stay kept under their own preset)."""
    viz = Path(project_path) / ".viz"
    if not viz.is_dir():
        return
    if _read(Path(project_path) / SHOWN).get("preset") == preset:
        return
    kept = Path(project_path) / KEPT / preset
    for name in VIZ_FILES:
        if (kept / name).exists():
            _replace(kept / name, viz / name)
        elif (viz / name).exists():
            (viz / name).unlink()
    _write(Path(project_path) / SHOWN, json.dumps({"preset": preset, **_read(kept / "label.json")}))


def _replace(source: Path, target: Path) -> None:
    """A whole copy or none: kedro-viz (or a run) may read ``target`` meanwhile."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)


def _write(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}

"""Where a run came from: its Kedro session, its preset and the code's commit.

Shared by the MLflow tags (``framework/tracking.py``) and the results table's ``run``, ``preset``
and ``commit`` columns (``hooks/run_identity.py``), so a copied CSV and the MLflow run it came
from say the same thing.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

DEFAULT_ENV = "local"  # Kedro's default run environment: the default preset


def preset_name(config_loader, env: str | None) -> str:
    """The preset's name as its artifacts' folder says it (``globals.experiment``: ``default``
    for the default run, ``smoke``, ``cifar10_resnet20``), else the Kedro env."""
    try:
        name = config_loader["globals"].get("experiment")
    except Exception:  # no globals in a bare configuration
        name = None
    return str(name or env or DEFAULT_ENV)


def git_state(project_path: Path) -> tuple[str, bool] | None:
    """The checkout's commit and whether tracked files have uncommitted changes; ``None`` outside
    a git checkout (an installed package, an exported folder)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_path, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project_path,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit, bool(dirty)


def run_identity(run_params: dict, project_path: Path, preset: str) -> dict[str, str]:
    """What tells one run's results from another's once the files are copied: the Kedro session
    id (also the version folder of every artifact it saved, and the MLflow parent's tag
    ``kedro.session_id``), the preset (:func:`preset_name`) and the commit (``+dirty`` with local changes)."""
    state = git_state(project_path)
    commit = "not a git checkout" if state is None else state[0][:12] + ("+dirty" if state[1] else "")
    return {"run": str(run_params.get("run_id") or ""),
            "preset": preset, "commit": commit}

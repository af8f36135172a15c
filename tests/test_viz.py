"""`kedro viz build` renders the project: one branch per seed and sparsity in the static site."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_kedro_viz_build_shows_every_branch(project):
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"}
    done = subprocess.run([sys.executable, "-m", "kedro", "viz", "build"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (project / "build" / "index.html").exists()
    graph = json.loads((project / "build" / "api" / "main").read_text())
    branches = {f"cts_kl.seed0.{sp}" for sp in ("sp89_26", "sp95_60", "sp98_20", "sp99_26", "sp99_53")}
    assert set(graph["modular_pipelines"]) == {"__root__", "dense", "dense.seed0", "cts_kl", "cts_kl.seed0"} | branches

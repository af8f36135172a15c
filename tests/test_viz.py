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
    sparsities = ("sp89_26", "sp95_60", "sp98_20", "sp99_26", "sp99_53")
    methods = ("cts_kl", "ltr", "snip", "grasp", "synflow", "magnitude", "random")
    branches = {f"{m}.seed0.{sp}" for m in methods for sp in sparsities}
    checks = {f"{m}.seed0.sp99_26" for m in ("cts_kl_shuffled", "cts_kl_inverted", "snip_reinit")}
    shown = set(graph["modular_pipelines"])
    assert branches | checks | {"dense.seed0", "ltr.seed0"} <= shown, sorted(branches - shown)

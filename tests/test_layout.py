"""The house by stage: core/ in folders that import only the stages below them, each saying in
one line what lives there, and loops short enough to read as the algorithm."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "src" / "cts_pipeline" / "core"
# Bottom to top: a stage imports from the stages before it, never from one after it.
STAGES = ["device", "artifacts", "data", "nets", "train", "cts", "prune"]
PEERS = {frozenset({"cts", "prune"})}  # the top two stand side by side and import neither way
LONGEST_FUNCTION = 80


def _modules():
    return sorted(p for p in CORE.rglob("*.py"))


def _imported_stages(path: Path) -> set[str]:
    """The core stages a module imports, from its relative and absolute imports."""
    stage = path.relative_to(CORE).parts[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:  # relative: resolve against the module's own folder
            parts = list(path.relative_to(CORE).parent.parts)
            parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
            target = parts + (node.module.split(".") if node.module else [])
        elif node.module and node.module.startswith("cts_pipeline.core."):
            target = node.module.split(".")[2:]
        else:
            continue
        if target and target[0] in STAGES and target[0] != stage:
            found.add(target[0])
    return found


def test_every_core_module_lives_in_a_stage_folder_that_says_what_it_holds():
    loose = [p.name for p in CORE.glob("*.py") if p.name != "__init__.py"]
    assert loose == [], f"modules outside a stage folder: {loose}"
    assert sorted(p.name for p in CORE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(STAGES)
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((CORE / stage / "__init__.py").read_text()))
        assert doc, f"core/{stage}/__init__.py says nothing of what lives there"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(CORE)))
def test_a_stage_imports_only_the_stages_below_it(path):
    stage = path.relative_to(CORE).parts[0]
    if stage not in STAGES:
        return  # core/__init__.py
    upward = sorted(other for other in _imported_stages(path)
                    if STAGES.index(other) > STAGES.index(stage) or frozenset({stage, other}) in PEERS)
    assert upward == [], f"{path.relative_to(CORE)} imports from a stage above it or beside it: {upward}"


def test_no_function_in_core_is_longer_than_the_algorithm_it_reads_as():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_FUNCTION:
                    long.append(f"{path.relative_to(CORE)}:{node.name} ({lines} lines)")
    assert long == [], f"functions over {LONGEST_FUNCTION} lines: {long}"

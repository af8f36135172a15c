"""Rewrite a marked block of a docs file with a benchmark's own output.

Docs tables are never edited by hand: each sits between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` and the benchmark that measured it rewrites it (``--write-docs``).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _block(relative_path: str, name: str) -> tuple[Path, str, re.Pattern]:
    path = ROOT / relative_path
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    content = path.read_text()
    pattern = re.compile(re.escape(begin) + r"\n?(.*?)\n?" + re.escape(end), re.S)
    if not pattern.search(content):
        raise SystemExit(f"{path} has no {begin} ... {end} block")
    return path, content, pattern


def read_block(relative_path: str, name: str) -> str:
    """The block's current text (what a partial re-measurement keeps)."""
    _, content, pattern = _block(relative_path, name)
    return pattern.search(content).group(1)


def replace_block(relative_path: str, name: str, text: str) -> None:
    path, content, pattern = _block(relative_path, name)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    path.write_text(pattern.sub(lambda _: f"{begin}\n{text}\n{end}", content))

"""Rewrite a marked block of a docs file with a benchmark's own output.

Docs tables are never edited by hand: each sits between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` and the benchmark that measured it rewrites it (``--write-docs``).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The last line of a table that its benchmark is still writing. The GPU parts rewrite their block
# after each measured line, so a part that its time limit in gpu.sh (or an error) stops keeps what
# it measured, and says that it stopped; the finished run writes the table without it.
PARTIAL = ("*Partial: the run that wrote this table stopped before it measured the rest (a part's time "
           "limit in `benchmarks/gpu.sh`, an error or an interrupt; its log says which).*")


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


def replace_block(relative_path: str, name: str, text: str, *, partial: bool = False) -> None:
    """Rewrite the block with ``text`` (and the :data:`PARTIAL` line when ``partial``). The file is
    replaced whole, so a benchmark killed at its time limit mid-write leaves the old file or the new
    one, never half of it."""
    path, content, pattern = _block(relative_path, name)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = f"{text}\n\n{PARTIAL}" if partial else text
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(pattern.sub(lambda _: f"{begin}\n{text}\n{end}", content))
        os.chmod(temporary, path.stat().st_mode & 0o777)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class BlockWriter:
    """The lines of one docs block, printed as they come and, with ``to_docs``, written after each
    one (marked :data:`PARTIAL` until :meth:`finish`): what a stopped benchmark measured is kept."""

    def __init__(self, relative_path: str, name: str, to_docs: bool) -> None:
        self.relative_path, self.name, self.to_docs = relative_path, name, to_docs
        self.lines: list[str] = []
        if to_docs:
            _block(relative_path, name)  # a missing block fails now, not after the measurements

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)
        print("\n".join(lines), flush=True)
        if self.to_docs:
            replace_block(self.relative_path, self.name, "\n".join(self.lines), partial=True)

    def finish(self) -> None:
        if self.to_docs:
            replace_block(self.relative_path, self.name, "\n".join(self.lines))

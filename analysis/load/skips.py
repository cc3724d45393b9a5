"""Skip records: a file or a line the analysis left out, and why (logged once, counted in
summary.md). A leaf module, so that every reader (runs, benchmark rows, transfer rows) records
skips the same way."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("analysis")


@dataclass
class Skipped:
    """A file (or line: ``path`` is ``file:line`` and ``line`` its number) left out, and why."""

    path: str
    reason: str
    line: int | None = None


def skip(skipped: list[Skipped], path, reason, line: int | None = None) -> None:
    """Record and log a skipped file, or line `line` of file `path`."""
    where = str(path) if line is None else f"{path}:{line}"
    reason = str(reason).replace("\n", "\\n")  # one line per skipped item, always
    log.warning("skipping %s: %s", where, reason)
    skipped.append(Skipped(where, reason, line))


def read_error(path, e: Exception) -> str:
    """The message of a read error without the path that the caller already names."""
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text ({e})"
    return str(e).removeprefix(f"{path}: ")


def count_skipped(skipped: list[Skipped]) -> tuple[int, int]:
    """(skipped files, skipped lines) of a list of Skipped."""
    lines = sum(s.line is not None for s in skipped)
    return len(skipped) - lines, lines

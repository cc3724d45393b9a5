"""The end of a JSON-lines results file, read from the end: what was last written, in time that
does not grow with the file. `reverse_rows` yields, newest first, the rows that read_rows would
keep (strict=False), in blocks of at most BLOCK bytes. Why this is the same as reading the
whole file: docs/results.md ("Reading the newest rows").
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from scaling.results import (
    METRICS_FILE,
    TRANSFER_FILE,
    SchemaError,
    validate_row,
    validate_transfer,
)

BLOCK = 1 << 20  # the largest read
FIRST_BLOCK = 1 << 12
_VALIDATORS = {METRICS_FILE: validate_row, TRANSFER_FILE: validate_transfer}


def reverse_lines(path: str | os.PathLike, block: int = BLOCK) -> Iterator[bytes]:
    """The non-empty lines of a file, last first (the last one even without its newline); read
    in blocks from FIRST_BLOCK bytes, doubling up to `block` (most callers want a few lines)."""
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        rest = b""  # the start of a line whose beginning is in an earlier block
        size = min(FIRST_BLOCK, block)
        while pos > 0:
            size = min(size, pos)
            pos -= size
            f.seek(pos)
            chunk = f.read(size) + rest
            lines = chunk.split(b"\n")
            rest = lines[0]  # may continue further back
            for line in reversed(lines[1:]):
                if line.strip():
                    yield line
            size = min(2 * size, block)
        if rest.strip():
            yield rest


def reverse_rows(path: str | os.PathLike, validate: Callable[[dict], dict] | None = None,
                 want: Callable[[bytes], bool] | None = None, block: int = BLOCK
                 ) -> Iterator[dict]:
    """Valid rows of a metrics or transfer file (by its name, or `validate`), newest first.
    `want(line)` (optional) is a cheap test on the raw bytes: lines it rejects are not parsed."""
    path = Path(path)
    validate = validate or _VALIDATORS[path.name]
    if not path.exists():
        return
    for line in reverse_lines(path, block):
        if want is not None and not want(line):
            continue
        try:
            yield validate(json.loads(line))
        except (ValueError, SchemaError, TypeError):  # JSONDecodeError and bad UTF-8 included
            continue


def rows_at_step(path: str | os.PathLike, step: int) -> list[dict]:
    """The rows logged at `step` among the last ones (rows after it are not expected: the file
    was truncated to a checkpoint at `step`), in file order; [] for no file or no such rows."""
    found: list[dict] = []
    for row in reverse_rows(path):
        if row["step"] < step:
            break
        if row["step"] == step:
            found.append(row)
    return found[::-1]

"""Writing a run's files: atomically (a reader never sees a torn file), and a full disk said in
one line naming the file (`DiskFull`) instead of an OSError traceback. The one atomic write of
the project (scaling.results re-exports it). Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO


class DiskFull(OSError):
    """A write failed for want of space (ENOSPC); str() is one line naming the file. An OSError
    with errno ENOSPC, so that handlers of OSError still catch it."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` is ENOSPC (by errno, or by its text where a library dropped the errno)."""
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error)


def disk_full_message(what: str) -> str:
    """The one wording of a full disk, `what` saying which write failed."""
    return f"no space left on device (ENOSPC) {what}"


@contextlib.contextmanager
def named_if_full(path: str | os.PathLike, what: str = "writing") -> Iterator[None]:
    """Run a block that writes `path`; ENOSPC in it becomes DiskFull("... writing PATH") (no
    chained traceback), any other error passes unchanged."""
    try:
        yield
    except OSError as e:
        if not is_disk_full(e):
            raise
        raise DiskFull(disk_full_message(f"{what} {path}")) from None


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """A file to write `path` through, so that readers see either the old content or the new,
    never a torn one: a temporary file beside it (``.NAME.tmpPID``), fsynced and renamed over
    it (os.replace) when the block ends without an error, removed when it raises. A full disk
    raises DiskFull naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with named_if_full(path):
            with open(tmp, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when the write failed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see either the old content or the new, never a torn one."""
    with atomic_open(path) as f:
        f.write(text)

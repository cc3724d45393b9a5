"""One process owns a run directory: `RunLock` (RUN_DIR/.run.lock, held by rank 0 of the run
or by the post-hoc evaluators while they append rows). The lock file's rules (why a file and
not flock, when a holder counts as dead, the heartbeat) are scaling.lockfile's.
"""

from __future__ import annotations

import os
from pathlib import Path

from scaling import lockfile
from scaling.writes import named_if_full

LOCK_FILE = ".run.lock"


class RunDirInUse(ValueError):
    """Another live process owns the run directory."""


class RunLock:
    """Exclusive ownership of a run dir by one process (rank 0 of the run), for its lifetime:
    RUN_DIR/.run.lock, a scaling.lockfile lock."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self.me = lockfile.identity()
        self._beat: lockfile.Heartbeat | None = None

    @property
    def lost(self) -> bool:
        """Someone took the lock over (it judged us dead: no heartbeat for STALE_AFTER_S)."""
        return self._beat is not None and self.path in self._beat.lost

    def acquire(self) -> RunLock:
        """Take the lock or raise RunDirInUse naming its live holder (DiskFull on a full disk)."""
        with named_if_full(self.path):
            holder = lockfile.acquire(self.path, self.me)
        if holder is not None:
            who = (f"in use by PID {holder['pid']} on {holder.get('host')} (since "
                   f"{holder.get('since')})" if "pid" in holder else "locked by a process that "
                   "is writing or retaking its lock")
            raise RunDirInUse(f"run dir {self.path.parent} {who}; if that process is gone, "
                              f"remove {self.path}")
        self._beat = lockfile.Heartbeat()
        self._beat.add(self.path, self.me["token"])
        return self

    def release(self) -> None:
        """Give the lock up (only if it is still ours)."""
        if self._beat is not None:
            self._beat.stop()
        lockfile.release(self.path, self.me["token"])

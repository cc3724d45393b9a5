"""Lock files that hold on shared file systems: the run dir's lock and the sweep's run claims.

A lock is a file created with link(2) from a complete temporary file (atomic on local file
systems, NFSv3+ and Lustre, where flock(2) may fail or be node-local), holding its holder's
`identity`; `is_stale` decides when a holder is dead, a `Heartbeat` keeps live locks fresh, and
a stale lock is broken under a second lock (PATH.break). Stdlib only. Why, and the staleness
rules: docs/failure-model.md ("The run-dir lock").
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

HEARTBEAT_S = 10.0  # a holder touches its locks this often ...
STALE_AFTER_S = 120.0  # ... so one untouched this long has no live holder (any host)


def pid_start(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (tells a reused pid apart); None when
    there is no such (non-zombie) process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def identity(**about) -> dict:
    """This process as a lock holder, plus `about` (what the lock is for)."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": pid_start(pid),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": uuid.uuid4().hex,
            **about}


def read_holder(path: Path) -> tuple[dict | None, float]:
    """(holder, mtime) of a lock file; holder None when there is none, {} when unreadable
    (then it is judged by its age alone)."""
    try:
        text, mtime = path.read_text(), path.stat().st_mtime
    except FileNotFoundError:
        return None, 0.0
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None
    return (holder if isinstance(holder, dict) else {}), mtime


def is_stale(holder: dict, mtime: float, me: dict | None = None) -> bool:
    """Whether the holder of a lock is surely dead (module doc)."""
    me = me or identity()
    if holder.get("host") == me["host"] and "pid" in holder:
        return pid_start(int(holder["pid"])) != holder.get("pid_start")
    if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]:
        return holder.get("slurm_restart") != me["slurm_restart"]
    return time.time() - mtime > STALE_AFTER_S


def acquire(path: Path, me: dict) -> dict | None:
    """Take the lock at `path` for `me`: None when it is now ours, else its live holder ({}
    when it kept being retaken while we broke stale ones)."""
    tmp = path.with_name(f"{path.name}.{me['token']}")
    try:  # the temporary file goes in every case, a write that failed half-way (ENOSPC) too
        tmp.write_text(json.dumps(me) + "\n")
        for _ in range(3):
            if _link(tmp, path):
                return None
            holder, mtime = read_holder(path)
            if holder is not None and not is_stale(holder, mtime, me):
                return holder
            if holder is not None:
                _break(path, holder)
        return read_holder(path)[0] or {}
    finally:
        tmp.unlink(missing_ok=True)


def release(path: Path, token: str) -> None:
    """Remove the lock if it is still the one with this token (never another's)."""
    if (read_holder(path)[0] or {}).get("token") == token:
        path.unlink(missing_ok=True)


def _link(tmp: Path, path: Path) -> bool:
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        # NFS: a retried link whose first try succeeded reports EEXIST; the link count tells
        return tmp.stat().st_nlink == 2


def _break(path: Path, seen: dict) -> None:
    """Remove a stale lock `seen`, under PATH.break (module doc)."""
    breaker = path.with_name(path.name + ".break")
    try:
        fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - breaker.stat().st_mtime > STALE_AFTER_S:
                breaker.unlink()  # its owner died while breaking (a window of microseconds)
        return
    try:
        if read_holder(path)[0] == seen:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)
        breaker.unlink(missing_ok=True)


class Heartbeat:
    """A daemon thread that touches held lock files every HEARTBEAT_S; a lock whose token
    changed (someone took it over, judging us dead) is dropped and listed in `lost`."""

    def __init__(self):
        self.held: dict[Path, str] = {}  # path -> our token
        self.lost: set[Path] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="lock-heartbeat", daemon=True).start()

    def add(self, path: Path, token: str) -> None:
        with self._lock:
            self.held[path] = token

    def discard(self, path: Path) -> str | None:
        """Stop touching `path`; returns our token for it (None if not held)."""
        with self._lock:
            return self.held.pop(path, None)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                held = list(self.held.items())
            for path, token in held:
                if (read_holder(path)[0] or {}).get("token") != token:
                    self.discard(path)
                    self.lost.add(path)
                    continue
                with contextlib.suppress(OSError):  # a transient error: the next beat retries
                    os.utime(path)

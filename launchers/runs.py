"""Run bookkeeping: RUN_DIR/job.json, whether a run's job is alive, its state and progress.

job.json is written under a file lock by the sweep and by rank 0 of the job; a run's state
(done / failed / diverged / queued / running / preempted / new) follows from final.json, the
live job or another sweep's claim (RUN_DIR/.claim). The job.json schema and what a rerun does in
each state: docs/sweeps.md ("Run ids and layout", "Idempotence: what a rerun does").
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import getpass
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Self

from scaling import lockfile
from scaling.lockfile import pid_start
from scaling.results import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    JOB_FILE,
    METRICS_FILE,
    SchemaError,
    read_final,
    read_json,
    write_json,
)
from scaling.tail import reverse_rows

DONE_STATES = {"ok": "done", "failed": "failed", "diverged": "diverged"}
# squeue states of a job that has ended (squeue keeps them for MinJobAge seconds)
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED"}
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED",
          "RESV_DEL_HOLD"}


def now() -> str:
    """ISO time, seconds."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Serialise read-modify-write of job.json between the sweep and the job's rank 0."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".job.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_job(run_dir: str | os.PathLike) -> dict | None:
    """RUN_DIR/job.json, or None when the run was never submitted."""
    path = Path(run_dir) / JOB_FILE
    return read_json(path) if path.exists() else None


def update_job(run_dir: str | os.PathLike, **changes) -> dict:
    """Merge `changes` into job.json under the lock; `attempt=` and `submission=` append to
    attempts / history, `attempt_end=` completes the last attempt."""
    run_dir = Path(run_dir)
    with _locked(run_dir):
        job = read_job(run_dir) or {}
        attempt, end = changes.pop("attempt", None), changes.pop("attempt_end", None)
        submission = changes.pop("submission", None)
        job.update(changes)
        if submission is not None:
            job.update(submission)
            job.setdefault("history", []).append(submission)
        if attempt is not None:
            job.setdefault("attempts", []).append(attempt)
        if end is not None and job.get("attempts"):
            job["attempts"][-1].update(end)
        write_json(run_dir / JOB_FILE, job)
    return job


def record_submission(run_dir: Path, spec_record: dict, sweep: str, cluster: str,
                      job_id: str | None, **extra) -> dict:
    """Note a new submission of a run in its job.json (earlier ones stay in `history`)."""
    entry = {"job_id": job_id, "cluster": cluster, "submitted": now(), **extra}
    return update_job(run_dir, **spec_record, sweep=sweep, submission=entry)


def squeue_states() -> dict[str, str]:
    """{job id: state} of this user's SLURM jobs, array elements one per line."""
    cmd = ["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        raise RuntimeError(f"cannot ask squeue which jobs are alive ({detail}); is SLURM up? "
                           "(launchers/local_slurm.sh starts a local one)") from None
    states = {}
    for line in out.splitlines():
        job_id, _, state = line.strip().partition("|")
        states[job_id] = state.split()[0] if state else "UNKNOWN"
    return states


def _pid_alive(pid: int, start: int | None) -> bool:
    """A process with this pid exists and (if given) started at this clock tick."""
    now_start = pid_start(pid)
    return now_start is not None and (start is None or now_start == start)


def job_liveness(job: dict | None, squeue: dict[str, str] | None) -> str | None:
    """'queued' / 'running' while the run's job is alive, None when it is not, 'unknown' when
    it is a SLURM job and `squeue` (from squeue_states) is None."""
    if not job or not job.get("job_id"):
        return None
    if job.get("cluster") == "local":
        if job.get("host") not in (None, socket.gethostname()):
            return "running"  # another host's processes: cannot check, so assume alive
        pids = job.get("pids", [])
        return "running" if any(_pid_alive(p, s) for p, s in pids) else None
    if squeue is None:
        return "unknown"  # SLURM did not answer: neither alive nor dead for sure
    state = squeue.get(str(job["job_id"]))
    if state is None or state in ENDED:
        return None
    return "queued" if state in QUEUED else "running"


def run_state(run_dir: Path, job: dict | None, squeue: dict[str, str] | None) -> str:
    """One of done, failed, diverged, queued, running, preempted, new (see module doc)."""
    try:
        final = read_final(run_dir)
    except SchemaError:
        return "failed"
    if final is not None:
        return DONE_STATES[final["status"]]
    live = job_liveness(job, squeue)
    if live:
        return live
    if claim_holder(run_dir) is not None:
        return "queued"  # another sweep is submitting it, or will start it (local)
    if job is None and not (run_dir / "config.json").exists():
        return "new"
    last = (job or {}).get("attempts", [{}])[-1] if (job or {}).get("attempts") else {}
    if last.get("exit") in (EXIT_FAILED, EXIT_BAD_INPUT):
        return "failed"
    return "preempted"


def progress(run_dir: Path, job: dict | None) -> tuple[int, int | None, float | None]:
    """(steps done, total steps or None, latest top-1 or None) from metrics.jsonl."""
    tail = read_progress(run_dir)
    return tail.steps, (job or {}).get("total_steps"), tail.top1


@dataclasses.dataclass
class Progress:
    """What the end of a metrics.jsonl tells: steps done, the latest top-1, and the rate of
    the last rows (steps per second of the run's wall_s; None with fewer than two rows)."""

    steps: int = 0
    top1: float | None = None
    rate: float | None = None


RATE_ROWS = 20  # status --watch measures the rate over this many of the last rows


def read_progress(run_dir: Path, rate_rows: int = 1) -> Progress:
    """Progress from the end of RUN_DIR/metrics.jsonl, in time that does not grow with the
    file (scaling.tail): the same steps (the last row's, rows being in step order) and top-1
    (the last eval row's with one) as reading it whole with read_metrics(strict=False). Lines
    are parsed from the end until the newest `rate_rows` rows (the rate needs 2 or more, e.g.
    RATE_ROWS) and an eval row with top-1 are found; older lines without the text "eval" are
    skipped unparsed."""
    newest: list[dict] = []
    top1, want_rows = None, max(1, rate_rows)
    try:
        for row in reverse_rows(Path(run_dir) / METRICS_FILE,
                                want=lambda line: len(newest) < want_rows or b'"eval"' in line):
            if len(newest) < want_rows:
                newest.append(row)
            if top1 is None and row["kind"] == "eval" and row.get("top1") is not None:
                top1 = row["top1"]
            if top1 is not None and len(newest) >= want_rows:
                break
    except OSError:
        return Progress()
    if not newest:
        return Progress()
    return Progress(newest[0]["step"], top1, _rate(newest))


def _rate(rows: list[dict]) -> float | None:
    """Steps per second between the oldest and newest of `rows` (newest first)."""
    if len(rows) < 2:
        return None
    first, last = rows[-1], rows[0]
    try:
        seconds, steps = float(last["wall_s"]) - float(first["wall_s"]), last["step"] - first[
            "step"]
    except (TypeError, ValueError):
        return None
    return steps / seconds if seconds > 0 and steps > 0 else None


# -- claims: which sweep submits (or starts) a run -----------------------------------------------

CLAIM_FILE = ".claim"


def read_claim(run_dir: Path) -> tuple[dict | None, float]:
    """(holder, mtime) of RUN_DIR/.claim; holder None when there is none, {} if unreadable."""
    return lockfile.read_holder(Path(run_dir) / CLAIM_FILE)


def _mine(holder: dict) -> bool:
    return (holder.get("host"), holder.get("pid")) == (socket.gethostname(), os.getpid())


def claim_holder(run_dir: Path) -> dict | None:
    """The live claim of *another* process on this run, or None (none, stale, or ours)."""
    holder, mtime = read_claim(run_dir)
    if holder is None or _mine(holder) or lockfile.is_stale(holder, mtime):
        return None
    return holder


class Claims:
    """The runs this sweep has claimed: RUN_DIR/.claim, a scaling.lockfile lock, so that of
    two sweeps exactly one gets it, on local and shared file systems alike (see there for why
    not flock, and when a holder counts as dead). A claim is taken before a run is submitted or
    started and released once job.json records its job (SLURM id, or local pids), which then
    tells that the run is alive. A heartbeat thread touches the held claims."""

    def __init__(self):
        self.me = lockfile.identity()
        self._beat = lockfile.Heartbeat()

    @property
    def held(self) -> set[Path]:
        """Run dirs whose claim this sweep holds."""
        return {path.parent for path in dict(self._beat.held)}

    def take(self, run_dir: Path, **about) -> dict | None:
        """Claim a run: None when it is now ours, else the live holder that has it."""
        run_dir = Path(run_dir)
        me = {**self.me, **about}
        try:  # a full or read-only disk: one line (the claims held are released on exit)
            run_dir.mkdir(parents=True, exist_ok=True)
            holder = lockfile.acquire(run_dir / CLAIM_FILE, me)
        except OSError as e:
            raise RuntimeError(f"cannot claim run {run_dir} ({e.strerror or e}); nothing "
                               "was submitted or started") from None
        if holder is None:
            self._beat.add(run_dir / CLAIM_FILE, me["token"])
        return holder

    def release(self, run_dir: Path) -> None:
        """Give a claim up (only while it is still ours)."""
        token = self._beat.discard(Path(run_dir) / CLAIM_FILE)
        if token is not None:
            lockfile.release(Path(run_dir) / CLAIM_FILE, token)

    def close(self) -> None:
        """Release every claim still held and stop the heartbeat."""
        self._beat.stop()
        for run_dir in self.held:
            self.release(run_dir)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Run bookkeeping: RUN_DIR/job.json, whether a run's job is alive, its state and progress.

job.json (written under a file lock by the sweep and by rank 0 of the job)::

    run_id, sweep, model, size, budget, budget_kind, seed, base_lr, lr, batch_size,
    world_size, total_steps, train_args     what the run is (launchers.grid.RunSpec.record)
    cluster      "slurm" or "local"
    job_id       the live or last job: SLURM id ("1234" or "1234_5" in an array) or "local-PID"
    host, pids   local runs: where and which processes (launcher first, then the ranks)
    submitted    ISO time of the last submission; history: every submission
    requeues     requeues after preemption / time limit (launchers.slurm.TrainJob)
    attempts     [{job_id, start, end, exit}] one per start of the training child (rank 0)

States: done / failed / diverged (from final.json), queued / running (the job is alive),
preempted (unfinished and no job alive: rerunning the sweep resumes it), failed (no final.json
but the last attempt exited with an error), new (never submitted).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import getpass
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from scaling.results import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    JOB_FILE,
    SchemaError,
    read_final,
    read_json,
    read_metrics,
    write_json,
)

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
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0] != "Z" and (start is None or int(fields[19]) == start)


def pid_start(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (tells a reused pid apart)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


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
    if job is None and not (run_dir / "config.json").exists():
        return "new"
    last = (job or {}).get("attempts", [{}])[-1] if (job or {}).get("attempts") else {}
    if last.get("exit") in (EXIT_FAILED, EXIT_BAD_INPUT):
        return "failed"
    return "preempted"


def progress(run_dir: Path, job: dict | None) -> tuple[int, int | None, float | None]:
    """(steps done, total steps or None, latest top-1 or None) from metrics.jsonl."""
    try:
        rows = read_metrics(run_dir, strict=False)
    except (OSError, SchemaError):
        rows = []
    steps = max((r["step"] for r in rows), default=0)
    evals = [r for r in rows if r["kind"] == "eval" and r.get("top1") is not None]
    top1 = evals[-1]["top1"] if evals else None
    return steps, (job or {}).get("total_steps"), top1

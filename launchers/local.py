"""`--cluster local`: each run as `world_size` local processes, `max_parallel` runs at a time.

The processes are forked by a fork server that imported torch and DeepSpeed once for the whole
sweep (launchers/zygote.py; VIT_SCALING_FORK_SERVER=0: `python -m scaling.train` each).

Every rank gets the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), which scaling.dist reads ahead of SLURM's. The ranks run in their own session, so
a Ctrl-C reaches only the launcher: it then sends SIGTERM to every running rank, which saves a
checkpoint and exits 75, and rerunning the sweep resumes those runs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from launchers import zygote
from launchers.grid import RunSpec
from launchers.runs import now, pid_start, record_submission, update_job
from launchers.slurm import REPO_ROOT, child_env, train_command
from scaling.dist import free_port
from scaling.results import EXIT_OK, EXIT_PREEMPTED, rank_log_path

FAIL_GRACE_S = 30  # after one rank fails, how long the others get before SIGTERM


class LocalRun:
    """The processes of one run."""

    def __init__(self, spec: RunSpec, sweep: str, threads: int,
                 server: zygote.ForkServer | None = None):
        self.spec, self.sweep, self.threads, self.server = spec, sweep, threads, server
        self.procs: list[subprocess.Popen] = []
        self.failed_at: float | None = None

    def start(self) -> None:
        """Record the submission and start every rank."""
        spec, port = self.spec, free_port()
        job_id = f"local-{os.getpid()}-{spec.run_id}"
        record_submission(spec.run_dir, spec.record(), self.sweep, "local", job_id,
                          host=socket.gethostname(), pids=[])
        for rank in range(spec.world_size):
            env = child_env(dict(os.environ), cpus=self.threads)
            env.update(RANK=str(rank), WORLD_SIZE=str(spec.world_size), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(spec.world_size), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS=str(self.threads))
            log_path = rank_log_path(spec.run_dir, rank)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as log:
                log.write(f"==== {now()} {job_id} rank {rank}\n")
                log.flush()
                if self.server is not None:  # a child of the fork server (launchers/zygote.py)
                    self.procs.append(self.server.spawn(spec.cfg.to_args(), env=env,
                                                        cwd=str(REPO_ROOT), log=str(log_path)))
                else:
                    self.procs.append(subprocess.Popen(
                        train_command(spec.cfg.to_args()), stdout=log, stderr=subprocess.STDOUT,
                        cwd=REPO_ROOT, env=env, start_new_session=True))
        update_job(spec.run_dir, pids=[[p.pid, pid_start(p.pid)] for p in self.procs],
                   attempt={"job_id": job_id, "start": now(), "host": socket.gethostname()})

    def poll(self) -> int | None:
        """The run's exit code once every rank has ended, else None (stops stragglers)."""
        codes = [p.poll() for p in self.procs]
        bad = [c for c in codes if c not in (None, EXIT_OK)]
        if bad and None in codes:
            # a dead rank leaves the others blocked in a collective: stop them
            self.failed_at = self.failed_at or time.monotonic()
            if time.monotonic() - self.failed_at > FAIL_GRACE_S:
                self.signal(signal.SIGKILL if time.monotonic() - self.failed_at > 2 *
                            FAIL_GRACE_S else signal.SIGTERM)
            return None
        if None in codes:
            return None
        rc = codes[0] or next((c for c in codes if c), EXIT_OK)
        update_job(self.spec.run_dir, attempt_end={"end": now(), "exit": rc})
        return rc

    def signal(self, signum: int) -> None:
        """Send a signal to every rank still running."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)


def run_local(specs: list[RunSpec], sweep: str, max_parallel: int,
              log=print) -> dict[str, int]:
    """Run `specs`, `max_parallel` at a time; {run id: exit code}. Ctrl-C checkpoints them."""
    max_parallel = max(1, max_parallel)
    threads = max(1, (os.cpu_count() or 1) // max(1, max_parallel * max(
        (s.world_size for s in specs), default=1)))
    pending, running, codes = list(specs), [], {}
    stop = []

    def on_signal(signum, frame):
        stop.append(signum)
        for run in running:
            run.signal(signal.SIGTERM)  # the ranks checkpoint and exit 75

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    server, fork = None, zygote.enabled()
    try:
        while pending or running:
            while pending and len(running) < max_parallel and not stop:
                if server is None and fork:  # imports torch & co. once for the sweep
                    try:
                        server = zygote.ForkServer(specs[0].run_dir.parent / "fork_server.log")
                    except RuntimeError as e:
                        log(f"no fork server ({e}); each rank starts as a process")
                        fork = False
                run = LocalRun(pending.pop(0), sweep, threads, server)
                log(f"start {run.spec.run_id} ({run.spec.world_size} process(es), "
                    f"{run.spec.total_steps} steps)")
                run.start()
                running.append(run)
            if stop:
                pending.clear()
            for run in list(running):
                rc = run.poll()
                if rc is not None:
                    running.remove(run)
                    codes[run.spec.run_id] = rc
                    log(f"end   {run.spec.run_id}: exit {rc}"
                        + (" (preempted: rerun to resume)" if rc == EXIT_PREEMPTED else ""))
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if server is not None:
            server.close()
    return codes


def log_tail(run_dir: Path, rank: int = 0, lines: int = 20) -> str:
    """The last lines of a rank's log (for error reports)."""
    path = rank_log_path(run_dir, rank)
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"

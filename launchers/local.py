"""`--cluster local`: each run as `world_size` local processes, `max_parallel` runs at a time.

The ranks are forked by the fork server (launchers/zygote.py) with the variables torchrun sets,
in their own session and the sweep's working directory (launchers.slurm.child_env); a Ctrl-C
checkpoints them (exit 130), a closed output stops the same way (exit 141). Details:
docs/sweeps.md ("Local runs").
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
from launchers.progress import SweepProgress, drop_stdout
from launchers.runs import Claims, now, pid_start, record_submission, update_job
from launchers.slurm import child_env, train_command
from scaling.dist import free_port
from scaling.results import EXIT_OK, rank_log_path

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
        record_submission(spec.run_dir, {**spec.record(), "train_args": spec.cfg.to_args()},
                          self.sweep, "local", job_id, host=socket.gethostname(), pids=[])
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
                                                        cwd=os.getcwd(), log=str(log_path)))
                else:
                    self.procs.append(subprocess.Popen(
                        train_command(spec.cfg), stdout=log, stderr=subprocess.STDOUT, env=env,
                        start_new_session=True))
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


class LocalSweep:
    """Runs `specs` here, `max_parallel` at a time; a Ctrl-C (SIGINT) or SIGTERM makes every
    running rank checkpoint (SIGTERM -> exit 75) and starts nothing more."""

    def __init__(self, specs: list[RunSpec], sweep: str, max_parallel: int, log=None,
                 claims: Claims | None = None, progress: SweepProgress | None = None):
        self.max_parallel = max(1, max_parallel)
        self.threads = max(1, (os.cpu_count() or 1) // (self.max_parallel * max(
            (s.world_size for s in specs), default=1)))
        self.progress = progress or SweepProgress(specs)
        self.specs, self.sweep, self.claims = specs, sweep, claims
        self.log = log or self.progress.write  # above the terminal's bar, if there is one
        self.pending, self.running = list(specs), []
        self.codes: dict[str, int] = {}
        self.stopped: int | None = None  # the signal that stopped the sweep
        self.server, self.fork = None, zygote.enabled()

    def on_signal(self, signum, frame) -> None:
        self.stopped = self.stopped or signum
        for run in self.running:
            run.signal(signal.SIGTERM)  # the ranks checkpoint and exit 75

    def start_next(self) -> None:
        """Start the next pending run; its claim goes once job.json holds its pids."""
        if self.server is None and self.fork:  # imports torch & co. once for the sweep
            try:
                self.server = zygote.ForkServer(self.specs[0].run_dir.parent / "fork_server.log")
            except RuntimeError as e:
                self.log(f"no fork server ({e}); each rank starts as a process")
                self.fork = False
        run = LocalRun(self.pending.pop(0), self.sweep, self.threads, self.server)
        self.log(f"start {run.spec.run_id} ({run.spec.world_size} process(es), "
                 f"{run.spec.total_steps} steps)")
        run.start()
        self.running.append(run)  # before anything can fail: a stop must reach its ranks
        self.progress.started(run.spec)
        if self.claims is not None:
            self.claims.release(run.spec.run_dir)
        if self.stopped:  # the signal came while this run was starting: stop it too
            run.signal(signal.SIGTERM)

    def reap(self) -> None:
        """Note the runs that ended."""
        for run in list(self.running):
            rc = run.poll()
            if rc is not None:
                self.running.remove(run)
                self.codes[run.spec.run_id] = rc
                self.progress.finished(run.spec, rc)  # [k/N] RUN: state, top-1, time; ETA

    def step(self) -> None:
        """One round of the loop: start what may start, note what ended."""
        while self.pending and len(self.running) < self.max_parallel and not self.stopped:
            self.start_next()
        if self.stopped:
            self.pending.clear()  # their claims are released by the sweep
        self.reap()
        self.progress.tick()

    def run(self) -> tuple[dict[str, int], int | None]:
        """({run id: exit code}, the signal that stopped the sweep or None)."""
        previous = {signum: signal.signal(signum, self.on_signal)
                    for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.pending or self.running:
                try:
                    self.step()
                except BrokenPipeError:  # stdout's reader is gone (`| head`): stop as on Ctrl-C
                    drop_stdout()
                    self.on_signal(signal.SIGPIPE, None)
                time.sleep(0.2)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.progress.close()
            if self.server is not None:
                self.server.close()
        return self.codes, self.stopped


class GatedSweep(LocalSweep):
    """LocalSweep whose runs start only once `ready(spec)` is true (a branch once its trunk's
    checkpoint exists, a fine-tune once its pre-training run finished ok); those still waiting
    when nothing runs any more are `blocked`, never started (see run_gated)."""

    def __init__(self, *args, ready, **kwargs):
        super().__init__(*args, **kwargs)
        self.ready, self.blocked = ready, []

    def step(self) -> None:
        self.reap()
        while len(self.running) < self.max_parallel and not self.stopped:
            i = next((i for i, s in enumerate(self.pending) if self.ready(s)), None)
            if i is None:
                break
            self.pending.insert(0, self.pending.pop(i))
            self.start_next()
        if self.stopped or not self.running:
            self.blocked += self.pending
            self.pending.clear()
        self.progress.tick()


def run_local(specs: list[RunSpec], sweep: str, max_parallel: int, log=None,
              claims: Claims | None = None, progress: SweepProgress | None = None
              ) -> tuple[dict[str, int], int | None]:
    """Run `specs`, `max_parallel` at a time: ({run id: exit code}, the signal that stopped
    the sweep or None). Ctrl-C checkpoints them; `claims` (held) are released as runs start;
    `progress` prints a [k/N] line per finished run (and a bar on a terminal)."""
    return LocalSweep(specs, sweep, max_parallel, log, claims, progress).run()


def run_gated(specs: list[RunSpec], sweep: str, max_parallel: int, log=None,
              claims: Claims | None = None, progress: SweepProgress | None = None, *, ready,
              waiting: str) -> tuple[dict[str, int], int | None]:
    """run_local for runs that start only once `ready(spec)` (GatedSweep). Those still waiting
    when nothing runs any more are never started: their claims are released and, unless the
    sweep was stopped, `waiting` names them ("{n}" and "{runs}" filled in)."""
    runner = GatedSweep(specs, sweep, max_parallel, log, claims, progress, ready=ready)
    codes, stopped = runner.run()
    if claims is not None:
        for s in runner.blocked:
            claims.release(s.run_dir)
    if runner.blocked and not stopped:
        print(waiting.format(n=len(runner.blocked),
                             runs=", ".join(s.run_id for s in runner.blocked)))
    return codes, stopped


def log_tail(run_dir: Path, rank: int = 0, lines: int = 20) -> str:
    """The last lines of a rank's log (for error reports)."""
    path = rank_log_path(run_dir, rank)
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"

"""SLURM through submitit: sbatch parameters, job arrays, and the job that requeues itself.

TrainJob runs the training child, forwards the requeue signal to it, waits for its checkpoint
(exit 75) in a helper thread and returns the requeued submission; job.json's attempts say
whether a stop was a time-out or a preemption (stop_kind, EARLY_S). The verified signal path,
its limits and the measured lead times: docs/sweeps.md ("SLURM jobs, preemption and requeue",
"Time limits").
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import signal
import site
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import launchers
import scaling
from launchers.runs import now, update_job
from scaling.results import EXIT_DIVERGED, EXIT_OK, EXIT_PREEMPTED, FINAL_FILE, rank_log_path

if TYPE_CHECKING:  # scaling.config imports torch, which the job's submitit process does not need
    from scaling.config import TrainConfig

SAVE_TIMEOUT_S = 600  # upper bound on waiting for the child's checkpoint after the signal
PREEMPT_GRACE_S = 20  # after a SIGTERM exit, how long rank 0 waits for the requeue signal
LEAD_ENV = "VIT_SCALING_SIGNAL_LEAD_S"  # the job's signal lead (set by the sbatch script)
EARLY_S = 65  # the time-limit signal comes up to 60 s before the lead (sbatch(1)), + latency
CKPT_KEYS = ("checkpoint_s_max",)  # final.json's slowest checkpoint (scaling.tracking)


def package_paths() -> list[str]:
    """Where this process imported `launchers` and `scaling` from, when a child of the same
    interpreter would not find them there by itself: a source checkout (run as
    `python launchers/sweep.py`, or from its root; for an editable install the same directory
    the install points to). [] for an installed package: it lies in a site-packages directory,
    which every child of this interpreter searches."""
    sites = [*getattr(site, "getsitepackages", list)(), site.getusersitepackages()]
    known = {Path(p).resolve() for p in sites}
    roots = dict.fromkeys(str(Path(m.__file__).resolve().parents[1]) for m in (launchers, scaling))
    return [root for root in roots if Path(root) not in known]


def child_env(parent_env: dict, *, cpus: int | None) -> dict:
    """Environment of a training child (or of the fork server): inherited, with the package
    found where this process found it (package_paths first on PYTHONPATH) and `cpus` threads."""
    env = dict(parent_env)
    ours = package_paths()
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in ours]
    if ours or rest:
        env["PYTHONPATH"] = os.pathsep.join(ours + rest)
    env["PYTHONUNBUFFERED"] = "1"
    if cpus:  # torch would start one thread per core of the node on every rank
        env.setdefault("OMP_NUM_THREADS", str(cpus))
    return env


def _command(train_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "scaling.train", *train_args]


def train_command(cfg: TrainConfig) -> list[str]:
    """The command every rank of a run executes: `python -m scaling.train` with the run's
    config as flags (the one place a sweep's TrainConfig becomes a command line)."""
    return _command(cfg.to_args())


class TrainJob:
    """The submitit callable of one run: each SLURM task runs the train CLI as a child.

    It is pickled as its run dir and train flags (strings), so a job submitted by an older
    version of the sweep still unpickles, and the job's own process never imports torch."""

    # signal bookkeeping of one attempt; class defaults for pickles of older versions
    _end: float | None = None  # when the job's time limit ends it (epoch s), rank 0
    _sigterm_at: float | None = None
    _signal_at: float | None = None

    def __init__(self, run_dir: str, train_args: list[str], *, signal_name: str = "USR2",
                 max_requeues: int = 3, requeues: int = 0, save_timeout_s: int = SAVE_TIMEOUT_S):
        self.run_dir = str(run_dir)
        self.train_args = list(train_args)
        self.signal_name = signal_name
        self.max_requeues = max_requeues
        self.requeues = requeues
        self.save_timeout_s = save_timeout_s
        self._proc: subprocess.Popen | None = None
        self._rc: int | None = None
        self._updating = False
        self._end = self._sigterm_at = self._signal_at = None

    @classmethod
    def for_config(cls, cfg: TrainConfig, **options) -> TrainJob:
        """The job of the run `cfg` (its run dir is cfg.out); options as for TrainJob."""
        return cls(cfg.out, cfg.to_args(), **options)

    def __getstate__(self) -> dict:
        """Pickle the recipe only, never the live child."""
        state = dict(self.__dict__)
        state.update(_proc=None, _rc=None, _updating=False, _end=None, _sigterm_at=None,
                     _signal_at=None)
        return state

    def __call__(self) -> dict:
        """Run this task's rank to its end; rank 0 records the attempt in job.json."""
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        job_id = _job_id()
        if rank == 0:
            self._end = job_end_time(os.environ.get("SLURM_JOB_ID", ""))
            self._record(job_id=job_id, attempt={
                "job_id": job_id, "start": now(), "host": socket.gethostname(),
                "nodes": os.environ.get("SLURM_JOB_NODELIST"), "requeues": self.requeues,
                "time_limit_at": self._end})
        self._start(rank)
        rc = self._wait(None)
        if rank == 0:
            self._record(attempt_end={"end": now(), "exit": rc, **self._lead_warning(None)})
        if rc in (EXIT_OK, EXIT_DIVERGED) or rank != 0:
            return {"run_dir": self.run_dir, "rank": rank, "exit": rc}
        if rc == EXIT_PREEMPTED:
            # SIGTERM came first (a preemption sends SIGTERM, then the requeue signal, as
            # submitit's SlurmJob._interrupt does): give that signal time to arrive; submitit's
            # handler then requeues and exits from inside this sleep.
            time.sleep(PREEMPT_GRACE_S)
        raise RuntimeError(f"training exited with code {rc} (75: stopped by SIGTERM, rerun the "
                           f"sweep to resume); log: {self._log_path(rank)}")

    def checkpoint(self, *args, **kwargs):
        """Rank 0, from submitit's signal handler: wait for the child's checkpoint, requeue."""
        rc = self._wait(self.save_timeout_s) if self._proc is not None else None
        self._record(attempt_end={"end": now(), "exit": rc, "signal": self.signal_name,
                                  **self._stop_record()})
        if rc in (EXIT_OK, EXIT_DIVERGED):
            return None  # finished just in time: nothing to resume
        if self.requeues >= self.max_requeues:
            self._record(requeue_refused=f"max_requeues={self.max_requeues} reached")
            return None  # submitit then ends the job; rerunning the sweep resumes the run
        self._record(requeues=self.requeues + 1)
        import submitit  # late: the job side imports it anyway; keeps this module light

        return submitit.helpers.DelayedSubmission(TrainJob(
            self.run_dir, self.train_args, signal_name=self.signal_name,
            max_requeues=self.max_requeues, requeues=self.requeues + 1,
            save_timeout_s=self.save_timeout_s))

    def _record(self, **changes) -> None:
        """update_job, skipped when a signal handler interrupts the main thread's own update
        (job.json's flock is not re-entrant: waiting on it there would deadlock)."""
        if self._updating:
            return
        self._updating = True
        try:
            update_job(self.run_dir, **changes)
        finally:
            self._updating = False

    def _stop_record(self) -> dict:
        """How this attempt was stopped: time-out or preemption, the time that was left, how
        long the child took to checkpoint and exit, and a warning when that beat the lead."""
        got = self._signal_at or time.time()
        left = None if self._end is None else round(self._end - got, 1)
        sigterm_first = self._sigterm_at is not None and self._sigterm_at <= got
        record = {"stop": stop_kind(sigterm_first, left, signal_lead_s()), "seconds_left": left,
                  "stop_s": round(time.time() - got, 2)}
        return {**record, **self._lead_warning(record["stop_s"])}

    def _lead_warning(self, stop_s: float | None) -> dict:
        """{"warning": ...} when this attempt's stop, or a checkpoint final.json reports, took
        longer than the signal lead; also written to rank 0's log. {} otherwise."""
        lead = signal_lead_s()
        slowest = max([stop_s or 0.0, *final_checkpoint_seconds(self.run_dir)])
        if slowest <= lead:
            return {}
        text = (f"a checkpoint took {slowest:.0f} s, more than the {lead} s lead of "
                f"--signal {self.signal_name}@{lead}: the time limit may kill the job before it "
                f"saves; raise the lead (e.g. --signal {self.signal_name}@{int(2 * slowest)})")
        with contextlib.suppress(OSError):
            self._log_path(0).parent.mkdir(parents=True, exist_ok=True)
            with open(self._log_path(0), "a") as log:
                log.write(f"==== warning: {text}\n")
        return {"warning": text}

    def _log_path(self, rank: int) -> Path:
        return rank_log_path(self.run_dir, rank)

    def _start(self, rank: int) -> None:
        """Start the child and a thread that reaps it; forward the preemption signal."""
        log_path = self._log_path(rank)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", "0")) or None
        with open(log_path, "a") as log:
            log.write(f"==== {now()} job {_job_id()} rank {rank} host {socket.gethostname()} "
                      f"node {os.environ.get('SLURM_NODEID', '0')} requeues {self.requeues}\n")
            log.flush()
            self._proc = subprocess.Popen(_command(self.train_args), stdout=log,
                                          stderr=subprocess.STDOUT,
                                          env=child_env(dict(os.environ), cpus=cpus))
        threading.Thread(target=self._reap, daemon=True).start()
        signum = getattr(signal, "SIG" + self.signal_name)
        previous = signal.getsignal(signum)

        def forward(sig, frame):
            self._signal_at = self._signal_at or time.time()
            if self._proc is not None and self._rc is None:
                self._proc.send_signal(sig)
            if callable(previous):
                previous(sig, frame)  # submitit's handler: checkpoint() and requeue on rank 0

        signal.signal(signum, forward)
        if signum != signal.SIGTERM:
            self._note_sigterm()

    def _note_sigterm(self) -> None:
        """Remember when SIGTERM came (a preemption sends it before the requeue signal); the
        child gets its own from SLURM. submitit's handler (it logs) still runs."""
        previous = signal.getsignal(signal.SIGTERM)

        def note(sig, frame):
            self._sigterm_at = self._sigterm_at or time.time()
            if callable(previous):
                previous(sig, frame)

        signal.signal(signal.SIGTERM, note)

    def _reap(self) -> None:
        self._rc = self._proc.wait()

    def _wait(self, timeout: float | None) -> int | None:
        """The child's exit code; polls so that signal handlers can run (and wait) meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._rc is None and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.2)
        return self._rc


def stop_kind(sigterm_first: bool, seconds_left: float | None, lead: int) -> str:
    """"preemption" when SIGTERM came before the requeue signal or the time limit was further
    than the lead (+ EARLY_S); "timeout" when it was at most that far; "unknown" when the
    limit could not be read."""
    if sigterm_first:
        return "preemption"
    if seconds_left is None:
        return "unknown"
    return "timeout" if seconds_left <= lead + EARLY_S else "preemption"


def signal_lead_s() -> int:
    """The job's signal lead in seconds (from the sbatch script's LEAD_ENV; 90 without it)."""
    text = os.environ.get(LEAD_ENV, "")
    return int(text) if text.isdigit() else 90


def job_end_time(job_id: str) -> float | None:
    """When SLURM ends `job_id` at its time limit (epoch seconds, from squeue's EndTime), or
    None: no id, no squeue, no answer, or no limit."""
    if not job_id:
        return None
    try:
        text = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True,
                              text=True, timeout=20, check=True).stdout.strip()
        return datetime.datetime.fromisoformat(text).timestamp()
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def final_checkpoint_seconds(run_dir: str | os.PathLike) -> list[float]:
    """Checkpoint times that RUN_DIR/final.json reports (keys CKPT_KEYS), [] without any."""
    try:
        final = json.loads((Path(run_dir) / FINAL_FILE).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(final, dict):
        return []
    return [float(final[k]) for k in CKPT_KEYS if isinstance(final.get(k), (int, float))]


def check_timing(settings: dict) -> tuple[str, int]:
    """The signal and its lead, checked against the time limit: a lead of at least 1 s (0
    would mean at the limit itself), shorter than the limit."""
    name, lead = parse_signal(settings.get("signal") or "USR2")
    if lead < 1:
        raise ValueError(f"--signal {settings['signal']}: the lead after @ must be >= 1 s")
    minutes = settings.get("time")
    if minutes is not None and lead >= int(minutes) * 60:
        raise ValueError(f"--signal {settings['signal']}: the lead ({lead} s) must be shorter "
                         f"than --time {minutes} ({int(minutes) * 60} s)")
    return name, lead


def parse_signal(text: str) -> tuple[str, int]:
    """'USR2' -> ('USR2', 90); 'USR1@120' -> ('USR1', 120); names checked against signal."""
    name, _, delay = str(text).upper().removeprefix("SIG").partition("@")
    if not hasattr(signal, "SIG" + name) or name in ("KILL", "STOP"):
        raise ValueError(f"--signal {text!r}: unknown or uncatchable signal; e.g. USR2, USR1, "
                         "TERM, optionally with @SECONDS before the time limit (USR2@90)")
    if delay and not delay.isdigit():
        raise ValueError(f"--signal {text!r}: the delay after @ must be whole seconds")
    return name, int(delay or 90)  # 90 s: submitit's default signal_delay_s


def executor_parameters(settings: dict, *, nodes: int, tasks_per_node: int, gpu_request: int,
                        name: str, count: int) -> dict:
    """SlurmExecutor parameters (submitit's names) from the merged settings (the keys of
    launchers.slurm_config.SLURM_KEYS), for jobs of `nodes` x `tasks_per_node` tasks asking for
    `gpu_request` GPUs per node (0: none)."""
    sig, delay = parse_signal(settings.get("signal") or "USR2")
    extra = dict(settings.get("additional_parameters") or {})
    # --signal overrides the line submitit writes from SUBMITIT_PREEMPT_SIGNAL; --requeue lets
    # `scontrol requeue` work where the cluster's JobRequeue=0
    extra.update(signal=f"{sig}@{delay}", requeue=True)
    # the job side of submitit reads the signal name from this variable; it unpickles TrainJob,
    # so it must import launchers from where this sweep did (nothing to add when installed)
    setup = [f"export SUBMITIT_PREEMPT_SIGNAL={sig}", f"export {LEAD_ENV}={delay}"]
    if package_paths():
        setup.append(f"export PYTHONPATH={shlex.quote(os.pathsep.join(package_paths()))}"
                     "${PYTHONPATH:+:$PYTHONPATH}")
    params = {"job_name": name, "nodes": nodes, "ntasks_per_node": tasks_per_node,
              "cpus_per_task": int(settings.get("cpus_per_task") or 1),
              "time": int(settings["time"]), "signal_delay_s": delay,
              "additional_parameters": extra,
              "array_parallelism": int(settings.get("max_parallel") or max(count, 1)),
              "setup": [*setup, *(settings.get("setup") or [])]}
    if gpu_request:
        params["gpus_per_node"] = int(gpu_request)
    if settings.get("mem_gb"):
        params["mem"] = f"{int(settings['mem_gb'])}GB"
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if settings.get(key):
            params[key] = str(settings[key])
    if settings.get("srun_args"):
        params["srun_args"] = list(settings["srun_args"])
    return params


def sbatch_script(params: dict, folder: str | os.PathLike, count: int) -> str:
    """The sbatch file submitit would write for `count` runs (an array when count > 1)."""
    from submitit.slurm.slurm import _make_sbatch_string  # what SlurmExecutor itself calls

    command = f"{sys.executable} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(command=command, folder=folder,
                               map_count=count if count > 1 else None, **params)


def submit(jobs: list[TrainJob], params: dict, folder: str | os.PathLike,
           max_requeues: int) -> list[str]:
    """Submit the jobs as one SLURM array (a plain job when there is one); their ids."""
    import submitit

    executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=max_requeues)
    executor.update_parameters(**params)
    return [j.job_id for j in executor.submit_array(jobs)]


def _job_id() -> str:
    """SLURM job id as submitit names it: ARRAYID_TASK for array elements."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "?")

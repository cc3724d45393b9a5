"""Submitting planned runs to SLURM: one array (`submit_array`), and runs that wait for an
upstream run's job (`submit_after`: branches for their trunk, fine-tunes for their pre-training
run). The job side (TrainJob, the sbatch parameters) is launchers.slurm's, which a SLURM job's
submitit process imports, so it stays free of the sweep's own modules."""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import shutil
import signal
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from launchers import slurm
from launchers.grid import RunSpec
from launchers.plan import PlannedRun
from launchers.progress import PLOT, shown_path
from launchers.runs import Claims, read_job, record_submission

NO_JOB = ""  # upstream_job_of: the upstream run has no SLURM job to wait for


@contextlib.contextmanager
def signals_deferred():
    """Hold Ctrl-C / SIGTERM until the block ends: a job that sbatch accepted must get into
    job.json, or the next sweep would submit its run a second time."""
    got: list[int] = []
    previous = {signum: signal.signal(signum, lambda sig, frame: got.append(sig))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if got:
        raise KeyboardInterrupt(got[0])


def sbatch(jobs: list[slurm.TrainJob], params: dict, folder: Path, max_requeues: int
           ) -> list[str]:
    """slurm.submit; when sbatch refuses the array, the submission's own submitit folder
    (pickles, script) is removed, so a failed submission leaves nothing behind."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    noise = io.StringIO()  # submitit prints sbatch's stderr itself; it is in our one line
    try:
        with contextlib.redirect_stderr(noise):
            ids = slurm.submit(jobs, params, folder, max_requeues)
    except (FailedJobError, OSError) as e:  # sbatch exited non-zero, or could not run
        shutil.rmtree(folder.parent, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.parent.parent.rmdir()  # _submitit, when no earlier submission is in it
        detail = " ".join(str(e).split()) or type(e).__name__
        raise RuntimeError(f"sbatch failed, no run was submitted: {detail}") from None
    except FailedSubmissionError as e:  # a job may exist: its pickles stay
        detail = " ".join(str(e).split())
        raise RuntimeError(f"sbatch answered without a job id ({detail}); check squeue for "
                           f"job {params['job_name']} before rerunning") from None
    sys.stderr.write(noise.getvalue())
    return ids


def submit_array(todo: list[PlannedRun], placement: dict, layout: tuple[int, int],
                 gpu_request: int, sweep_dir: Path, dry_run: bool, claims: Claims | None) -> int:
    """Submit the runs as one array (or print its sbatch script) of `layout` (nodes, tasks per
    node) jobs asking for `gpu_request` GPUs per node (launchers.grid.gpu_request); each run's
    claim is released once job.json holds its job id."""
    # a folder per submission: a failed one is removed without touching another sweep's files
    stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    folder = sweep_dir / "_submitit" / stamp / "%j"
    params = slurm.executor_parameters(placement, nodes=layout[0], tasks_per_node=layout[1],
                                       gpu_request=gpu_request, name=f"vit-{sweep_dir.name}",
                                       count=len(todo))
    if dry_run:
        script = slurm.sbatch_script(params, folder, len(todo))
        print(f"\n# sbatch script ({len(todo)} run(s)):\n{script}")
        for i, p in enumerate(todo):
            print(f"# task {i}: {shlex.join(slurm.train_command(p.spec.cfg))}")
        return 0
    sig, requeues = slurm.parse_signal(placement["signal"])[0], int(placement["max_requeues"])
    jobs = [slurm.TrainJob.for_config(p.spec.cfg, signal_name=sig, max_requeues=requeues)
            for p in todo]
    with signals_deferred():
        ids = sbatch(jobs, params, folder, requeues)
        for p, job, job_id in zip(todo, jobs, ids):
            record_submission(p.spec.run_dir, {**p.spec.record(), "train_args": job.train_args},
                              sweep_dir.name, "slurm", job_id, submitit_folder=str(folder.parent))
            claims.release(p.spec.run_dir)
    root = shlex.quote(shown_path(sweep_dir.parent))
    print(f"submitted {len(ids)} run(s) to SLURM: {', '.join(ids)}")
    print(f"follow with: python launchers/sweep.py status --results {root}")
    print(f"once they are done: {PLOT} --results {root}")
    return 0


def upstream_job(ready: Callable[[RunSpec], bool], upstream_dir: Callable[[RunSpec], str | Path],
                 dry_run: bool, placeholder: str) -> Callable[[RunSpec], str | None]:
    """`upstream_job_of` for submit_after: None for a run that may start now (`ready`), else the
    SLURM job of its upstream run (`upstream_dir`'s job.json; `placeholder` in a dry run), or
    NO_JOB when that run has none."""
    def job_of(spec: RunSpec) -> str | None:
        if ready(spec):
            return None
        if dry_run:
            return placeholder
        job = read_job(upstream_dir(spec)) or {}
        return str(job["job_id"]) if job.get("cluster") == "slurm" and job.get("job_id") else NO_JOB
    return job_of


def submit_after(runs: list[PlannedRun], upstream_job_of: Callable[[RunSpec], str | None],
                 placement: dict, layout: tuple[int, int], gpu_request: int, sweep_dir: Path,
                 dry_run: bool, claims: Claims | None) -> list[PlannedRun]:
    """Submit runs that wait for an upstream run: those that may start now (`upstream_job_of`
    None) as one array, then one array per upstream job, each `--dependency=afterok:JOB
    --kill-on-invalid-dep=yes` (it starts when that job succeeds, and is cancelled when it
    fails; the next sweep resubmits both). The runs whose upstream has no job (NO_JOB) are not
    submitted: their claims are released, and they are returned."""
    groups: dict[str | None, list[PlannedRun]] = defaultdict(list)
    groups[None] = []  # those that may start now are submitted first
    left = []
    for p in runs:
        job = upstream_job_of(p.spec)
        (left if job == NO_JOB else groups[job]).append(p)
    for job_id, group in groups.items():
        if not group:
            continue
        extra = dict(placement.get("additional_parameters") or {})
        if job_id is not None:
            extra.update(dependency=f"afterok:{job_id}", kill_on_invalid_dep="yes")
        submit_array(group, {**placement, "additional_parameters": extra}, layout,
                     gpu_request, sweep_dir, dry_run, claims)
    for p in left:
        if claims is not None:
            claims.release(p.spec.run_dir)
    return left

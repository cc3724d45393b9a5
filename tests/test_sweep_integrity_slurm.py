"""Sweep integrity on a real SLURM cluster: two sweeps at once submit each run once; a failed
sbatch leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers.runs import CLAIM_FILE, read_job, squeue_states
from launchers.sweep import main

pytestmark = [pytest.mark.slurm, pytest.mark.multiproc, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
SWEEP = [sys.executable, str(REPO / "launchers" / "sweep.py")]
GRID = ["--preset", "demo", "--sizes", "mu", "--budget-kind", "steps", "--budgets", "8,16",
        "--cluster", "slurm", "--time", "10", "--set", "log_every=4"]


def wait_gone(job_ids: list[str], timeout: float = 300) -> None:
    """Wait until SLURM no longer lists the jobs as pending or running (scancel at the end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = squeue_states()
        if not any(states.get(j, "COMPLETED") in ("PENDING", "RUNNING", "CONFIGURING",
                                                   "COMPLETING", "REQUEUED") for j in job_ids):
            return
        time.sleep(0.5)
    subprocess.run(["scancel", *job_ids], check=False)
    pytest.fail(f"jobs {job_ids} still alive after {timeout:.0f}s: {squeue_states()}")


def test_two_slurm_sweeps_started_at_once_submit_each_run_once(slurm, digits_data, tmp_path):
    args = [*GRID, "--data", digits_data, "--results", str(tmp_path)]
    procs = [subprocess.Popen([*SWEEP, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=REPO) for _ in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    runs = sorted(p.parent for p in (tmp_path / "demo").glob("*/job.json"))
    ids = [str(read_job(r)["job_id"]) for r in runs]
    try:
        assert [p.returncode for p in procs] == [0, 0], outs
        assert len(runs) == 2, outs
        for run in runs:
            job = read_job(run)
            assert len(job["history"]) == 1 and job["cluster"] == "slurm", job
            assert sum(str(job["job_id"]) in out for out in outs) == 1, outs  # one sweep
        assert not list(tmp_path.rglob(f"{CLAIM_FILE}*"))
        wait_gone(ids)
        for run in runs:
            assert [a.get("exit") for a in read_job(run)["attempts"]] == [0], run
    finally:
        subprocess.run(["scancel", *ids], check=False, capture_output=True)


def test_a_failed_sbatch_leaves_no_submitit_files_and_no_claims(slurm, digits_data, tmp_path,
                                                                 capsys):
    args = [*GRID, "--data", digits_data, "--results", str(tmp_path)]
    rc = main([*args, "--partition", "no-such-partition"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert len(err.strip().splitlines()) == 1 and "sbatch failed" in err, err
    assert "no-such-partition" in err
    assert not (tmp_path / "demo" / "_submitit").exists()
    assert not list(tmp_path.rglob("job.json")) and not list(tmp_path.rglob(f"{CLAIM_FILE}*"))
    assert main([*args, "--dry-run"]) == 0  # the runs are still new: nothing was recorded
    out = capsys.readouterr().out
    assert out.count(" new ") == 2 and "skip" not in out, out

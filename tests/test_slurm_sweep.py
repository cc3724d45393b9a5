"""Sweeps on a real SLURM cluster (launchers/local_slurm.sh): 2-task jobs, preemption, reruns."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from launchers.runs import read_job, squeue_states
from launchers.sweep import main
from scaling.results import TIMING_KEYS, read_final, read_metrics

pytestmark = [pytest.mark.slurm, pytest.mark.multiproc, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
# 2 micro sizes x 2 budgets, 2 ranks (SLURM tasks) per run, gloo on CPU
GRID = ["--preset", "demo", "--sizes", "mu,m1", "--budget-kind", "steps", "--budgets", "20,240",
        "--gpus", "2", "--cluster", "slurm", "--time", "60", "--set", "log_every=5"]
TIMEOUT_S = 420


def wait_for(predicate, what: str, timeout: float = TIMEOUT_S):
    """Poll until predicate() is truthy; fail naming `what` and the queue."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    queue = subprocess.run(["squeue"], capture_output=True, text=True, check=False).stdout
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; squeue:\n{queue}")


def finished(run_dirs) -> bool:
    return all((d / "final.json").exists() for d in run_dirs)


def alive(run_dirs) -> list[str]:
    states = squeue_states()
    ids = [str((read_job(d) or {}).get("job_id")) for d in run_dirs]
    return [i for i in ids if states.get(i, "COMPLETED") not in ("COMPLETED", "FAILED",
                                                                  "CANCELLED")]


def sweep(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.fixture(scope="module")
def results(slurm, digits_data, tmp_path_factory):
    """The grid swept once on SLURM, all jobs waited for; later tests reuse it."""
    root = tmp_path_factory.mktemp("slurm_results")
    assert main([*GRID, "--data", digits_data, "--results", str(root)]) == 0
    runs = sorted(p.parent for p in (root / "demo").glob("*/job.json"))
    yield root
    leftover = alive(runs)
    if leftover:
        subprocess.run(["scancel", *leftover], check=False)


def test_grid_runs_as_slurm_jobs_with_two_tasks(results, capsys):
    runs = sorted(p.parent for p in (results / "demo").glob("*/job.json"))
    assert len(runs) == 4
    wait_for(lambda: finished(runs) and not alive(runs), "the 4 runs to finish")
    for run in runs:
        final, job = read_final(run), read_job(run)
        assert final["status"] == "ok" and final["world_size"] == 2, run
        assert final["steps"] == job["total_steps"] in (20, 240)
        assert job["cluster"] == "slurm" and "_" in job["job_id"]  # an array element
        assert [a["exit"] for a in job["attempts"]] == [0]
        assert (run / "logs" / "rank1.log").is_file()  # the second SLURM task trained too
        rows = read_metrics(run)
        assert rows[-1]["kind"] == "eval" and rows[-1]["step"] == final["steps"]
        assert [r["step"] for r in rows if r["kind"] == "train"] == list(
            range(5, final["steps"] + 1, 5))
        assert (run / "model.safetensors").is_file()
    rc, out = sweep(capsys, "status", "--results", results)
    assert rc == 0 and "4 runs: 4 done" in out


def test_preempted_job_requeues_and_resumes_to_the_same_result(results, digits_data, capsys):
    (reference,) = (results / "demo").glob("mu4_240st_*")
    wait_for(lambda: (reference / "final.json").exists(), "the reference run")
    rc, out = sweep(capsys, *GRID, "--sizes", "mu", "--budgets", "240", "--name", "preempt",
                    "--data", digits_data, "--results", results)
    assert rc == 0, out
    run = results / "preempt" / reference.name  # same config, so the same run id
    wait_for(lambda: any(r["kind"] == "train" for r in read_metrics(run)), "a first train row")
    job_id = read_job(run)["job_id"]
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_for(lambda: (run / "final.json").exists() and not alive([run]),
             "the requeued job to finish")
    job = read_job(run)
    assert job["requeues"] == 1 and job["job_id"] == job_id  # requeued, not resubmitted
    assert [a.get("exit") for a in job["attempts"]] == [75, 0], job["attempts"]
    expected, got = read_final(reference), read_final(run)
    for key in ("status", "steps", "images_seen", "final_top1", "final_top5", "best_top1",
                "final_loss", "total_flops"):
        assert got[key] == expected[key], key
    strip = TIMING_KEYS
    assert [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(run)] == \
        [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(reference)]


def test_rerun_submits_nothing_then_exactly_a_run_that_lost_its_final(results, digits_data,
                                                                      capsys):
    runs = sorted(p.parent for p in (results / "demo").glob("*/job.json"))
    wait_for(lambda: finished(runs) and not alive(runs), "the grid to finish")
    before = {r: read_job(r)["job_id"] for r in runs}
    rc, out = sweep(capsys, *GRID, "--data", digits_data, "--results", results)
    assert rc == 0 and "nothing to submit" in out, out
    assert {r: read_job(r)["job_id"] for r in runs} == before
    victim = next(r for r in runs if r.name.startswith("m1-4_20st_"))
    (victim / "final.json").unlink()
    rc, out = sweep(capsys, *GRID, "--data", digits_data, "--results", results)
    assert rc == 0 and "submitted 1 run(s)" in out, out
    assert [r for r in runs if read_job(r)["job_id"] != before[r]] == [victim]
    rc, out = sweep(capsys, *GRID, "--data", digits_data, "--results", results)
    assert rc == 0 and "nothing to submit" in out and "skip (" in out, out  # queued/running
    wait_for(lambda: (victim / "final.json").exists(), "the resubmitted run")
    assert read_final(victim)["status"] == "ok" and len(read_job(victim)["history"]) == 2


def test_local_slurm_script_is_idempotent(slurm):
    run = subprocess.run(["bash", str(REPO / "launchers" / "local_slurm.sh")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert "local_slurm.sh: node" in run.stderr  # found the node up (idle, or busy with jobs)

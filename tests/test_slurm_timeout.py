"""The time-limit path on a real SLURM cluster: `--time 2 --signal USR2@60` runs out before the
run ends -> USR2 -> checkpoint -> requeue -> resume -> the result of an uninterrupted run.

The run trains for about TRAIN_S = 130 s: SLURM sends USR2 when at most LEAD + 30 s are left
(slurmctld looks every 30 s), so with `--time 2 --signal USR2@30` 60 to 90 s into the job, while
it trains. Its length is set by the clock, not by the machine's speed: every step sleeps PACE_MS
(VIT_SCALING_FAULTS=pace@PACE_MS, scaling.run.faults_from_env), some 10x a step's compute here, so
a speed calibration 2x off (CI's shared machines have been 1.6x off in either direction; a run
sized by speed alone for 100 s once ended inside 73 s and no limit was hit) moves it by about
10 %. The resumed attempts are stopped again the same way (--max-requeues 12); every stop must
be a time-out.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from launchers.runs import read_job
from launchers.slurm import EARLY_S, LEAD_ENV, TrainJob, check_timing, stop_kind
from launchers.sweep import main
from scaling.results import TIMING_KEYS, read_final, read_metrics
from tests.conftest import train_env
from tests.test_slurm_sweep import alive, wait_for

GRID = ["--preset", "demo", "--sizes", "mu", "--budget-kind", "steps", "--gpus", "1",
        "--cluster", "slurm", "--set", "log_every=100"]
LEAD = 30
TRAIN_S = 130  # the run's training time: its steps' compute at the calibrated speed + pace
PACE_MS = 40  # sleep after every step (about 3.5 ms of compute each here)
STRIP = TIMING_KEYS


def seconds_per_step(data: str, out: Path) -> float:
    """Loop seconds per step of the demo's mu/4 at 1 rank here, in steady state: the median
    train row of a 1500-step run after its first 300 steps. (The mean over a 500-step run was
    dominated by its warm-up: it predicted 5.8 ms per step where the run then took 3.5, the
    job ended inside its first 70 s and no time limit was hit.)"""
    import statistics
    import subprocess

    subprocess.run([sys.executable, "-m", "scaling.train", "--model", "mu/4", "--data", data,
                    "--out", str(out), "--steps", "1500", "--batch-size", "64",
                    "--num-workers", "0", "--log-every", "50", "--no-progress"],
                   env=train_env(), check=True, capture_output=True, timeout=300)
    rates = [r["images_per_s"] for r in read_metrics(out)
             if r["kind"] == "train" and r["step"] > 300]
    return 64 / statistics.median(rates)


def on_the_timed_out_run(test):
    """The marks of a test reading the timed-out run: real SLURM, processes, minutes."""
    return pytest.mark.slurm(pytest.mark.multiproc(pytest.mark.slow(test)))


@pytest.fixture(scope="module")
def timed_out(slurm, digits_data, tmp_path_factory):
    """The run submitted twice at once: with a 2-minute limit, and with the preset's 30."""
    root = tmp_path_factory.mktemp("timeout")
    step_s = seconds_per_step(digits_data, root / "calib") + PACE_MS / 1000
    steps = min(max(int(TRAIN_S / step_s), 1000), 200000)
    common = [*GRID, "--budgets", str(steps), "--data", digits_data, "--results", str(root)]
    before = os.environ.get("VIT_SCALING_FAULTS")
    os.environ["VIT_SCALING_FAULTS"] = f"pace@{PACE_MS}"  # sbatch passes it on to both jobs
    try:
        assert main([*common, "--name", "limited", "--time", "2", "--signal", f"USR2@{LEAD}",
                     "--max-requeues", "12"]) == 0
        assert main([*common, "--name", "reference"]) == 0
    finally:
        if before is None:
            os.environ.pop("VIT_SCALING_FAULTS")
        else:
            os.environ["VIT_SCALING_FAULTS"] = before
    (run,) = (root / "limited").glob("mu4_*")
    reference = root / "reference" / run.name  # same config, same run id
    try:
        wait_for(lambda: (run / "final.json").exists() and (reference / "final.json").exists()
                 and not alive([run, reference]), "the limited and the reference run", 900)
        yield run, reference
    finally:
        import subprocess

        leftover = alive([run, reference])
        if leftover:
            subprocess.run(["scancel", *leftover], check=False, timeout=30)


@on_the_timed_out_run
def test_time_limit_checkpoints_requeues_and_resumes(timed_out):
    run, reference = timed_out
    job = read_job(run)
    *stopped, last = job["attempts"]
    assert stopped, "the run finished inside its first 2 minutes: no time limit was hit"
    assert last["exit"] == 0 and job["requeues"] == len(stopped)
    assert {a["job_id"] for a in job["attempts"]} == {job["job_id"]}  # requeued, not resubmitted
    for a in stopped:
        assert a["exit"] == 75 and a["signal"] == "USR2" and a["stop"] == "timeout", a
        assert LEAD - 5 <= a["seconds_left"] <= LEAD + EARLY_S, a  # never later than the lead
        assert a["stop_s"] < a["seconds_left"], a
        assert "warning" not in a, a  # a checkpoint of this model takes far less than 30 s
    expected, got = read_final(reference), read_final(run)
    for key in ("status", "steps", "images_seen", "final_top1", "final_top5", "best_top1",
                "final_loss", "total_flops"):
        assert got[key] == expected[key], key
    assert [{k: v for k, v in r.items() if k not in STRIP} for r in read_metrics(run)] == \
        [{k: v for k, v in r.items() if k not in STRIP} for r in read_metrics(reference)]
    assert [a["stop"] for a in read_job(reference)["attempts"] if "stop" in a] == []


@on_the_timed_out_run
def test_logs_append_across_requeues(timed_out):
    run, _ = timed_out
    job = read_job(run)
    headers = [line for line in (run / "logs" / "rank0.log").read_text().splitlines()
               if line.startswith("==== ") and " requeues " in line]
    assert [h.split()[-1] for h in headers] == [str(i) for i in range(len(job["attempts"]))]
    folder = Path(job["submitit_folder"]) / job["job_id"]
    (out,) = folder.glob("*_0_log.out")  # submitit's log of the task, one file for all attempts
    text = out.read_text()
    assert text.count("Starting with JobEnvironment") == len(job["attempts"]), text[-2000:]
    assert "this job is timed-out" in text


def test_stop_kind_tells_timeout_from_preemption():
    assert stop_kind(False, 42.0, 60) == "timeout"
    assert stop_kind(False, 88.0, 60) == "timeout"  # SLURM signals up to 60 s early
    assert stop_kind(False, 3500.0, 60) == "preemption"  # scancel --signal long before the end
    assert stop_kind(True, 42.0, 60) == "preemption"  # SIGTERM first: preempted near the end
    assert stop_kind(False, None, 60) == "unknown"


def test_slow_checkpoint_in_final_json_is_warned_about(tmp_path, monkeypatch):
    monkeypatch.setenv(LEAD_ENV, "60")
    job = TrainJob(str(tmp_path), [])
    assert job._lead_warning(12.0) == {}
    (tmp_path / "final.json").write_text('{"status": "ok", "checkpoint_s_max": 75.5}')
    warning = job._lead_warning(None)["warning"]
    assert "76 s, more than the 60 s lead" in warning and "USR2@151" in warning
    assert "warning: a checkpoint took" in (tmp_path / "logs" / "rank0.log").read_text()
    (tmp_path / "final.json").unlink()
    assert "61 s" in job._lead_warning(61.0)["warning"]  # this attempt's own stop time


@pytest.mark.parametrize(("settings", "error"), [
    ({"signal": "USR2@0", "time": 5}, "the lead after @ must be >= 1 s"),
    ({"signal": "USR2@120", "time": 2}, "the lead (120 s) must be shorter than --time 2"),
    ({"signal": "USR2@60", "time": 1}, "must be shorter than --time 1 (60 s)"),
])
def test_bad_lead_is_one_line_error(settings, error, capsys):
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace(")", r"\)")):
        check_timing(settings)
    assert check_timing({"signal": "USR2@60", "time": 2}) == ("USR2", 60)
    rc = main(["--preset", "demo", "--cluster", "slurm", "--dry-run", "--time",
               str(settings["time"]), "--signal", settings["signal"]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and error in err, err

"""The sweep checks what training checks (issue 27): scaling.checks.check_run, called by
`python -m scaling.train` and, for every run it would start, by the sweep before any claim or
submission; through the real CLIs. Also the sweep's own bad input and faults: a results dir on a
full disk (H3), only ok runs as the best one (H3c), --slurm-config types (H7e, H7f)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import train_env

from scaling import lockfile, results
from scaling.run_lock import RunLock
from scaling.writes import DiskFull

REPO = Path(__file__).resolve().parents[1]
SWEEP = [sys.executable, str(REPO / "launchers" / "sweep.py")]
MU = ["--preset", "demo", "--sizes", "mu", "--budgets", "8", "--budget-kind", "steps"]
PAGE = os.sysconf("SC_PAGESIZE")


def cli(argv, cwd, timeout=300, **env):
    run = subprocess.run([str(a) for a in argv], env={**train_env(), **env}, cwd=cwd,
                         capture_output=True, text=True, timeout=timeout, check=False)
    return run


def one_error(run, code: int = 2) -> str:
    """The run's only stderr line, after checking its exit code and that it is one line."""
    lines = run.stderr.strip().splitlines()
    assert run.returncode == code and len(lines) == 1, (run.returncode, run.stdout, run.stderr)
    return lines[0]


@pytest.fixture(scope="module")
def no_val(tmp_path_factory):
    out = tmp_path_factory.mktemp("noval") / "N"
    subprocess.run([sys.executable, "-m", "scaling.data.make_shards", "--from", "shapes",
                    "--num-samples", "100", "--image-size", "8", "--val-fraction", "0", "--out",
                    str(out)], capture_output=True, check=True, timeout=300)
    return out


def test_s15_data_without_a_val_split_stops_the_sweep_before_any_run(no_val, tmp_path):
    run = cli([*SWEEP, "--cluster", "local", *MU, "--data", no_val, "--results",
               tmp_path / "R"], tmp_path)
    line = one_error(run)
    assert line.startswith("sweep: error: run mu4_8st_") and "has no val split" in line
    assert "nothing was started" in line and "start " not in run.stdout
    assert not (tmp_path / "R").exists()  # no run dir, let alone a "failed" one
    # the same check, word for word, is training's own
    train = cli([sys.executable, "-m", "scaling.train", "--model", "mu/4", "--steps", "2",
                 "--data", no_val, "--out", tmp_path / "run"], tmp_path)
    said = one_error(train).split("has no val split")[1]
    assert line.split("has no val split")[1] == said + "; nothing was started"


@pytest.mark.parametrize("var, value, says", [
    ("VIT_SCALING_JPEG_DRAFT", "2", "VIT_SCALING_JPEG_DRAFT='2'; expected 0 or 1"),  # N41d
    ("VIT_SCALING_FAULTS", "nan@x", "VIT_SCALING_FAULTS item 'nan@x'"),
])
def test_n41d_a_bad_environment_variable_stops_sweep_and_training_alike(digits_data, tmp_path,
                                                                        var, value, says):
    run = cli([*SWEEP, "--cluster", "local", *MU, "--data", digits_data, "--results",
               tmp_path / "R"], tmp_path, **{var: value})
    assert says in one_error(run) and not (tmp_path / "R").exists()
    train = cli([sys.executable, "-m", "scaling.train", "--model", "mu/4", "--steps", "2",
                 "--data", digits_data, "--out", tmp_path / "run"], tmp_path, **{var: value})
    assert says in one_error(train)  # VIT_SCALING_FAULTS was a traceback here before


def test_a_slurm_dry_run_checks_the_data_too_but_makes_no_run_dir(no_val, tmp_path):
    run = cli([*SWEEP, "--cluster", "slurm", "--dry-run", *MU, "--data", no_val,
               "--results", tmp_path / "R"], tmp_path)
    assert "has no val split" in one_error(run) and not (tmp_path / "R").exists()


@pytest.mark.parametrize("text, says", [
    ("time: abc\n", "time must be a whole number (minutes), not 'abc'"),  # H7e
    ("gpus_per_node: 8.5\n", "gpus_per_node must be a whole number, not 8.5"),  # H7f
    ("setup: echo hi\n", "setup must be a list of strings, not 'echo hi'"),
    ("additional_parameters: [a]\n", "additional_parameters must be a mapping"),
])
def test_h7e_h7f_slurm_config_values_are_checked_by_type(digits_data, tmp_path, text, says):
    config = tmp_path / "slurm.yaml"
    config.write_text(text)
    run = cli([*SWEEP, "--cluster", "slurm", "--dry-run", *MU, "--data", digits_data,
               "--results", tmp_path / "R", "--slurm-config", config], tmp_path)
    assert one_error(run).startswith(f"sweep: error: --slurm-config {config}: {says}")


def full_disk(tmpfs) -> Path:
    """A 64 kB tmpfs with no page left."""
    disk = tmpfs("64k")
    with pytest.raises(OSError), open(disk / "filler", "wb") as f:
        while True:
            f.write(b"\0" * PAGE)
            f.flush()
    return disk


@pytest.mark.mount
def test_h3_results_on_a_full_disk_is_one_line_and_leaves_no_claim(digits_data, tmp_path,
                                                                    tmpfs):
    disk = full_disk(tmpfs)
    run = cli([*SWEEP, "--cluster", "local", *MU, "--data", digits_data, "--results",
               disk / "R"], tmp_path)
    line = one_error(run)
    assert "is not writable (No space left on device); nothing was started" in line
    assert "Traceback" not in run.stderr
    assert not [p for p in disk.rglob("*") if p.is_file() and p.name != "filler"]


@pytest.mark.mount
def test_h3_a_lock_taken_on_a_full_disk_leaves_no_temporary_file(tmpfs):
    disk = full_disk(tmpfs)
    with pytest.raises(OSError):  # a claim (launchers.runs.Claims.take) takes this lock
        lockfile.acquire(disk / ".claim", lockfile.identity())
    with pytest.raises(DiskFull):  # the run dir's lock, said as a full disk
        RunLock(disk).acquire()
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no .claim.TOKEN, .run.lock.*


@pytest.mark.slow
def test_h3c_a_failed_run_with_a_top1_is_not_the_best(digits_data, tmp_path):
    # evaluated at step 4 (a top-1), then the eval of step 8 raises: failed, with final_top1
    run = cli([*SWEEP, "--cluster", "local", *MU, "--set", "eval_every=4", "--data",
               digits_data, "--results", tmp_path / "R"], tmp_path,
              VIT_SCALING_FAULTS="eval_error@8")
    assert run.returncode == 1, run.stdout + run.stderr
    (final,) = (tmp_path / "R" / "demo").glob("*/final.json")
    final = json.loads(final.read_text())
    assert final["status"] == results.STATUS_FAILED and final["final_top1"] is not None
    assert ": 1 failed" in run.stdout and "best top-1" not in run.stdout

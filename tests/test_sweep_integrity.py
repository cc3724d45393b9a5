"""Sweep integrity: bad list flags and values, claims between concurrent sweeps, Ctrl-C.

Real processes throughout: sweeps run as `python launchers/sweep.py` subprocesses where a second
process or a signal is part of the story, and claims are held by live (or killed) processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers.grid import GridOptions, build_grid, parse_overrides
from launchers.presets import get_preset
from launchers.runs import CLAIM_FILE, read_job
from launchers.status import status
from launchers.sweep import main
from scaling.data import load_dataset_info
from scaling.lockfile import STALE_AFTER_S as CLAIM_STALE_S
from scaling.results import read_final, read_metrics

REPO = Path(__file__).resolve().parents[1]
SWEEP = [sys.executable, str(REPO / "launchers" / "sweep.py")]
TINY = ["--preset", "demo", "--sizes", "mu", "--budget-kind", "steps", "--set", "log_every=4",
        "--cluster", "local"]


def sweep(*argv) -> int:
    return main([str(a) for a in argv])


def run_dirs(digits_data: str, sweep_dir: Path, budgets: tuple[float, ...]) -> list[Path]:
    """The run dirs the sweep CLI gives TINY with these budgets (same ids as the CLI)."""
    opts = GridOptions(sizes=("mu",), budgets=budgets, budget_kind="steps",
                       overrides=parse_overrides(["log_every=4"]))
    specs = build_grid(get_preset("demo"), opts, load_dataset_info(digits_data), sweep_dir)
    return [s.run_dir for s in specs]


def no_claims_left(root: Path) -> bool:
    return not [p for p in root.rglob(f"{CLAIM_FILE}*")]


# -- bad input: exit 2, one line, before anything exists -----------------------------------------

@pytest.mark.parametrize("flag, value", [
    ("--sizes", ""), ("--sizes", ","), ("--sizes", " , "), ("--budgets", ""),
    ("--budgets", ",,"), ("--seeds", ""), ("--seeds", ","), ("--lrs", ""), ("--lrs", ","),
    ("--name", ""), ("--name", "a/b"), ("--data", ""), ("--results", ""),
])
def test_an_empty_list_or_value_is_an_error(flag, value, digits_data, tmp_path, capsys):
    args = {"--preset": "demo", "--sizes": "mu", "--budgets": "1e10", "--data": digits_data,
            "--results": str(tmp_path / "results"), "--cluster": "local", flag: value}
    rc = main([x for kv in args.items() for x in kv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and flag in err, err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("cluster", ["local", "slurm"])
@pytest.mark.parametrize("flags, named", [
    (["--set", "weight_decay=-1"], "weight_decay"),
    (["--lrs", "-1"], "lr"),
    (["--set", "beta1=1.5"], "beta1"),
    (["--set", "eval_every=abc"], "eval-every"),
])
def test_an_invalid_train_value_fails_before_anything_is_submitted(flags, named, cluster,
                                                                  digits_data, tmp_path, capsys):
    """Every run's TrainConfig is built (and validated) before any run is claimed, submitted
    or started; no sbatch is reached on the slurm path either (no results dir, no _submitit)."""
    rc = sweep("--preset", "demo", "--sizes", "mu", "--budgets", "1e10", "--data", digits_data,
               "--results", tmp_path / "results", "--cluster", cluster, *flags)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and named in err, err
    assert not (tmp_path / "results").exists()


# -- claims ------------------------------------------------------------------------------------

CLAIMER = """
import json, sys, time
from pathlib import Path
from launchers.runs import Claims
dirs, gate = [Path(d) for d in sys.argv[2:]], Path(sys.argv[1])
claims = Claims()
while not gate.exists():
    time.sleep(0.001)
got = [str(d) for d in dirs if claims.take(d) is None]
print(json.dumps(got), flush=True)
sys.stdin.read()  # hold the claims until the test has seen every process's
claims.close()
"""


def test_a_run_is_claimed_by_exactly_one_of_four_racing_processes(tmp_path):
    dirs = [str(tmp_path / f"run{i}") for i in range(40)]
    gate = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(gate), *dirs], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    time.sleep(1.5)  # every process imported and waits at the gate
    gate.touch()
    got = [json.loads(p.stdout.readline()) for p in procs]
    for p in procs:
        p.communicate(timeout=30)
    claimed = [d for g in got for d in g]
    assert sorted(claimed) == sorted(dirs), [len(g) for g in got]  # each once, none missing
    assert no_claims_left(tmp_path)  # each released its own


def holder(run_dir: Path) -> subprocess.Popen:
    """A live process (this host) that holds the claim of run_dir until killed."""
    code = ("import sys, time; from launchers.runs import Claims; c = Claims(); "
            "assert c.take(sys.argv[1]) is None; print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow
def test_live_claims_are_left_alone_and_stale_ones_broken(digits_data, tmp_path, capsys):
    live, dead, remote = run_dirs(digits_data, tmp_path / "demo", (4, 8, 12))
    keeper = holder(live)
    killed = holder(dead)
    killed.kill()
    killed.wait()
    remote.mkdir(parents=True)  # a sweep on another host, sharing the file system
    (remote / CLAIM_FILE).write_text(json.dumps({"host": "elsewhere.example", "pid": 1,
                                                 "since": "then", "token": "t"}))
    args = [*TINY, "--budgets", "4,8,12", "--data", digits_data, "--results", tmp_path]
    try:
        assert sweep(*args) == 0
        out = capsys.readouterr().out
        assert f"start {dead.name}" in out and read_final(dead)["status"] == "ok"
        for other in (live, remote):
            assert f"start {other.name}" not in out and read_job(other) is None
        assert f"claimed by another sweep (pid {keeper.pid} on" in out
        assert "on elsewhere.example" in out
        table = status(tmp_path)
        assert table.count(" queued ") == 2 and "1 done, 2 queued" in table, table
    finally:
        keeper.kill()
        keeper.wait()
    old = time.time() - CLAIM_STALE_S - 60  # the other host stopped touching its claim
    os.utime(remote / CLAIM_FILE, (old, old))
    assert sweep(*args) == 0
    for run in (live, dead, remote):
        assert read_final(run)["status"] == "ok" and len(read_job(run)["attempts"]) == 1, run
    assert no_claims_left(tmp_path)


@pytest.mark.slow
def test_two_sweeps_started_at_once_train_every_run_once(digits_data, tmp_path):
    args = [*TINY, "--budgets", "8,16", "--data", digits_data, "--results", str(tmp_path)]
    procs = [subprocess.Popen([*SWEEP, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=REPO) for _ in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = run_dirs(digits_data, tmp_path / "demo", (8, 16))
    for run in runs:
        starts = [out.count(f"start {run.name}") for out in outs]
        assert sorted(starts) == [0, 1], (run.name, outs)
        job = read_job(run)
        assert len(job["attempts"]) == 1 and len(job["history"]) == 1, job
        assert read_final(run)["status"] == "ok"
    assert no_claims_left(tmp_path)


# -- Ctrl-C --------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("how, signum", [("pid", signal.SIGINT), ("group", signal.SIGINT),
                                         ("pid", signal.SIGTERM)])
def test_ctrl_c_checkpoints_exits_130_and_a_rerun_resumes(how, signum, digits_data, tmp_path,
                                                          capsys):
    """A terminal's Ctrl-C signals the whole foreground process group ("group"); `kill -INT`
    the sweep alone ("pid"). The ranks run in their own sessions either way."""
    args = [*TINY, "--budgets", "400", "--data", digits_data, "--results", str(tmp_path)]
    (run,) = run_dirs(digits_data, tmp_path / "demo", (400,))
    proc = subprocess.Popen([*SWEEP, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 120
    while not read_metrics(run, strict=False) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    if how == "group":
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, (out, err)
    assert "sweep: interrupted; rerun to resume" in err and "last lines" not in out, (out, err)
    assert [a["exit"] for a in read_job(run)["attempts"]] == [75]  # checkpointed, not failed
    assert read_final(run) is None and no_claims_left(tmp_path)
    assert sweep(*args) == 0, capsys.readouterr()
    final, rows = read_final(run), read_metrics(run)
    assert final["status"] == "ok" and final["steps"] == 400
    keys = [(r["kind"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys)), "a (kind, step) counted twice"
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(4, 401, 4))
    assert [a["exit"] for a in read_job(run)["attempts"]] == [75, 0]

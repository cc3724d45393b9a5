"""Progress you can watch: [k/N] lines with each run's result, the sweep's ETA, the closing
summary with the next command, a bar on a terminal only, and `status` sorted by budget value."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from launchers.progress import duration, fit_cost, last_step
from launchers.runs import update_job
from launchers.status import status
from launchers.sweep import main
from scaling.results import read_final, write_json

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "demo", "--sizes", "mu", "--budget-kind", "steps", "--set", "log_every=4",
        "--cluster", "local", "--max-parallel", "1"]


def sweep(*argv) -> int:
    return main([str(a) for a in argv])


def test_status_sorts_budgets_by_value_and_shows_progress(tmp_path, capsys):
    sweep_dir = tmp_path / "demo"
    budgets = [3e11, 1e10, 3e9, 1e11, 3e10]  # as strings: 1e10 < 1e11 < 3e10 < 3e11 < 3e9
    for i, budget in enumerate(budgets):
        run = sweep_dir / f"mu4_{budget:g}_{i}".replace("+", "")
        update_job(run, model="mu/4", budget=budget, budget_kind="flops", total_steps=100 * i,
                   cluster="local", job_id=f"local-{i}", pids=[])
        (run / "metrics.jsonl").write_text(json.dumps(
            {"kind": "eval", "step": 10 * i, "epoch": 0.1, "images_seen": 64, "flops_seen": 1.0,
             "wall_s": 1.0, "loss": 2.0, "top1": 0.1 * i, "top5": 0.5, "num_samples": 9}) + "\n")
    update_job(sweep_dir / "m1-4_3e9_x", model="m1/4", budget=3e9, budget_kind="flops",
               total_steps=7, cluster="local", job_id="local-9", pids=[])
    by_hand = tmp_path / "demo" / "aa_by_hand"  # trained by hand: no job.json, a plan.json
    by_hand.mkdir()
    write_json(by_hand / "config.json", {"model": "mu/4", "flops": 2e10})
    write_json(by_hand / "plan.json", {"total_steps": 42})
    assert sweep("status", "--results", tmp_path) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:-1]]
    assert [(r[1], r[2]) for r in rows] == [
        ("mu/4", "3e9"), ("mu/4", "1e10"), ("mu/4", "2e10"), ("mu/4", "3e10"), ("mu/4", "1e11"),
        ("mu/4", "3e11"), ("m1/4", "3e9")]
    assert rows[0][3:6] == ["preempted", "20/200", "0.2000"]  # state, steps done/total, top-1
    assert rows[2][4] == "0/42"  # the total from plan.json
    assert status(tmp_path).endswith("7 runs: 7 preempted")  # none alive, none finished


def test_eta_model_and_durations(tmp_path):
    assert fit_cost([(1.0, 3.0), (2.0, 5.0), (3.0, 7.0)]) == pytest.approx((1.0, 2.0))
    assert fit_cost([(4.0, 2.0)]) == (0.0, 0.5)  # one run: all of its time scales
    assert fit_cost([(1.0, 5.0), (2.0, 4.0)]) == (4.5, 0.0)  # never a negative slope
    assert duration(12.34) == "12.3 s" and duration(245) == "4 min 05 s"
    assert duration(7380) == "2 h 03 min"
    rows = [json.dumps({"kind": "train", "step": s, "pad": "x" * 50}) for s in range(1, 400)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"kind": "tr')  # cut last
    assert last_step(tmp_path) == 399 and last_step(tmp_path / "none") == 0


@pytest.mark.slow
def test_local_sweep_prints_k_of_n_with_results_eta_and_a_summary(digits_data, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert sweep(*TINY, "--budgets", "8,16,24", "--data", digits_data, "--results", "res") == 0
    out = capsys.readouterr().out
    assert "\r" not in out and "FLOP" not in out, "no bar when stdout is not a terminal"
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert [line[:5] for line in lines] == ["[1/3]", "[2/3]", "[3/3]"], out
    pattern = (r"\[(\d)/3\] (mu4_(\d+)st_\w+) \(mu/4, \d+st\): done, top-1 (0\.\d{4}), "
               r"\d+\.\d s(; sweep ETA \d+\.\d s( \(rough: from one run\))?)?$")
    for k, line in enumerate(lines, 1):
        m = re.match(pattern, line)
        assert m, line
        assert float(m[4]) == pytest.approx(read_final(tmp_path / "res" / "demo" / m[2])[
            "final_top1"], abs=5e-5)
        assert bool(m[5]) == (k < 3), line  # an ETA while runs are left
    assert "(rough: from one run)" in lines[0] and "rough" not in lines[1]
    # runs this short stream their data: an input-bound line may precede next: (test_data_wait)
    tail = [line for line in out.splitlines() if not line.startswith("input-bound (")][-3:]
    assert re.match(r"sweep: 3 run\(s\) in \d+\.\d s: 3 done$", tail[0]), tail
    assert tail[1].startswith("best top-1 0.")
    assert tail[2] == "next: python analysis/plot_scaling.py --results res"
    assert sweep(*TINY, "--budgets", "8,16,24", "--data", digits_data, "--results", "res") == 0
    again = capsys.readouterr().out
    assert "nothing to submit" in again and "[1/" not in again
    # a second sweep beside it: its next command plots only its own runs
    assert sweep(*TINY, "--budgets", "8", "--data", digits_data, "--results", "res",
                 "--name", "other") == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "next: python analysis/plot_scaling.py --results res --sweep other")


@pytest.mark.slow
def test_a_terminal_shows_a_progress_bar(digits_data, tmp_path):
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "launchers" / "sweep.py"), *TINY, "--budgets", "600",
         "--data", digits_data, "--results", str(tmp_path)], stdin=subprocess.DEVNULL,
        stdout=secondary, stderr=secondary, cwd=REPO)
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO: the sweep closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert proc.wait(timeout=300) == 0
    text = b"".join(chunks).decode(errors="replace")
    bars = [part for part in text.split("\r") if part.startswith("sweep: ") and "FLOP" in part]
    assert bars and any("100%" in b and "1/1 runs" in b for b in bars), text[-2000:]
    assert re.search(r"\[1/1\] mu4_600st_\w+ \(mu/4, 600st\): done, top-1", text)

"""`sweep.py status` reads metrics.jsonl from its end (launchers.runs.read_progress,
scaling.tail): the same answer as reading it whole, on torn, eval-less and long files; and
`status --watch` refreshes a table with ETAs until Ctrl-C."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers.runs import RATE_ROWS, read_progress, update_job
from launchers.status import watch
from scaling import tail
from scaling.lockfile import pid_start
from scaling.results import METRICS_FILE, read_metrics

REPO = Path(__file__).resolve().parents[1]


def train_row(step, wall=None):
    return {"kind": "train", "step": step, "epoch": step / 100, "images_seen": 32 * step,
            "flops_seen": 1e9 * step, "wall_s": step * 0.5 if wall is None else wall,
            "loss": 2.0 + 1 / step, "lr": 1e-3, "images_per_s": 64.0, "tflops": 0.1,
            "mfu": None, "mem_gb": 0.5, "skipped_samples": 0}


def eval_row(step, top1):
    return {"kind": "eval", "step": step, "epoch": step / 100, "images_seen": 32 * step,
            "flops_seen": 1e9 * step, "wall_s": step * 0.5, "loss": 1.5, "top1": top1,
            "top5": 0.9, "num_samples": 180}


def lines(rows):
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


EVAL_FAR = [train_row(s) for s in range(1, 11)] + [eval_row(10, 0.25)] + [
    train_row(s) for s in range(11, 3001)]  # ~700 KB of train rows after the only eval
FILES = {
    "torn last line": lines([train_row(1), eval_row(1, 0.5), train_row(2)]) + '{"kind": "ev',
    "no eval rows": lines(train_row(s) for s in range(1, 400)),
    "eval far from the end": lines(EVAL_FAR),
    "eval without top1, bad lines": lines([eval_row(5, 0.75), train_row(6)]) + "not json\n"
    + '{"kind": "eval", "step": 7}\n' + lines([eval_row(8, None), train_row(9)]),
    "last line without newline": lines([train_row(1), eval_row(2, 0.5)]).rstrip("\n"),
    "empty": "",
    "blank lines and CRLF": lines([eval_row(3, 0.125)]).replace("\n", "\r\n") + "\n\n",
}


def full_reader(run_dir):
    """The status of before: read_metrics whole (launchers.runs.progress as it was)."""
    rows = read_metrics(run_dir, strict=False)
    evals = [r for r in rows if r["kind"] == "eval" and r.get("top1") is not None]
    return max((r["step"] for r in rows), default=0), evals[-1]["top1"] if evals else None


@pytest.mark.parametrize("name", sorted(FILES))
def test_tail_reader_gives_the_full_readers_answer(tmp_path, name):
    (tmp_path / METRICS_FILE).write_text(FILES[name])
    done = read_progress(tmp_path)
    assert (done.steps, done.top1) == full_reader(tmp_path)
    for block in (7, 100, tail.BLOCK):  # lines across block boundaries
        rows = list(tail.reverse_rows(tmp_path / METRICS_FILE, block=block))
        assert rows[::-1] == read_metrics(tmp_path, strict=False)


def test_tail_reader_answers_and_reads_little(tmp_path):
    (tmp_path / METRICS_FILE).write_text(FILES["eval far from the end"])
    done = read_progress(tmp_path, RATE_ROWS)
    assert (done.steps, done.top1) == (3000, 0.25)
    assert done.rate == pytest.approx(2.0)  # steps per second of wall_s over the last rows
    assert read_progress(tmp_path).rate is None  # the plain table: one row, no rate
    assert read_progress(tmp_path / "nothing").steps == 0


def test_rows_at_the_resume_step(tmp_path):
    rows = [train_row(5), eval_row(5, 0.1), train_row(10), eval_row(10, 0.2)]
    (tmp_path / METRICS_FILE).write_text(lines(rows))
    assert tail.rows_at_step(tmp_path / METRICS_FILE, 10) == rows[2:]
    assert tail.rows_at_step(tmp_path / METRICS_FILE, 12) == []


def running_run(root, name, steps, total):
    """A run whose job is this live process, with train rows at 2 steps per second."""
    run = root / "sweep" / name
    update_job(run, model="mu/4", budget=float(total), budget_kind="steps", total_steps=total,
               cluster="local", job_id=f"local-{os.getpid()}", host=socket.gethostname(),
               pids=[[os.getpid(), pid_start(os.getpid())]])
    (run / METRICS_FILE).write_text(lines([train_row(s) for s in range(10, steps + 1, 10)]
                                          + [eval_row(steps, 0.5)]))
    return run


def test_watch_shows_an_eta_per_running_run(tmp_path):
    running_run(tmp_path, "a", 200, 1000)  # 800 steps to go at 2 steps/s
    stream = io.StringIO()
    watch(tmp_path, 0.01, stream, times=2)
    tables = stream.getvalue().split("every 0.01 s, Ctrl-C to stop")[1:]
    assert len(tables) == 2
    row = next(line for line in tables[-1].splitlines() if line.startswith("sweep/a"))
    assert "running" in row and "200/1000" in row and "0.5000" in row
    assert row.endswith("6 min 40 s")


def default_sigint() -> None:
    """In the child before exec: SIGINT back to its default (exec keeps an ignored signal)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_watch_until_ctrl_c_exits_130(tmp_path):
    running_run(tmp_path, "a", 200, 1000)
    # A suite started in the background (nohup ... &, a batch job) hands its children SIGINT
    # ignored: restore the default so the test checks the program, not the caller's shell.
    proc = subprocess.Popen([sys.executable, str(REPO / "launchers" / "sweep.py"), "status",
                             "--results", str(tmp_path), "--watch", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)  # noqa: PLW1509 (resets one signal)
    seen, t0 = "", time.time()
    while seen.count("runs: 1 running") < 2:  # two refreshes
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < 120, seen
        seen += proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "resume" not in err  # a watch has nothing to resume


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_watch_refuses_a_bad_interval(tmp_path, value):
    run = subprocess.run([sys.executable, str(REPO / "launchers" / "sweep.py"), "status",
                          "--results", str(tmp_path), f"--watch={value}"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("sweep: error: --watch")

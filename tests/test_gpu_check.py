"""The GPU check keeps working without a GPU: `--dry-run` runs every stage at toy sizes on the
CPU and writes every file a lent GPU's run would write (at most 8, none in subfolders: what the
device tool brings back)."""

import json
import subprocess
import sys

import pytest


def run(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "scaling.bench.gpu_check", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_writes_every_file(tmp_path):
    out = tmp_path / "out"
    proc = run("--dry-run", out, "--work-dir", tmp_path / "work")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["env.jsonl", "fork.jsonl", "loader.jsonl", "report.txt", "stages.jsonl",
                     "stages.log", "throughput.jsonl"]
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert all(s["status"] == "ok" or (s["status"] == "skipped" and s["reason"])
               for s in stages), stages
    ran = {s["stage"] for s in stages if s["status"] == "ok"}
    assert {"env", "B/16-zero0", "B/16-zero2", "B/16-compiled-transformers", "loader-run",
            "fork-sweep"} <= ran
    rows = [json.loads(line) for line in (out / "throughput.jsonl").read_text().splitlines()]
    assert {(r["impl"], r["engine"], r["zero"], r["compile"]) for r in rows} >= {
        ("ours", "bare", 0, False), ("transformers", "bare", 0, False),
        ("ours", "deepspeed", 0, False), ("ours", "deepspeed", 2, False),
        ("ours", "bare", 0, True)}
    loader = json.loads((out / "loader.jsonl").read_text())
    assert loader["status"] == "ok" and 0 <= loader["data_wait_fraction"] <= 1
    fork = json.loads((out / "fork.jsonl").read_text())
    assert fork["sweep_ok"] and fork["finals"] == ["ok"]
    assert "dry run" in proc.stdout and "img/s" in proc.stdout


@pytest.mark.parametrize("args, message", [
    ([], "give OUT"),
    (["out", "--budget-s", "0"], "--budget-s must be positive"),
    (["out", "--wheels", "/nonexistent"], "--wheels /nonexistent is not a folder"),
])
def test_bad_flags_fail_with_one_line(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "scaling.bench.gpu_check", *args],
                          capture_output=True, text=True, timeout=120, check=False,
                          cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()

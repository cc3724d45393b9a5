"""Sweep overhead: the share of a training run's wall time spent outside optimizer steps.

    python -m scaling.bench --overhead [--sizes m2/4] [--steps 100] [--batch-size 64]
                            [--data shapes] [--train-args "--eval-every 50"]

Builds a built-in data set (scaling.data.make_builtin_shards), runs `python -m scaling.train` in
a fresh run dir as a subprocess (as the sweep launcher does), and splits the process's wall time
into the parts that the run itself measured (final.json's `overhead_breakdown_s`, see
scaling.results: startup, build, data_wait, eval, checkpoint, export, steps, other) plus `exit`:
the parent's clock minus final.json's wall time (tearing down the process group, interpreter
exit).

train.py's own `overhead_fraction` covers process start to final.json; `process_overhead_fraction`
adds the exit. `first_window_excess_s` (not part of the sum) is how much longer the first logging
window took than the median window: one-off start-up inside the first steps (first-batch latency
of the loader workers, lazy kernel set-up), counted as steps/data_wait.
"""

from __future__ import annotations

import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scaling import bench_env, results

DEFAULT_OUT = "results/bench/overhead.jsonl"
DEFAULT_MODEL = "m2/4"
DEFAULT_STEPS = 100
DEFAULT_BATCH = 64


def windows(metrics: list[dict], batch: int) -> list[tuple[int, float]]:
    """(steps, seconds) of each train row's logging window (eval/checkpoint time excluded)."""
    out, done = [], 0
    for r in metrics:
        if r["kind"] == "train":
            out.append((r["step"] - done, (r["step"] - done) * batch / r["images_per_s"]))
            done = r["step"]
    if not out:
        raise ValueError("the run logged no train rows; lower --log-every")
    return out


def first_window_excess(metrics: list[dict], batch: int) -> float:
    """Seconds the first window took beyond the median window's pace (0 with one window)."""
    wins = windows(metrics, batch)
    pace = statistics.median(seconds / steps for steps, seconds in wins)
    return max(0.0, wins[0][1] - wins[0][0] * pace)


def breakdown(process_s: float, final: dict) -> dict:
    """Seconds per part of the run (module docstring); the parts sum to process_s."""
    parts = dict(final["overhead_breakdown_s"])
    parts["exit"] = process_s - final["wall_hours"] * 3600
    return parts


def run_demo(cmd: list[str]) -> float:
    """Run the training command; its wall seconds (raises on a failed run)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-6000:], file=sys.stderr)
        raise RuntimeError(f"the demo run exited with {proc.returncode}: {shlex.join(cmd)}")
    return seconds


def run_overhead(args) -> int:
    """The --overhead mode: one demo run, its overhead and breakdown printed and appended."""
    from scaling.data import make_builtin_shards

    model = args.size_list[0] if args.size_list else DEFAULT_MODEL
    steps, batch = args.steps or DEFAULT_STEPS, args.batch_size or DEFAULT_BATCH
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="vit-overhead-"))
    t0 = time.perf_counter()
    info = make_builtin_shards(args.data, work / args.data)
    data_s = time.perf_counter() - t0
    run_dir = work / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [sys.executable, "-m", "scaling.train", "--model", model, "--data", str(info.root),
           "--out", str(run_dir), "--steps", str(steps), "--batch-size", str(batch),
           "--no-progress", *shlex.split(args.train_args)]
    process_s = run_demo(cmd)
    final = results.read_final(run_dir)
    metrics = results.read_metrics(run_dir)
    parts = breakdown(process_s, final)
    row = {
        "kind": "overhead", "model": model, "steps": steps, "batch_size": batch,
        "data": args.data, "command": shlex.join(cmd[1:]), "process_s": process_s,
        "overhead_fraction": final["overhead_fraction"],
        "process_overhead_fraction": 1.0 - parts["steps"] / process_s,
        "breakdown_s": parts, "first_window_excess_s": first_window_excess(metrics, batch),
        "data_build_s": data_s, "world_size": final["world_size"],
        "device": bench_env.device_name(_device()), "versions": bench_env.versions(),
        "time": bench_env.now(),
    }
    _print(row)
    path = bench_env.append_rows(args.out or DEFAULT_OUT, [row])
    print(f"row appended to {path}")
    return 0


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _print(row: dict) -> None:
    print(f"demo run: {row['command']}")
    print(f"process wall {row['process_s']:.1f} s; train.py overhead_fraction "
          f"{row['overhead_fraction']:.3f}; of the whole process "
          f"{row['process_overhead_fraction']:.3f}")
    for name, seconds in row["breakdown_s"].items():
        print(f"  {name:>17} {seconds:8.2f} s  {seconds / row['process_s']:6.1%}")
    print(f"  of which the first log window's excess over the median pace: "
          f"{row['first_window_excess_s']:.2f} s")

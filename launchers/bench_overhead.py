"""Sweep overhead: the share of a training run's wall time spent outside optimizer steps.

    python -m launchers.bench_overhead [--sizes m2/4] [--steps 4000] [--batch-size 64]
                                   [--data digits] [--launch both|fork|process] [--train-args "..."]

One demo run started both ways the launchers start runs (forked by launchers/zygote.py, or a
fresh process as on SLURM). What is measured, and the figures: docs/benchmarks.md (section 3).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launchers import zygote
from launchers.presets import demo
from scaling import results
from scaling.bench import env as bench_env
from scaling.clihelp import OneLineErrorParser
from scaling.config import TrainConfig
from scaling.data import make_builtin_shards
from scaling.dist import fresh_env
from scaling.model import vit_config

DEFAULT_OUT = "results/bench/local/overhead.jsonl"  # git-ignored
DEFAULT_MODEL = "m2/4"
DEFAULT_STEPS = 4000  # about a minute for m2/4 on one core of the 2-core CPU
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


def _train_args(model: str, data: str, out: Path, steps: int, batch: int, extra: str
                ) -> list[str]:
    """scaling.train flags of a demo-preset run of `model` (launchers.presets.demo)."""
    preset = demo()
    cfg = TrainConfig(model=model, data=data, out=str(out), steps=steps, batch_size=batch,
                      lr=preset.lr(batch_size=batch), **preset.train)
    return [*cfg.to_args(), *shlex.split(extra)]


def _env() -> dict:
    return fresh_env(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # one thread: demo preset


def run_process(argv: list[str], log: Path) -> float:
    """A fresh `python -m scaling.train` process; its wall seconds (raises on a failure)."""
    cmd = [sys.executable, "-m", "scaling.train", *argv]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                            check=False).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"the demo run exited with {rc}: {shlex.join(cmd)} (log {log})")
    return seconds


def run_forked(server, argv: list[str], log: Path) -> float:
    """The run as a child of the fork server; its wall seconds (raises on a failure)."""
    t0 = time.perf_counter()
    proc = server.spawn(argv, env=_env(), cwd=os.getcwd(), log=str(log))
    while proc.poll() is None:
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    if proc.poll() != 0:
        raise RuntimeError(f"the forked demo run exited with {proc.poll()} (log {log})")
    return seconds


def run_overhead(args) -> int:
    """One demo run per launch path; rows printed and appended to args.out."""
    model, steps, batch = args.sizes, args.steps, args.batch_size
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="vit-overhead-"))
    t0 = time.perf_counter()
    info = make_builtin_shards(args.data, work / args.data, **demo().data_args)
    data_s = time.perf_counter() - t0
    rows = []
    for launch in ("fork", "process") if args.launch == "both" else (args.launch,):
        run_dir = work / f"run-{launch}-{time.strftime('%Y%m%d-%H%M%S')}"
        argv = _train_args(model, str(info.root), run_dir, steps, batch, args.train_args)
        log = work / f"{run_dir.name}.log"
        server_s = None
        if launch == "fork":
            t0 = time.perf_counter()
            server = zygote.ForkServer(work / "fork_server.log")
            server_s = time.perf_counter() - t0
            try:
                process_s = run_forked(server, argv, log)
            finally:
                server.close()
        else:
            process_s = run_process(argv, log)
        final = results.read_final(run_dir)
        metrics = results.read_metrics(run_dir)
        parts = breakdown(process_s, final)
        row = {
            "kind": "overhead", "model": model, "steps": steps, "batch_size": batch,
            "data": args.data, "launch": launch, "server_start_s": server_s,
            "command": shlex.join(["-m", "scaling.train", *argv]), "process_s": process_s,
            "overhead_fraction": final["overhead_fraction"],
            "process_overhead_fraction": 1.0 - parts["steps"] / process_s,
            "breakdown_s": parts, "first_window_excess_s": first_window_excess(metrics, batch),
            "data_build_s": data_s, "world_size": final["world_size"], "threads": 1,
            "device": bench_env.device_name(_device()), "versions": bench_env.versions(),
            "time": bench_env.now(),
        }
        _print(row)
        rows.append(row)
    path = bench_env.append_rows(args.out, rows)
    print(f"{len(rows)} row(s) appended to {path}")
    return 0


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _print(row: dict) -> None:
    started = (f"forked by the fork server (its start-up: {row['server_start_s']:.1f} s, once "
               "per sweep)" if row["launch"] == "fork" else "a fresh process")
    print(f"demo run, {started}: {row['command']}")
    print(f"process wall {row['process_s']:.1f} s; train.py overhead_fraction "
          f"{row['overhead_fraction']:.3f}; of the whole process "
          f"{row['process_overhead_fraction']:.3f}")
    order = ("startup", "build", "steps", "data_wait", "eval", "checkpoint", "export", "other",
             "exit")  # a run's time line; any other part after them
    parts = row["breakdown_s"]
    for name in sorted(parts, key=lambda n: order.index(n) if n in order else len(order)):
        seconds = parts[name]
        print(f"  {name:>17} {seconds:8.2f} s  {seconds / row['process_s']:6.1%}")
    print(f"  of which the first log window's excess over the median pace: "
          f"{row['first_window_excess_s']:.2f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The CLI; a bad value exits with code 2 and one line naming the flag, before any work."""
    p = OneLineErrorParser(prog="python -m launchers.bench_overhead",
                           description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=DEFAULT_MODEL, help="the one ViT of the demo run")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="the run's optimizer steps")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="global batch")
    p.add_argument("--data", default="digits", choices=("digits", "shapes"),
                   help="built-in data set (the demo preset's: digits)")
    p.add_argument("--launch", default="both", choices=("both", "fork", "process"),
                   help="start the run as --cluster local does (fork), as a SLURM task does "
                   "(process), or both")
    p.add_argument("--work-dir", help="data and run folder (default: a temp dir)")
    p.add_argument("--train-args", default="", help="extra scaling.train flags")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON-lines file to append to "
                   "(git-ignored by default)")
    args = p.parse_args(argv)
    if "," in args.sizes or not args.sizes.strip():
        p.error(f"--sizes {args.sizes!r}: the overhead benchmark runs one model")
    try:
        vit_config(args.sizes)
        shlex.split(args.train_args)
        for name in ("steps", "batch_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if args.work_dir and Path(args.work_dir).exists() and not Path(args.work_dir).is_dir():
            raise ValueError(f"--work-dir {args.work_dir} exists and is not a directory")
        bench_env.check_out(args.out, "--out")
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    return run_overhead(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

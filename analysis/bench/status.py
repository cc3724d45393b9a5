"""Benchmark of `sweep.py status` at the scale of a study: the status table as it is (metrics.jsonl
read from its end) next to the table of before (every file parsed whole), and the CLI.

    python -m analysis.bench.status --runs 5000 --rows 2000 --out-dir /tmp/bench_status

What it writes and the figures: docs/sweeps.md ("Progress and status").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import launchers.status as status_mod
from analysis.bench.load import add_tree_args, prepared_tree
from launchers.runs import Progress, read_progress
from scaling.results import read_metrics

REPO = Path(__file__).resolve().parents[2]


def full_progress(run_dir: Path, rate_rows: int = 1) -> Progress:
    """The reference: launchers.runs.progress of before, which parsed the whole file (no
    rate: the table of before had no ETA)."""
    try:
        rows = read_metrics(run_dir, strict=False)
    except (OSError, ValueError):
        rows = []
    evals = [r for r in rows if r["kind"] == "eval" and r.get("top1") is not None]
    return Progress(max((r["step"] for r in rows), default=0),
                    evals[-1]["top1"] if evals else None)


@contextlib.contextmanager
def reading_whole():
    """status() with the reference reader in place of read_progress."""
    status_mod.read_progress = full_progress
    try:
        yield
    finally:
        status_mod.read_progress = read_progress


def _timed(fn, *args):
    t = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - t, value


def _line(what: str, seconds: float, extra: str = "") -> None:
    load = os.getloadavg()[0]
    print(f"{what:<44} {seconds:8.2f} s   (load {load:.1f}){extra}", flush=True)


def measure(tree: Path) -> None:
    """Time both tables and the CLI; say whether the tables are the same."""
    status_mod.status(tree)  # warm: the same page cache and imports for both
    tries = [_timed(status_mod.status, tree) for _ in range(3)]
    new_s, new = min(tries, key=lambda t: t[0])
    _line("status, tail reader (in process, best of 3)", new_s,
          f"   (tries {', '.join(f'{t:.2f}' for t, _ in tries)} s)")
    with reading_whole():
        ref_s, ref = _timed(status_mod.status, tree)
    _line("status, whole files (before)", ref_s,
          f"   speed-up {ref_s / new_s:.0f}x, tables {'same' if new == ref else 'DIFFER'}")
    t = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "launchers" / "sweep.py"), "status", "--results",
                    str(tree)], check=True, stdout=subprocess.DEVNULL)
    _line("status, CLI (sweep.py status)", time.perf_counter() - t,
          "   (interpreter start and imports included)")


def main(argv=None) -> int:
    """python -m analysis.bench.status [--runs 5000] [--rows 2000] --out-dir DIR"""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_tree_args(p, "the tree goes")
    args = p.parse_args(argv)
    if min(args.runs, args.rows, args.eval_every) < 1:
        p.error("--runs, --rows and --eval-every must be positive")
    with prepared_tree(args) as tree:
        measure(tree)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark rows for the throughput figure: the committed reference rows of
RESULTS/bench/*.jsonl and the rows this machine's benchmark appends to the git-ignored
RESULTS/bench/local/*.jsonl (scaling.bench's default --out), each row with the file it came from
(`source`, relative to RESULTS/bench: "bench.jsonl" or "local/bench.jsonl")."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from analysis.load.skips import Skipped, skip
from scaling.vitconfig import split_name

# Rows of scaling.bench's other modes (docs/benchmarks.md), valid but not throughput rows.
OTHER_BENCH_KINDS = ("zero_memory", "overhead", "host_stage", "host_cores")
LOCAL_DIR = "local"


def bench_files(results_dir) -> list[Path]:
    """RESULTS/bench/*.jsonl, then RESULTS/bench/local/*.jsonl, each sorted."""
    bench = Path(results_dir) / "bench"
    return sorted(bench.glob("*.jsonl")) + sorted((bench / LOCAL_DIR).glob("*.jsonl"))


def _rows(path: Path, source: str, skipped: list[Skipped]) -> list[dict]:
    """The throughput rows of one file; bad lines are skipped and reported."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        skip(skipped, path, e)
        return []
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if isinstance(row, dict) and row.get("kind") in OTHER_BENCH_KINDS:
                continue
            if not isinstance(row, dict) or "model" not in row or "images_per_s" not in row:
                raise ValueError("expected an object with 'model' and 'images_per_s'")
            split_name(row["model"])
        except ValueError as e:  # JSONDecodeError is a ValueError
            skip(skipped, path, e, i)
            continue
        rows.append({"impl": "unspecified", **row, "source": source})
    return rows


def load_bench(results_dir) -> tuple[pd.DataFrame, list[Skipped]]:
    """Throughput rows of every bench file (empty frame if none), `source` naming the file;
    rows of the other benchmark modes are left out."""
    rows, skipped = [], []
    bench = Path(results_dir) / "bench"
    for path in bench_files(results_dir):
        rows += _rows(path, str(path.relative_to(bench)), skipped)
    return pd.DataFrame(rows), skipped

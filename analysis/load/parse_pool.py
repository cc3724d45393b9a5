"""Parsing many metrics files at once, in worker processes (fresh interpreters fed file names on
stdin): a cold load of a study is CPU-bound in analysis.load.metrics_file. analysis.load.runs
uses the results in run order, as a one-process load would. Why workers are fresh interpreters:
analysis/README.md ("Speed").
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

from analysis.load.metrics_file import parse_metrics

# Below this many bytes to parse, one process is faster than starting workers.
MIN_BYTES = 64 << 20
MAX_WORKERS = 8
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def read_and_parse(path: str):
    """(Parsed, stat before, stat after, read time ns) of one metrics file, or the OSError
    reading it raised (handed back, to be reported where a one-process load reports it)."""
    try:
        with open(path, "rb") as f:
            before, read_ns = os.fstat(f.fileno()), time.time_ns()
            data = f.read()
            after = os.fstat(f.fileno())
    except OSError as e:
        return e
    return parse_metrics(data), before, after, read_ns


def default_workers() -> int:
    """The CPUs this process may use, at most MAX_WORKERS."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_WORKERS))


def _shares(paths: list[Path], sizes: list[int], workers: int) -> list[list[Path]]:
    """The paths split into `workers` lists of about equal bytes (largest files first)."""
    shares: list[list[Path]] = [[] for _ in range(workers)]
    load = [0] * workers
    for size, path in sorted(zip(sizes, paths), key=lambda sp: -sp[0]):
        i = load.index(min(load))
        shares[i].append(path)
        load[i] += size
    return [s for s in shares if s]


def _start(share: list[Path]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "analysis.load.parse_pool"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    proc.stdin.write(json.dumps([str(p) for p in share]).encode())
    proc.stdin.close()
    return proc


def parse_all(paths: list[Path], workers: int | None = None,
              min_bytes: int = MIN_BYTES) -> dict[Path, object]:
    """read_and_parse of every path, in `workers` processes (default: default_workers()), or
    {} when there is too little to parse (under `min_bytes`) or one worker: then the caller
    reads the files itself (as it does for any file a worker could not hand back)."""
    workers = default_workers() if workers is None else workers
    sizes = []
    for p in paths:
        try:
            sizes.append(p.stat().st_size)
        except OSError:
            sizes.append(0)
    if workers < 2 or len(paths) < 2 or sum(sizes) < min_bytes:
        return {}
    out: dict[Path, object] = {}
    procs = [(share, _start(share)) for share in _shares(paths, sizes, workers)]
    for share, proc in procs:
        data = proc.stdout.read()
        if proc.wait() == 0:
            out.update(zip(share, pickle.loads(data)))
    return out


def main() -> int:
    """Worker: file names (a JSON list) on stdin, the pickled results on stdout."""
    paths = json.loads(sys.stdin.buffer.read())
    sys.stdout.buffer.write(pickle.dumps([read_and_parse(p) for p in paths]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

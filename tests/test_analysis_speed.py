"""The fast loader (analysis.load.metrics_file, analysis.load.cache) gives what the reference loader of
before it gives (analysis.bench.load_reference), on trees with every kind of bad line; the cache
follows every change of a file and survives a killed write. Trees are written with the
scaling.results writers, the bad lines raw. Speed itself is measured by the benchmark
(python -m analysis.bench.load), not here."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.bench import load_reference
from analysis.bench.load import train_line
from analysis.load.cache import GITIGNORE, RACY_S, cache_path
from analysis.load.metrics_file import TRAIN_LINE
from analysis.load.parse_pool import parse_all
from analysis.load.runs import load_results
from analysis.synthetic import SIZES, write_run
from scaling.results import append_metrics, truncate_metrics, validate_row

REPO = Path(__file__).resolve().parents[1]
MODEL, PARAMS, MACS = SIZES[1]


def _eval(step, top1=0.5, **extra):
    return {"kind": "eval", "step": step, "epoch": step / 10, "images_seen": 1000 * step,
            "flops_seen": 6.0 * MACS * 1000 * step, "wall_s": 10.0 * step, "loss": 1.0,
            "top1": top1, "top5": 0.9 if top1 is None else min(1.0, top1 + 0.1),
            "num_samples": 100, **extra}


def _train(step, **extra):
    return {"kind": "train", "step": step, "epoch": step / 10, "images_seen": 1000 * step,
            "flops_seen": 6.0 * MACS * 1000 * step, "wall_s": 10.0 * step, "loss": 2.0 / step,
            "lr": 1e-3 / step, "images_per_s": 100.0, "tflops": 1.5, "mfu": None,
            "mem_gb": 1.0, "skipped_samples": 0, **extra}


def _canonical(row) -> str:
    return json.dumps(row, sort_keys=True)


GOOD = _canonical(_train(7))
# Lines a broken writer, a torn disk or another program may leave; most look like train rows.
BAD_LINES = [
    "garbage", b"\xff\xfe binary \x00", "[1, 2]", "5", '{"kind": "test", "step": 3}',
    '{"kind": "eval", "step": 3}', GOOD[:-1], GOOD[:80], GOOD + GOOD, GOOD + " junk",
    GOOD.replace('"loss": 0.2857142857142857', '"loss": 0.28.5'),
    GOOD.replace('"loss": 0.2857142857142857', '"loss": NaN'),
    GOOD.replace('"skipped_samples": 0', '"skipped_samples": 00'),
    GOOD.replace('"mfu": null', '"mfu": nul'),
    GOOD.replace('"kind": "train"', '"kind": "trian"'),
    GOOD.replace('"kind": "train", ', ""),
    GOOD.replace('"lr": 0.00014285714285714287, ', ""),
    GOOD.replace('"step": 7', '"step": 7, "kind": "eval"'),  # duplicate key: eval, last wins
    GOOD.encode().replace(b"train", b"tr\xe4in"),
    "   ", "\t",
    _canonical(_eval(40, top1=1.7, top5=1.0)), _canonical(_eval(41, top1=None)),
    _canonical(_eval(42, num_samples=0)), _canonical(_eval(43, loss="abc")),
    _canonical({**_eval(44), "step": 4.5}),
]


def _run(run_dir: Path, rows: list[dict]) -> Path:
    """A finished run (final.json from its eval rows) whose metrics.jsonl holds `rows`."""
    run = write_run(run_dir, MODEL, PARAMS, MACS, [r for r in rows if r["kind"] == "eval"])
    (run / "metrics.jsonl").unlink()
    for row in rows:
        append_metrics(run, row)
    return run


def _write_lines(run: Path, lines, newline=b"\n", final_newline=True) -> None:
    with open(run / "metrics.jsonl", "wb") as f:
        for i, line in enumerate(lines):
            f.write(line if isinstance(line, bytes) else line.encode())
            if final_newline or i < len(lines) - 1:
                f.write(newline)


def _bad_tree(root: Path) -> Path:
    """Runs holding every kind of bad line among canonical and hand-written rows."""
    rows = [_train(1), _eval(1, 0.4), _train(2), _eval(2, 0.5), _train(3), _eval(3, 0.6)]
    lines = [_canonical(r) for r in rows]
    runs = {}
    for name in ("bad", "crlf", "torn", "dups", "good", "foreign"):
        runs[name] = _run(root / "s" / name, rows)
    usable = [b for b in BAD_LINES if "abc" not in str(b)]  # the reference raises on that one
    _write_lines(runs["bad"], lines[:3] + usable + lines[3:])
    _write_lines(runs["crlf"], lines[:2] + ["\r", "x\ry"] + lines[2:], newline=b"\r\n")
    _write_lines(runs["torn"], lines + [GOOD[:50]], final_newline=False)
    _write_lines(runs["dups"], lines + [lines[3], _canonical(_eval(2, 0.9)), lines[5]])
    _write_lines(runs["foreign"], [json.dumps(r) for r in rows] + ["", GOOD])  # unsorted keys
    return root


def _assert_same(a, b):
    pd.testing.assert_frame_equal(a.evals, b.evals)
    pd.testing.assert_frame_equal(a.runs, b.runs)
    assert a.skipped == b.skipped


def _settle(root: Path) -> None:
    """Wait until every file is older than the cache's racy window, so entries are stored."""
    newest = max(os.stat(p).st_ctime for p in root.rglob("*") if p.is_file())
    time.sleep(max(0.0, newest + RACY_S + 0.05 - time.time()))


def test_fast_loader_and_cache_match_the_reference_on_every_bad_line(tmp_path):
    assert len({str(b) for b in BAD_LINES}) == len(BAD_LINES)  # each edit really happened
    root = _bad_tree(tmp_path / "results")
    _settle(root)
    ref = load_reference.load_results(root)
    assert len(ref.skipped) >= 25  # the tree really exercises the skip rules
    plain = load_results(root)
    cold = load_results(root, cache_dir=tmp_path / "cache")
    warm = load_results(root, cache_dir=tmp_path / "cache")
    assert cold.cache["parsed"] == 6 and warm.cache["hits"] == 6 and warm.cache["parsed"] == 0
    for res in (plain, cold, warm):
        _assert_same(res, ref)


def test_parsing_in_worker_processes_gives_the_same_tables(tmp_path):
    """A cold load of many files parses them in worker processes (analysis.load.parse_pool); what
    it reports, and in what order, is what one process reports."""
    root = _bad_tree(tmp_path / "results")
    for i in range(6):
        _run(root / "s" / f"extra{i}", [_train(1), _eval(1, 0.3 + 0.05 * i)])
    _settle(root)
    paths = sorted(root.rglob("metrics.jsonl"))
    assert len(parse_all(paths, workers=2, min_bytes=0)) == len(paths)  # really in workers
    assert parse_all(paths, workers=2) == {}  # too little to parse: not worth the workers
    ref = load_reference.load_results(root)
    _assert_same(load_results(root, workers=1), ref)
    _assert_same(load_results(root, workers=2), ref)  # asked for by number: used
    res = load_results(root, cache_dir=tmp_path / "cache", workers=2)
    _assert_same(res, ref)
    assert res.cache["parsed"] == len(paths)
    assert load_results(root, cache_dir=tmp_path / "cache").cache["hits"] == len(paths)


def test_a_non_number_in_an_unchecked_eval_field_is_a_skipped_line(tmp_path):
    """loss "abc" made the reference loader raise; the fast one skips and names the line."""
    run = write_run(tmp_path / "s" / "r", MODEL, PARAMS, MACS, [_eval(1)])
    append_metrics(run, _eval(2, loss="abc"))
    append_metrics(run, _eval(3, wall_s=True))
    res = load_results(tmp_path)
    assert [(s.line, s.reason) for s in res.skipped] == [
        (2, "loss='abc' is not a number (nor null)"), (3, "wall_s=True is not a number (nor null)")]
    assert res.evals["step"].tolist() == [1.0]
    with pytest.raises(ValueError):
        load_reference.load_results(tmp_path)


def test_train_lines_of_the_writer_take_the_fast_path(tmp_path):
    """Every train row append_metrics writes is in TRAIN_LINE's form (else it is parsed: right,
    but slow), whatever its numbers."""
    rng = np.random.default_rng(0)
    values = [0, 1, -3, 10**20, 0.0, -0.5, 1e-300, 5e-324, 1.7976931348623157e308, 1e16,
              123456.789, float("nan"), float("inf"), None]
    for i in range(300):
        row = _train(int(rng.integers(0, 10**9)))
        for key in ("epoch", "loss", "lr", "images_per_s", "tflops", "mfu", "mem_gb", "wall_s"):
            row[key] = values[i % len(values)] if rng.random() < 0.3 else float(rng.lognormal())
        if i % 2:  # rows with data_wait_fraction (TRAIN_OPTIONAL) and rows of before it
            row["data_wait_fraction"] = values[i % 5] if i % 3 else float(rng.uniform())
        append_metrics(tmp_path, row)
    lines = (tmp_path / "metrics.jsonl").read_bytes().splitlines()
    assert len(lines) == 300 and all(TRAIN_LINE.fullmatch(line) for line in lines)
    line = train_line(5, 1280, 1e9, 1.5, 2.0, 1e-3, None).encode().rstrip(b"\n")
    assert TRAIN_LINE.fullmatch(line)  # the benchmark's fast writer too


def test_train_line_form_accepts_nothing_the_parser_would_reject():
    """Random byte edits of canonical train lines: whatever TRAIN_LINE accepts is valid UTF-8,
    valid JSON and a schema-valid train row (so dropping it unparsed loses nothing)."""
    rng = np.random.default_rng(1)
    alphabet = b'0123456789.eE+-"{}:, nulltrainkindx\\\n\xff'
    base = [_canonical(_train(s, mfu=0.41)).encode() for s in (1, 12, 345)] + [GOOD.encode()]
    base.append(_canonical(_train(6, data_wait_fraction=0.25)).encode())
    accepted = 0
    for _ in range(20_000):
        line = bytearray(base[int(rng.integers(len(base)))])
        for _ in range(int(rng.integers(1, 4))):
            pos, op = int(rng.integers(len(line))), rng.integers(3)
            char = alphabet[int(rng.integers(len(alphabet)))]
            if op == 0:
                line[pos] = char
            elif op == 1:
                line.insert(pos, char)
            elif len(line) > 1:
                del line[pos]
        if TRAIN_LINE.fullmatch(bytes(line)):
            accepted += 1
            row = json.loads(bytes(line).decode("utf-8"))
            assert isinstance(row, dict) and validate_row(row)["kind"] == "train"
    assert accepted > 1000  # digit edits keep many lines valid: the check is exercised


def _tree(root: Path, n: int = 4, steps: int = 5) -> dict:
    """n runs of `steps` train and eval rows each (top-1 with noise: rows that do not
    compress)."""
    rng = np.random.default_rng(n)
    runs = {}
    for i in range(n):
        rows = [r for s in range(1, steps + 1)
                for r in (_train(s), _eval(s, float(rng.uniform(0.3, 0.6)) + 0.01 * s))]
        runs[i] = _run(root / "s" / f"r{i}", rows)
    return runs


def _check(root: Path, cache: Path, hits: int, same: bool = True):
    """Load through the cache: `hits` files reused, and (`same`) what the reference reads."""
    res = load_results(root, cache_dir=cache)
    if same:
        _assert_same(res, load_reference.load_results(root))
    assert res.cache["hits"] == hits
    return res


def test_every_change_of_a_file_is_picked_up(tmp_path):
    root, cache = tmp_path / "results", tmp_path / "cache"
    runs = _tree(root)
    _settle(root)
    _check(root, cache, hits=0)
    assert _check(root, cache, hits=4).cache["parsed"] == 0
    metrics = {i: run / "metrics.jsonl" for i, run in runs.items()}
    append_metrics(runs[0], _eval(9, 0.95))                       # modified (appended)
    with open(metrics[1], "rb+") as f:                            # truncated mid-line
        f.truncate(os.path.getsize(metrics[1]) - 40)
    st = os.stat(metrics[2])                                      # rewritten in place, same
    text = metrics[2].read_bytes().replace(b'"num_samples": 100', b'"num_samples": 107', 1)
    with open(metrics[2], "r+b") as f:                            # size, mtime set back
        f.write(text)
    os.utime(metrics[2], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(metrics[2]).st_size == st.st_size and b"107" in text
    metrics[3].unlink()                                           # deleted
    added = write_run(root / "s" / "new", MODEL, PARAMS, MACS, [_eval(1, 0.2)])   # added
    res = _check(root, cache, hits=0)
    ev = res.evals.set_index("run_id")
    assert 0.95 in ev.loc["r0", "top1"].tolist() and 107 in ev.loc["r2", "num_samples"].tolist()
    assert "r3" not in ev.index and "new" in ev.index
    assert any("torn last line" in s.reason for s in res.skipped)
    _settle(root)
    _check(root, cache, hits=0)  # the changed files were too recent to store: parsed again
    _check(root, cache, hits=4)
    truncate_metrics(runs[0], step=3)  # an atomic rewrite: a new inode
    shutil.rmtree(runs[1])  # a deleted run
    res = _check(root, cache, hits=2)
    assert res.evals.loc[res.evals["run_id"] == "r0", "step"].max() == 3 and added.exists()


def test_a_file_changed_within_the_racy_window_is_not_stored(tmp_path):
    root, cache = tmp_path / "results", tmp_path / "cache"
    _tree(root, n=1)
    assert load_results(root, cache_dir=cache).cache["parsed"] == 1
    assert load_results(root, cache_dir=cache).cache["parsed"] == 1  # parsed again, not reused


def test_the_cache_lives_in_its_own_git_ignored_file_per_results_dir(tmp_path):
    root, other = tmp_path / "results", tmp_path / "other"
    _tree(root, n=2)
    _tree(other, n=1)
    _settle(tmp_path)
    a = load_results(root, cache_dir=tmp_path / "cache")
    b = load_results(other, cache_dir=tmp_path / "cache")
    assert a.cache["path"] != b.cache["path"]
    assert Path(a.cache["path"]) == cache_path(tmp_path / "cache", root)
    assert (tmp_path / "cache" / ".gitignore").read_text() == GITIGNORE == "*\n"
    assert load_results(root, cache_dir=tmp_path / "cache").cache["hits"] == 2
    assert load_results(other, cache_dir=tmp_path / "cache").cache["hits"] == 1


def test_a_torn_or_foreign_cache_file_is_ignored_and_rebuilt(tmp_path):
    root, cache = tmp_path / "results", tmp_path / "cache"
    _tree(root)
    _settle(root)
    path = Path(_check(root, cache, hits=0).cache["path"])
    data = path.read_bytes()
    for junk in (data[: len(data) // 2], b"", b"PAR1 not parquet", data[:-9] + b"x" * 9):
        path.write_bytes(junk)
        _check(root, cache, hits=0)  # ignored, rebuilt whole
        _check(root, cache, hits=4)


_WRITER = """
import sys, time
from pathlib import Path
from analysis.load.runs import load_results
go = Path(sys.argv[3])
while not go.exists():
    time.sleep(0.01)
load_results(sys.argv[1], cache_dir=sys.argv[2])
"""


def test_a_killed_cache_write_does_not_poison_later_loads(tmp_path):
    """A loader killed (SIGKILL) in the middle of writing the cache: the previous cache stays
    whole and in use, and what the killed write left behind is never read."""
    root, cache = tmp_path / "results", tmp_path / "cache"
    runs = _tree(root, n=150, steps=40)
    _settle(root)
    path = Path(_check(root, cache, hits=0, same=False).cache["path"])
    before = path.read_bytes()
    assert len(before) > 100_000  # more than a pipe holds: the child blocks mid-write
    for run in list(runs.values())[:75]:  # half the files change: the next load writes
        append_metrics(run, _eval(99, 0.9))
    _settle(root)
    go = tmp_path / "go"
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(cache), str(go)],
                             cwd=REPO)
    tmp = cache / f".{path.name}.tmp{child.pid}"
    os.mkfifo(tmp)  # the child's write blocks on this pipe until we read, and dies mid-way
    go.touch()
    with open(tmp, "rb") as pipe:
        partial = pipe.read(4096)
        child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL and partial.startswith(b"PAR1")
    tmp.unlink()
    tmp.write_bytes(partial)  # what a killed write to a regular file leaves behind
    assert path.read_bytes() == before  # the cache itself was never touched
    _check(root, cache, hits=75)  # the old entries of unchanged files still serve
    _check(root, cache, hits=150, same=False)
    old = time.time() - 2 * 3600
    os.utime(tmp, (old, old))
    append_metrics(runs[0], _eval(100, 0.91))
    _settle(root)
    _check(root, cache, hits=149, same=False)  # this write removed the stale temporary file
    assert not tmp.exists()


@pytest.mark.slow
def test_the_benchmark_runs_and_writes_only_under_its_out_dir(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "analysis.bench.load", "--runs", "12",
                           "--rows", "60", "--eval-every", "6", "--n-boot", "10", "--out-dir",
                           str(out), "--keep"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for what in ("load, reference", "load, new, no cache, 1 process", "load, new, cold",
                 "load, new, warm", "re-plot, reference loader", "re-plot, new (cache)",
                 "re-plot, new, CLI"):
        assert any(line.startswith(what) for line in lines), what
    assert proc.stdout.count("tables identical") == 4 and "DIFFERENT" not in proc.stdout
    assert "12 hits" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["byte_form", "cache", "fig", "results",
                                                      "tree.json"]

"""Invalid numbers in a results dir never reach a table, figure or summary.md: each bad line or
file is skipped, named (file, line, reason) and counted, through analysis.load.runs and the real CLI.
Run dirs are written as tests/test_analysis_load.py writes them (scaling.results writers), the
bad lines and files raw, as a broken writer or a torn disk would leave them."""

import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis.load.runs import count_skipped, load_results
from analysis.synthetic import SIZES, write_run, write_synthetic_results

REPO = Path(__file__).resolve().parents[1]
MODEL, PARAMS, MACS = SIZES[1]  # S/16


def _eval_row(step, top1=0.5, **extra):
    images = 1000 * step
    row = {"kind": "eval", "step": step, "epoch": images / 1e4, "images_seen": images,
           "flops_seen": 6.0 * MACS * images, "wall_s": 10.0 * step, "loss": 1.0,
           "top1": top1, "num_samples": 100}
    if "top5" not in extra:
        row["top5"] = min(1.0, top1 + 0.1)
    row.update(extra)
    return row


def _train_row(step):
    return {"kind": "train", "step": step, "epoch": step / 10, "images_seen": 1000 * step,
            "flops_seen": 6.0 * MACS * 1000 * step, "wall_s": 10.0 * step, "loss": 2.0,
            "lr": 1e-3, "images_per_s": 100.0, "tflops": 1.0, "mfu": None, "mem_gb": 1.0,
            "skipped_samples": 0}


def _run(root, name, lines, *, final=None, sweep="s"):
    """A run dir whose metrics.jsonl holds `lines` verbatim (dicts are dumped as Python's json
    writes them, NaN included; strings and bytes are written as they are), with a final.json
    of status ok summing up the eval rows `final` when given (else still running)."""
    run = write_run(Path(root) / sweep / name, MODEL, PARAMS, MACS, [], status="running")
    with open(run / "metrics.jsonl", "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write(line if isinstance(line, bytes) else line.encode())
            f.write(b"\n")
    if final is not None:
        _final(run, final)
    return run


def _final(run, evals, **override):
    """final.json written raw (json.dumps keeps NaN as NaN, as a broken writer would)."""
    last = evals[-1]
    final = {"status": "ok", "final_top1": last["top1"],
             "best_top1": max(e["top1"] for e in evals), "final_top5": last["top5"],
             "final_loss": 1.0, "steps": last["step"], "images_seen": last["images_seen"],
             "total_flops": last["flops_seen"], "params": PARAMS, "macs_per_image": MACS,
             "model": MODEL, "wall_hours": last["wall_s"] / 3600,
             "device_hours": last["wall_s"] / 3600, "world_size": 1, "skipped_samples": 0,
             "overhead_fraction": 0.1, "error": None, **override}
    (run / "final.json").write_text(json.dumps(final))


def _skips(res):
    return {s.path: s.reason for s in res.skipped}


# -- eval rows with invalid values -------------------------------------------------------------

BAD_EVALS = [
    ("top1 NaN", _eval_row(2, top1=float("nan"), top5=0.9), "top1 is NaN"),
    ("top1 null", _eval_row(2, top1=None, top5=0.9), "top1 is null"),
    ("top1 170 %", _eval_row(2, top1=1.7, top5=1.0), "top1=1.7 is outside [0, 1]"),
    ("top1 negative", _eval_row(2, top1=-0.1), "top1=-0.1 is outside [0, 1]"),
    ("top1 inf", _eval_row(2, top1=float("inf"), top5=1.0), "top1=inf is outside [0, 1]"),
    ("top1 text", _eval_row(2, top1="0.5", top5=0.6), "top1='0.5' is not a number"),
    ("top5 above 1", _eval_row(2, top1=0.5, top5=1.2), "top5=1.2 is outside [0, 1]"),
    ("top5 NaN", _eval_row(2, top1=0.5, top5=float("nan")), "top5 is NaN"),
    ("top5 below top1", _eval_row(2, top1=0.6, top5=0.4), "top5=0.4 is below top1=0.6"),
    ("num_samples 0", _eval_row(2, num_samples=0), "num_samples=0 is not a positive count"),
    ("num_samples < 0", _eval_row(2, num_samples=-8), "num_samples=-8 is not a positive"),
    ("num_samples 2.5", _eval_row(2, num_samples=2.5), "num_samples=2.5 is not a positive"),
    ("num_samples null", _eval_row(2, num_samples=None), "num_samples is null"),
    ("num_samples missing", {k: v for k, v in _eval_row(2).items() if k != "num_samples"},
     "eval row is missing ['num_samples']"),
    ("step negative", {**_eval_row(2), "step": -1}, "step=-1 is not a whole number >= 0"),
    ("step fractional", {**_eval_row(2), "step": 2.5}, "step=2.5 is not a whole number"),
]


@pytest.mark.parametrize("row,reason", [c[1:] for c in BAD_EVALS], ids=[c[0] for c in BAD_EVALS])
def test_invalid_eval_row_is_a_counted_skipped_line(tmp_path, caplog, row, reason):
    run = _run(tmp_path, "r", [_eval_row(1, 0.4), _train_row(2), row, _eval_row(3, 0.6)],
               final=[_eval_row(1, 0.4), _eval_row(3, 0.6)])
    with caplog.at_level(logging.WARNING, logger="analysis"):
        res = load_results(tmp_path)
    where = f"{run / 'metrics.jsonl'}:3"
    assert list(_skips(res)) == [where] and reason in _skips(res)[where]
    assert [s.line for s in res.skipped] == [3] and count_skipped(res.skipped) == (0, 1)
    assert f"skipping {where}: " in caplog.text and reason in caplog.text
    # the neighbours stay; the bad row is in no table
    assert res.evals["step"].tolist() == [1.0, 3.0]
    assert res.evals["top1"].tolist() == [0.4, 0.6]
    r = res.runs.iloc[0]
    assert r["n_evals"] == 2 and r["best_top1"] == 0.6 and r["final_top1"] == 0.6


def test_a_literal_nan_line_from_a_foreign_writer(tmp_path):
    """`NaN` is not JSON, but Python's json module reads it: it must not become a number."""
    line = ('{"kind": "eval", "step": 2, "epoch": 0.2, "images_seen": 2000, "flops_seen": 1e13, '
            '"wall_s": 20, "loss": NaN, "top1": NaN, "top5": NaN, "num_samples": 100}')
    run = _run(tmp_path, "r", [_eval_row(1), line])
    res = load_results(tmp_path)
    assert _skips(res) == {f"{run / 'metrics.jsonl'}:2": "top1 is NaN"}
    assert len(res.evals) == 1


# -- duplicate eval steps ----------------------------------------------------------------------

def test_exact_copies_of_an_eval_row_are_kept_once(tmp_path):
    row = _eval_row(2, 0.5)
    run = _run(tmp_path, "r", [_eval_row(1, 0.4), _train_row(2), row, row, _eval_row(3, 0.6),
                               row], final=[_eval_row(3, 0.6)])
    res = load_results(tmp_path)
    path = run / "metrics.jsonl"
    skips = _skips(res)
    assert sorted(skips) == [f"{path}:4", f"{path}:6"]
    for where in skips.values():
        assert where == "exact copy of the eval row of step 2 on line 3 (kept once)"
    assert res.evals["step"].tolist() == [1.0, 2.0, 3.0]  # once, and in step order
    assert res.runs.iloc[0]["n_evals"] == 3
    # a train row at the same step is another kind, not a duplicate
    assert not any(s.line == 2 for s in res.skipped)


def test_conflicting_rows_of_one_step_are_all_dropped(tmp_path, caplog):
    """Two different measurements of one step: neither is trusted, both are named, and neither
    reaches best_top1, even when one of them would be the run's best."""
    rows = [_eval_row(1, 0.4), _eval_row(2, 0.5), _eval_row(3, 0.6), _eval_row(2, 0.9),
            _eval_row(2, 1.5, top5=1.0)]
    run = _run(tmp_path, "r", rows, final=[_eval_row(3, 0.6)])
    with caplog.at_level(logging.WARNING, logger="analysis"):
        res = load_results(tmp_path)
    path = run / "metrics.jsonl"
    skips = _skips(res)
    assert sorted(skips) == [f"{path}:{i}" for i in (2, 4, 5)]
    for i in (2, 4):
        assert skips[f"{path}:{i}"] == ("eval step 2 is logged 3 times with different values "
                                        "(lines 2, 4, 5): none of them is kept")
    assert skips[f"{path}:5"] == "top1=1.5 is outside [0, 1]"  # its own fault first
    assert count_skipped(res.skipped) == (0, 3) and caplog.text.count("skipping ") == 3
    assert res.evals["step"].tolist() == [1.0, 3.0]
    assert res.runs.iloc[0]["best_top1"] == 0.6


def test_duplicates_are_per_run(tmp_path):
    _run(tmp_path, "a", [_eval_row(1, 0.4), _eval_row(2, 0.5)])
    _run(tmp_path, "b", [_eval_row(1, 0.3), _eval_row(2, 0.7)])
    res = load_results(tmp_path)
    assert res.skipped == [] and len(res.evals) == 4


# -- final.json --------------------------------------------------------------------------------

BAD_FINALS = [
    ("final_top1 NaN", {"final_top1": float("nan")}, "final_top1 is NaN"),
    ("final_top1 170 %", {"final_top1": 1.7, "best_top1": 1.7}, "final_top1=1.7 is outside"),
    ("best_top1 NaN", {"best_top1": float("nan")}, "best_top1 is NaN"),
    ("best_top1 negative", {"best_top1": -0.2}, "best_top1=-0.2 is outside [0, 1]"),
    ("best_top1 inf", {"best_top1": float("inf")}, "best_top1=inf is outside [0, 1]"),
    ("final_top5 above 1", {"final_top5": 2.0}, "final_top5=2.0 is outside [0, 1]"),
    ("best below final", {"best_top1": 0.3}, "best_top1=0.3 is below final_top1=0.6"),
    ("top1 text", {"final_top1": "60%"}, "final_top1='60%' is not a number"),
]


@pytest.mark.parametrize("override,reason", [c[1:] for c in BAD_FINALS],
                         ids=[c[0] for c in BAD_FINALS])
def test_final_json_with_invalid_top1_skips_the_run(tmp_path, caplog, override, reason):
    good = _run(tmp_path, "good", [_eval_row(1, 0.4)], final=[_eval_row(1, 0.4)])
    rows = [_eval_row(1, 0.4), _eval_row(2, 0.6)]
    bad = _run(tmp_path, "bad", rows)
    _final(bad, rows, **override)
    with caplog.at_level(logging.WARNING, logger="analysis"):
        res = load_results(tmp_path)
    path = str(bad / "final.json")
    assert list(_skips(res)) == [path]
    assert reason in _skips(res)[path] and _skips(res)[path].endswith("; run skipped")
    assert count_skipped(res.skipped) == (1, 0)
    assert f"skipping {bad / 'final.json'}: " in caplog.text
    assert res.runs["run_id"].tolist() == ["good"] and set(res.evals["run"]) == {"s/good"}
    assert good.exists()


def test_null_top1_in_final_json_is_allowed(tmp_path):
    """A run that failed before its first eval has no top-1: null is not an error."""
    run = _run(tmp_path, "r", [])
    _final(run, [_eval_row(1)], status="failed", final_top1=None, best_top1=None,
           final_top5=None, error="OOM")
    res = load_results(tmp_path)
    assert res.skipped == [] and res.runs.iloc[0]["status"] == "failed"
    assert math.isnan(res.runs.iloc[0]["final_top1"])


@pytest.mark.parametrize("content,reason", [
    (b"this is not json\n", "not valid JSON"),
    (b"", "not valid JSON"),
    (b'{"status": "ok", "final_top1": 0.5', "not valid JSON"),  # torn
    (b"\xff\xfe\x00garbage", "not UTF-8 text"),
    (b"[1, 2]", "expected a JSON object, got list"),
], ids=["text", "empty", "torn", "binary", "list"])
def test_garbage_final_json_is_named_and_its_run_skipped(tmp_path, caplog, content, reason):
    _run(tmp_path, "good", [_eval_row(1, 0.4)], final=[_eval_row(1, 0.4)])
    bad = _run(tmp_path, "bad", [_eval_row(1, 0.4), _eval_row(2, 0.5)])
    (bad / "final.json").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="analysis"):
        res = load_results(tmp_path)
    path = str(bad / "final.json")
    assert list(_skips(res)) == [path]
    assert _skips(res)[path].startswith(reason) and _skips(res)[path].endswith("; run skipped")
    assert path not in _skips(res)[path]  # the path is named once, not twice
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0] and path in lines[0]
    assert res.runs["run_id"].tolist() == ["good"]


# -- corrupt metrics lines ---------------------------------------------------------------------

def test_corrupt_middle_lines_are_each_named_and_counted(tmp_path, caplog):
    run = _run(tmp_path, "r", [
        _eval_row(1, 0.4),
        "garbage",                                   # 2
        b"\xff\xfe binary \x00",                     # 3
        "[1, 2, 3]",                                 # 4
        "5",                                         # 5
        json.dumps({"kind": "test", "step": 3}),     # 6
        json.dumps({"kind": "eval", "step": 3}),     # 7: missing keys
        "",                                          # blank lines are no rows
        _eval_row(4, 0.6),                           # 9
        '{"kind": "eval", "step": 5, "top1"',       # 10: torn last line
    ])
    with open(run / "metrics.jsonl", "rb+") as f:  # no newline after the torn line
        f.truncate(f.seek(0, 2) - 1)
    with caplog.at_level(logging.WARNING, logger="analysis"):
        res = load_results(tmp_path)
    path = run / "metrics.jsonl"
    skips = _skips(res)
    assert sorted(s.line for s in res.skipped) == [2, 3, 4, 5, 6, 7, 10]
    assert skips[f"{path}:2"].startswith("not valid JSON: Expecting value")
    assert skips[f"{path}:3"].startswith("not UTF-8 text")
    assert skips[f"{path}:4"] == "expected a JSON object, got list"
    assert skips[f"{path}:5"] == "expected a JSON object, got int"
    assert "kind='test'" in skips[f"{path}:6"]
    assert skips[f"{path}:7"].startswith("eval row is missing ['epoch'")
    assert "torn last line" in skips[f"{path}:10"]
    assert count_skipped(res.skipped) == (0, 7)
    assert all(f"{path}:{i}" in caplog.text for i in (2, 3, 4, 5, 6, 7, 10))
    assert res.evals["step"].tolist() == [1.0, 4.0]


# -- the real CLI ------------------------------------------------------------------------------

def _column(summary: str, header: str) -> list[str]:
    """The cells of one column of the first Markdown table that has it."""
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if header in line)
    heads = [h.strip() for h in lines[start].strip("|").split("|")]
    col = heads.index(header)
    cells = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells.append(line.strip("|").split("|")[col].strip())
    return cells


def test_cli_summary_holds_no_invalid_number_and_counts_skips(tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    info = write_synthetic_results(results, n_evals=6)
    # L/16's run: a 170 % top-1 (it would be the size's best), a NaN one, a duplicated step
    # with two different values, and an eval over zero images
    big = info["runs"]["L/16"]
    last = json.loads((big / "metrics.jsonl").read_text().splitlines()[-1])
    bad = ((9001, 1.7, 100), (9002, float("nan"), 100), (last["step"], 0.99, 100),
           (9003, 0.98, 0))
    with open(big / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps({**last, "step": step, "top1": top1, "top5": 1.0,
                                 "num_samples": n}) + "\n" for step, top1, n in bad)
    # a run whose final.json says 170 %, and one whose final.json is garbage
    for name, text in (("bad_final", None), ("garbage_final", "garbage\n")):
        rows = [_eval_row(1, 0.5), _eval_row(2, 0.6)]
        run = write_run(results / "synth" / name, MODEL, PARAMS, MACS, rows)
        if text is None:
            _final(run, rows, final_top1=1.7, best_top1=1.7)
        else:
            (run / "final.json").write_text(text)
    proc = subprocess.run([sys.executable, "analysis/plot_scaling.py", "--results",
                           str(results), "--out", str(out), "--n-boot", "10"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    summary = (out / "summary.md").read_text()
    assert "2 skipped files, 5 skipped lines" in summary
    assert "Skipped files: 2; skipped lines: 5" in summary
    assert "2 skipped files, 5 skipped lines" in proc.stdout
    metrics = big / "metrics.jsonl"
    n = len(metrics.read_text().splitlines())
    for line in range(n - 3, n + 1):  # the 4 appended lines, the duplicated step's first too
        assert f"{metrics}:{line}" in summary and f"{metrics}:{line}" in proc.stderr
    first = next(i for i, raw in enumerate(metrics.read_text().splitlines(), 1)
                 if json.loads(raw)["step"] == last["step"])
    assert f"`{metrics}:{first}`: eval step {last['step']} is logged 2 times" in summary
    for name in ("bad_final", "garbage_final"):
        assert f"`{results / 'synth' / name / 'final.json'}`" in summary
    best = [float(c) for c in _column(summary, "best top-1 (%)")]  # '–' would fail here
    assert len(best) == len(SIZES) and all(0 <= b <= 100 for b in best)
    sizes = summary.split("## Per model size")[1].split("## ")[0]
    assert "170" not in sizes and "nan" not in sizes.lower()
    evals = pd.read_csv(out / "evals.csv")
    assert evals["top1"].between(0, 1).all() and not evals["top1"].isna().any()
    assert not evals.duplicated(["run", "step"]).any()
    assert set(evals["run_id"]) == {f"{m.replace('/', '-')}_s0" for m, _, _ in SIZES}
    runs = pd.read_csv(out / "runs.csv")
    assert runs["final_top1"].between(0, 1).all() and runs["best_top1"].between(0, 1).all()
    assert re.search(r"\| L/16 \| 1 \(1\) \|", summary)


def test_cli_out_that_is_a_file_fails_before_reading(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for out in (afile, afile / "figures"):
        proc = subprocess.run([sys.executable, "analysis/plot_scaling.py", "--results",
                               str(tmp_path / "missing"), "--out", str(out)], cwd=REPO,
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 2 and proc.stdout == ""  # 2 (a bad flag), not 1 (no results)
        expected = (f"plot_scaling.py: error: --out {out}: {afile} exists and is not a "
                    "directory (see --help)")
        assert proc.stderr.splitlines() == [expected]
    assert afile.read_text() == "keep"

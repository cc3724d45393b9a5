"""summary.json, written by the real CLI (analysis/plot_scaling.py in a subprocess) beside
summary.md: its schema (analysis/README.md, "summary.json") and strict JSON (no NaN)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.fit import law as F
from analysis.synthetic import SIZES, write_isoflop_results, write_run, write_synthetic_results

REPO = Path(__file__).resolve().parents[1]


def _no_constant(name):
    raise ValueError(f"summary.json holds {name}, which is not JSON")


def _run(results, out, *flags) -> dict:
    proc = subprocess.run([sys.executable, "analysis/plot_scaling.py", "--results", str(results),
                           "--out", str(out), "--n-boot", "20", *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    path = out / "summary.json"
    assert str(path) in proc.stdout.splitlines()
    return json.loads(path.read_text(), parse_constant=_no_constant)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def test_summary_json_schema_through_the_cli(tmp_path):
    results = tmp_path / "results"
    info = write_isoflop_results(results, seeds=(0, 1))
    model, params, macs = SIZES[0]
    rows = json.loads((next(iter(info["runs"].values())) / "metrics.jsonl").read_text()
                      .splitlines()[0])
    write_run(results / "isoflop" / "live", model, params, macs, [rows], status="running",
              config={"flops": 1e21, "steps": None})
    write_run(results / "isoflop" / "dead", model, params, macs, [rows], status="failed",
              error="OOM", config={"flops": 1e21, "steps": None, "lr": 9e-3})
    s = _run(results, tmp_path / "out")
    assert s["metric"] == "error" and s["x"] == "flops" and s["schema_version"] == 1
    fit = s["fit"]
    assert fit["method"] == "huber" and fit["comparison"]["method"] == "lsq"
    assert set(fit["params"]) == set(F.PARAMS) and all(_is_num(v) for v in fit["params"].values())
    for k in F.PARAMS:
        lo, hi = fit["intervals"][k]
        assert _is_num(lo) and _is_num(hi) and lo <= hi
    assert isinstance(fit["poorly_determined"], list)
    assert set(fit["poorly_determined"]) <= set(F.PARAMS)
    ex = s["extrapolation"]
    assert _is_num(ex["mean_abs_rel_error"]) and ex["max_abs_rel_error"] >= ex["mean_abs_rel_error"]
    assert ex["points"] and set(ex["points"][0]) == {"compute", "error", "predicted", "rel_error"}
    opt = s["optimal_size"]
    assert opt["method"] == "isoflop" and opt["reason"] is None
    assert opt["exponent"] == pytest.approx(0.5, abs=0.05)
    assert opt["interval"][0] < opt["exponent"] < opt["interval"][1]
    assert opt["monotone"] is True and len(opt["per_budget"]) == 5
    for b in opt["per_budget"]:
        assert {"compute", "params_opt", "bound"} <= set(b)
        assert b["bound"] is None and _is_num(b["params_opt"]) and _is_num(b["compute"])
    assert s["runs"] == {"ok": 50, "running": 1, "failed": 1, "diverged": 0}
    assert s["seeds_per_point"]["min"] >= 1 and s["seeds_per_point"]["max"] == 2
    assert sum(s["seeds_per_point"]["counts"].values()) == len(s["frontier"])
    assert {"model", "compute", "error", "err_lo", "err_hi", "n_seeds",
            "num_samples"} <= set(s["frontier"][0])
    assert s["figures"][:3] == ["error_vs_flops.png", "scaling_law_fit.png",
                                "optimal_model_size.png"]


def test_undetermined_values_are_null_with_a_reason(tmp_path):
    results = tmp_path / "results"
    write_synthetic_results(results, n_evals=2, sizes=SIZES[:2])  # 4 evals: no fit, no budget
    s = _run(results, tmp_path / "out", "--fit", "lsq", "--x", "images")
    assert s["x"] == "images" and s["x_unit"] == "images"
    assert s["fit"]["method"] == "lsq" and s["fit"]["params"] is None
    assert s["fit"]["intervals"] is None and "need at least 5" in s["fit"]["reason"]
    assert s["extrapolation"]["mean_abs_rel_error"] is None and s["extrapolation"]["reason"]
    opt = s["optimal_size"]
    assert opt["exponent"] is None and opt["interval"] is None and opt["monotone"] is None
    assert opt["per_budget"] == [] and "FLOPs budget" in opt["reason"]
    assert s["runs"]["ok"] == 2 and s["seeds_per_point"]["counts"] == {"1": len(s["frontier"])}


def test_both_summaries_are_rendered_from_one_frozen_report(tmp_path):
    """analyse computes one frozen Report (analysis.report.summary_data); summary.md and
    summary.json are each a pure rendering of it: rendering it again gives the files byte for
    byte, and a changed field shows in both without anything being recomputed."""
    import dataclasses

    from analysis.report.build import analyse
    from analysis.report.summary import render
    from analysis.report.summary_json import build

    write_synthetic_results(tmp_path / "results", n_evals=3, sizes=SIZES[:2])
    report = analyse(tmp_path / "results", tmp_path / "out", n_boot=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.notes = ()
    assert report.summary.read_text() == render(report)
    on_disk = json.loads(report.summary_json.read_text(), parse_constant=_no_constant)
    assert on_disk == json.loads(json.dumps(build(report), allow_nan=False))
    assert on_disk["compute_spent"] == report.compute["compute_spent"] > 0
    other = dataclasses.replace(report, notes=("a note of the test",),
                                compute={"compute_spent": 1.0, "compute_independent": 2.0})
    assert render(other).endswith("- note: a note of the test\n")
    payload = build(other)
    assert payload["notes"] == ["a note of the test"]
    assert (payload["compute_spent"], payload["compute_independent"]) == (1.0, 2.0)

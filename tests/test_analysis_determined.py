"""Is the frontier law determined (analysis.fit.determined, issue 26 items 1-3): flags that mean
the same in any unit of C, constants at a bound of the search, and too little data."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.fit import determined as D
from analysis.fit import law as F
from analysis.fit.frontier import fit_frontier
from analysis.report.summary import fit_section
from analysis.report.summary_law import verdict_lines
from analysis.synthetic import SIZES, law, write_run
from scaling.flops import flops_for_images, images_for_flops

REPO = Path(__file__).resolve().parents[1]
SCALES = (1e-6, 1.0, 1e9)


def _good():
    """15 points over 7 decades of the true law at 1 % noise: all four constants identifiable."""
    c = np.logspace(13, 20, 15)
    return c, law(c) * np.exp(np.random.default_rng(0).normal(0.0, 0.01, c.size))


def _bent(decades=1.0, n=13):
    """Error falling linearly in C over `decades`: concave on log-log axes, which the law can
    only follow with a steep b and a shift d near the largest C, so b runs into its cap of 5."""
    c = np.logspace(15, 15 + decades, n)
    x = c / c.min()
    e = 0.6 - 0.5 * (x - 1) / (x.max() - 1)
    return c, e * np.exp(np.random.default_rng(0).normal(0.0, 0.005, n))


def _frontier(compute, error) -> pd.DataFrame:
    return pd.DataFrame({"model": "m", "flops_seen": compute, "error": error})


def test_flags_and_text_are_the_same_in_any_unit_of_compute():
    c, e = _good()
    got = {s: fit_frontier(_frontier(c * s, e), "flops", n_boot=10) for s in SCALES}
    ref = got[1.0]
    assert ref["determination"]["determined"], ref["determination"]["reasons"]
    for s, res in got.items():
        _same_verdict(res["determination"], ref["determination"], s)
        # the same predictions at the same points, whatever the unit of C
        grid = np.logspace(np.log10(c.min()), np.log10(c.max()) + 1, 9)
        assert F.predict(res["fit"], grid * s) == pytest.approx(F.predict(ref["fit"], grid),
                                                                rel=1e-5)
        # the same summary text, apart from the constants table (a and d carry C's unit)
        keep = [ln for ln in fit_section(res, "flops") if not ln.startswith("|")]
        assert keep == [ln for ln in fit_section(ref, "flops") if not ln.startswith("|")]
    # a's bootstrap spread does depend on the unit (what the old flag read); the verdict did not
    spread = {s: np.divide(*reversed(got[s]["boot"]["intervals"]["a"])) for s in SCALES}
    assert spread[1e9] > 1.2 * spread[1e-6]


def _same_verdict(det, ref, scale):
    for k in ("determined", "reasons", "at_bound", "poorly_determined", "too_little"):
        assert det[k] == ref[k], (scale, k)
    assert det["band"]["at_max"] == pytest.approx(ref["band"]["at_max"], rel=1e-3)
    assert det["band"]["at_10x"] == pytest.approx(ref["band"]["at_10x"], rel=1e-3)
    assert "a" not in det["poorly_determined"]  # a's unit is C^b: never judged


def test_a_curve_that_drives_b_to_its_cap_is_at_bound_in_any_unit():
    c, e = _bent()
    boots = {s: F.bootstrap_fit(c * s, e, n_boot=10, loss="huber") for s in SCALES}
    dets = {s: D.assess(b, c * s) for s, b in boots.items()}
    boot, det = boots[1.0], dets[1.0]
    assert boot["fit"]["b"] >= 0.99 * 5.0 and "b" in boot["fit"]["at_bound"]
    assert boot["at_bound_frac"]["b"] >= 0.5  # the refits start there and stay there
    assert not det["determined"] and det["at_bound"] == ["b"]
    assert any(r.startswith("at bound") and "b (in the fit" in r for r in det["reasons"])
    for s in SCALES:
        _same_verdict(dets[s], det, s)
        text = verdict_lines({"boot": boots[s], "determination": dets[s]})
        assert text == verdict_lines({"boot": boot, "determination": det})


def test_too_little_data_is_said_with_its_threshold():
    assert D.MIN_POINTS == 12
    assert D.data_shortfall(12, 1.0) is None
    assert "11 frontier points, fewer than 12" in D.data_shortfall(11, 3.0)
    assert "0.80 decades of compute, under 1" in D.data_shortfall(30, 0.8)


def _write_curve(results: Path, compute, error) -> None:
    """One run whose evals follow (compute, error): its points are the whole frontier."""
    model, params, macs = SIZES[1]
    images = np.round(images_for_flops(np.asarray(compute), macs))
    flops = flops_for_images(macs, images)
    rows = [{"kind": "eval", "step": 100 * (i + 1), "epoch": float(im) / 1e6,
             "images_seen": int(im), "flops_seen": float(fl), "wall_s": 3600.0 * fl / 1e18,
             "loss": float(2.5 * err), "top1": float(1 - err), "top5": float(1 - err / 3),
             "num_samples": 50_000} for i, (im, fl, err) in enumerate(zip(images, flops, error))]
    write_run(results / "short" / "run0", model, params, macs, rows)


def _cli(tmp_path, compute, error) -> tuple[str, dict]:
    results, out = tmp_path / "results", tmp_path / "out"
    _write_curve(results, compute, error)
    proc = subprocess.run([sys.executable, "analysis/plot_scaling.py", "--results", str(results),
                           "--out", str(out), "--n-boot", "20"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return (out / "summary.md").read_text(), json.loads((out / "summary.json").read_text())


def test_cli_reports_a_constant_at_its_bound(tmp_path):
    md, s = _cli(tmp_path, *_bent())
    fit = s["fit"]
    assert fit["at_bound"] == ["b"] and fit["params"]["b"] >= 0.99 * 5.0
    assert fit["determined"] is False
    assert fit["determination"]["at_bound_fraction"]["b"] >= 0.05
    assert "**Law not determined**" in md and "- at bound (a limit of the search): b" in md


def test_cli_short_curve_says_too_little_data_and_claims_no_extrapolation(tmp_path):
    c = np.logspace(16, 16.8, 8)  # 8 points over 0.8 decades of the true law, 1 % noise
    md, s = _cli(tmp_path, c, law(c) * np.exp(np.random.default_rng(1).normal(0, 0.01, c.size)))
    det = s["fit"]["determination"]
    assert s["fit"]["determined"] is False and det["min_points"] == 12
    assert det["n_points"] == 8 and det["decades"] == pytest.approx(0.8, abs=0.01)
    assert "fewer than 12" in det["too_little_data"] and "under 1" in det["too_little_data"]
    assert "too little data: 8 frontier points, fewer than 12 (3 per constant" in md
    # the extrapolation check still runs and is shown, but makes no claim
    assert s["extrapolation"]["mean_abs_rel_error"] is not None
    section = md.split("## Extrapolation check")[1].split("\n## ")[0]
    assert "| compute |" in section and "no extrapolation claim: too little data" in section
    assert "the law extrapolated" not in section and "did not extrapolate" not in section


def test_verdict_of_a_determined_law_names_its_band():
    c, e = _good()
    res = fit_frontier(_frontier(c, e), "flops", n_boot=20)
    (line,) = verdict_lines(res)
    assert line.startswith("**Law determined** by 15 frontier points over 7.00 decades")
    assert "limits 10% and 20%" in line

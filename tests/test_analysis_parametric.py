"""analysis.fit.parametric: Chinchilla's approach 3, E(N, D) = E0 + A N^-alpha + B D^-beta fitted
to every run's final eval (Hoffmann et al. 2022, Sec. 3.3), on points drawn from a known E(N, D)
with noise, on a branching tree (resampling units) and through the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.fit import parametric as P
from analysis.fit.memo import FitMemo
from analysis.load.runs import load_results
from analysis.report.summary_parametric import parametric_json
from analysis.synthetic import SIZES, write_isoflop_results, write_run
from scaling.flops import flops_for_images

REPO = Path(__file__).resolve().parents[1]
# Chinchilla's exponents (Hoffmann et al. 2022, Eq. 10) with an error scale of a vision task.
TRUE = {"E0": 0.1, "A": 48.0, "B": 18.0, "alpha": 0.34, "beta": 0.28}
TRUE_EXPONENT = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])  # 0.4516


def _points(seed: int, noise: float = 0.01, truth: dict = TRUE) -> pd.DataFrame:
    """5 sizes x 5 amounts of data (jittered), errors from `truth` with log-normal noise."""
    rng = np.random.default_rng(seed)
    n = np.repeat(np.logspace(6.5, 8.8, 5), 5)
    d = np.tile(np.logspace(6, 8.5, 5), 5) * rng.uniform(0.8, 1.25, 25)
    e = P.predict_parametric(truth, n, d) * np.exp(rng.normal(0.0, noise, 25))
    return pd.DataFrame({"params": n, "images_seen": d, "error": e, "macs_per_image": 200 * n})


@pytest.mark.parametrize("seed", [0, 1])
def test_known_alpha_beta_and_exponent_are_recovered_with_noise(seed):
    fit = P.fit_parametric(_points(seed), n_boot=30, seed=seed)
    assert fit["ok"] and fit["reason"] is None and fit["n_boot_ok"] == 30
    p = fit["params"]
    assert p["alpha"] == pytest.approx(TRUE["alpha"], abs=0.05)
    assert p["beta"] == pytest.approx(TRUE["beta"], abs=0.03)
    assert p["E0"] == pytest.approx(TRUE["E0"], abs=0.03)
    assert fit["exponent"] == pytest.approx(TRUE_EXPONENT, abs=0.035)
    lo, hi = fit["interval"]
    assert lo < TRUE_EXPONENT < hi and hi - lo < 0.15
    for k in ("alpha", "beta"):
        assert fit["intervals"][k][0] < TRUE[k] < fit["intervals"][k][1]
    assert fit["at_bound"] == []
    assert fit["rmse_log"] < 0.02  # about the 1 % noise drawn
    # N_opt(C) follows its exponent: 10x the compute, 10^exponent the size
    ratio = P.n_opt(fit, [1e19, 1e20])
    assert ratio[1] / ratio[0] == pytest.approx(10 ** fit["exponent"], rel=1e-9)


def test_noise_free_points_give_the_truth():
    fit = P.fit_parametric(_points(0, noise=0.0), n_boot=0)
    for k, v in TRUE.items():
        assert fit["params"][k] == pytest.approx(v, rel=0.01), k
    pts = _points(3, noise=0.0)
    got = P.predict_parametric(fit, pts["params"], pts["images_seen"])
    np.testing.assert_allclose(got, pts["error"], rtol=1e-3)


def test_a_law_without_size_dependence_puts_alpha_at_its_bound():
    fit = P.fit_parametric(_points(0, truth={**TRUE, "A": 0.0}), n_boot=10)
    assert fit["ok"] and fit["params"]["alpha"] < 0.01, fit["params"]
    assert "alpha" in fit["at_bound"] and "beta" not in fit["at_bound"]
    assert fit["params"]["beta"] == pytest.approx(TRUE["beta"], abs=0.03)


def test_too_few_runs_or_one_size_give_no_fit_and_say_why():
    pts = _points(0)
    few = P.fit_parametric(pts.iloc[:4], n_boot=5)
    assert not few["ok"] and few["params"] is None and "4 run(s)" in few["reason"]
    one = P.fit_parametric(pts[pts["params"] == pts["params"].iloc[0]], n_boot=5)
    assert not one["ok"] and "1 model size(s)" in one["reason"]
    js = parametric_json(one, {"fit": None})
    assert js["params"] is None and js["exponent"] is None and js["interval"] is None
    assert js["at_bound"] == [] and "model size" in js["reason"]
    with pytest.raises(ValueError, match="no fitted constants"):
        P.predict_parametric(one, 1e7, 1e7)


def test_resampling_units_are_clusters():
    pts = _points(0).assign(cluster=[f"c{i // 5}" for i in range(25)])
    fit = P.fit_parametric(pts, n_boot=10)
    assert fit["n_clusters"] == 5 and fit["n_points"] == 25
    assert P.fit_parametric(_points(0), n_boot=0)["n_clusters"] == 25


def _rows(macs: float, batch: int, steps, errors) -> list[dict]:
    return [{"kind": "eval", "step": s, "epoch": s / 10, "images_seen": s * batch,
             "flops_seen": flops_for_images(macs, s * batch), "wall_s": float(s),
             "loss": 2 * e, "top1": 1 - e, "top5": 1 - e / 3, "num_samples": 10_000}
            for s, e in zip(steps, errors)]


def test_branches_of_one_trunk_are_one_resampling_unit(tmp_path):
    """Branches (launchers/branching.py) share their trunk's training: one cluster per trunk
    (across its seeds), a plain run its own; the trunk itself has no final eval."""
    for model, params, macs in SIZES[:2]:
        tag = model.replace("/", "-")
        for seed in (0, 1):
            trunk = f"{tag}_trunk_s{seed}"
            write_run(tmp_path / "sw" / trunk, model, params, macs,
                      _rows(macs, 256, [10, 20, 30, 40], [0.5, 0.4, 0.35, 0.3]), seed=seed)
            for b in (10, 20, 30):
                write_run(tmp_path / "sw" / f"{tag}_b{b}_s{seed}", model, params, macs,
                          _rows(macs, 256, [b + 5], [0.3 - b / 1000 - seed / 100]), seed=seed,
                          config={"trunk_run": trunk, "branch_step": b})
    write_run(tmp_path / "sw" / "plain", *SIZES[2], _rows(SIZES[2][2], 256, [40], [0.25]))
    pts = P.parametric_points(load_results(tmp_path))
    assert len(pts) == 7  # 3 branch recipes x 2 sizes (2 seeds each) and the plain run
    assert sorted(pts["n_seeds"]) == [1] + [2] * 6
    assert pts["cluster"].nunique() == 3
    by_model = pts.groupby("model")["cluster"].nunique()
    assert by_model.to_dict() == {SIZES[0][0]: 1, SIZES[1][0]: 1, SIZES[2][0]: 1}
    assert set(pts.loc[pts["model"] == SIZES[2][0], "cluster"]) == set(
        pts.loc[pts["model"] == SIZES[2][0], "recipe"])


def test_parametric_in_summary_json_through_the_cli(tmp_path):
    write_isoflop_results(tmp_path / "results", seeds=(0,), noise=0.01)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "analysis/plot_scaling.py", "--results",
                           str(tmp_path / "results"), "--out", str(out), "--n-boot", "10"],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    par = json.loads((out / "summary.json").read_text())["parametric"]
    assert set(P.PARAMS) == set(par["params"]) == set(par["intervals"])
    assert isinstance(par["at_bound"], list) and par["reason"] is None
    assert par["n_points"] == 25 and par["n_boot"] == 10
    assert par["exponent"] == pytest.approx(0.5, abs=0.1)  # the tree's truth: N_opt ∝ C^0.5
    lo, hi = par["interval"]
    assert lo <= par["exponent"] <= hi
    cmp = par["comparison"]
    assert cmp["difference"] == pytest.approx(par["exponent"] - cmp["isoflop_exponent"])
    text = (out / "summary.md").read_text()
    assert "## Compute-optimal model size (parametric fit, approach 3)" in text
    assert f"C^{par['exponent']:.3f}" in text and "approach 3 minus approach 2" in text
    assert (out / "optimal_model_size.png").is_file()


def test_the_fit_is_remembered_by_its_points_and_recomputed_when_they_change(tmp_path):
    """With a FitMemo (what --cache-dir and the default cache give the report) the second fit of
    the same points is read back, equal to the first; another point set is a miss."""
    memo, pts = FitMemo(tmp_path), _points(0).assign(cluster=[f"r{i % 7}" for i in range(25)])
    first = P.fit_parametric(pts, n_boot=20, memo=memo)
    again = P.fit_parametric(pts, n_boot=20, memo=memo)
    assert (memo.computed, memo.hits) == (1, 1)
    assert again == first and again["n_clusters"] == 7  # clusters kept as resampling units
    assert first == P.fit_parametric(pts, n_boot=20)  # the same as without a memo
    P.fit_parametric(pts.assign(error=pts["error"] * 1.01), n_boot=20, memo=memo)
    P.fit_parametric(pts, n_boot=21, memo=memo)
    assert (memo.computed, memo.hits) == (3, 1)

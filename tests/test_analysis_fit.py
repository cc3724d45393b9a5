"""analysis.fit.law: the saturating power law (Zhai et al. 2022, Sec. 2.2), bootstrap, frontier."""

import math

import numpy as np
import pytest

from analysis.fit import law as F
from analysis.synthetic import TRUE_LAW, law

# Compute from 1e13 to 1e20 FLOPs: the shift d (5e15) bends the low end, the floor c the high end,
# so all four constants are identifiable.
COMPUTE = np.logspace(13, 20, 15)
NOISE = 0.01  # 1 % multiplicative noise on the error


def _noisy(seed):
    rng = np.random.default_rng(seed)
    return law(COMPUTE) * np.exp(rng.normal(0.0, NOISE, COMPUTE.size))


def test_fit_recovers_exact_constants_without_noise():
    got = F.fit_saturating_power_law(COMPUTE, law(COMPUTE))
    for k in F.PARAMS:
        assert got[k] == pytest.approx(TRUE_LAW[k], rel=1e-3), k
    assert got["n"] == COMPUTE.size
    assert got["rmse"] < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_constants_with_noise(seed):
    got = F.fit_saturating_power_law(COMPUTE, _noisy(seed))
    # Tolerances: the exponent and floor are well determined by 15 points at 1 % noise; a and d
    # trade off against b (a = a_norm * C_ref^b), so they get looser relative bounds.
    assert got["b"] == pytest.approx(TRUE_LAW["b"], abs=0.02)
    assert got["c"] == pytest.approx(TRUE_LAW["c"], rel=0.1)
    assert got["d"] == pytest.approx(TRUE_LAW["d"], rel=0.4)
    assert got["a"] == pytest.approx(TRUE_LAW["a"], rel=0.6)
    # and the curve itself is right to within a few noise levels everywhere in the data range
    rel = F.predict(got, COMPUTE) / law(COMPUTE) - 1
    assert np.max(np.abs(rel)) < 3 * NOISE


def test_bootstrap_intervals_cover_true_values():
    boot = F.bootstrap_fit(COMPUTE, _noisy(0), n_boot=200, seed=0)
    assert boot["n_ok"] >= 190
    for k in F.PARAMS:
        lo, hi = boot["intervals"][k]
        assert lo < boot["fit"][k] < hi, k
        assert lo <= TRUE_LAW[k] <= hi, (k, lo, hi)
    # the band is narrow inside the data and contains the true curve
    lo, hi = F.prediction_band(boot, COMPUTE)
    assert np.all(lo <= law(COMPUTE) * 1.01) and np.all(hi >= law(COMPUTE) * 0.99)
    assert np.all((hi - lo) / law(COMPUTE) < 0.1)


def test_bootstrap_cases_method_runs_and_rejects_bad_method():
    boot = F.bootstrap_fit(COMPUTE, _noisy(3), n_boot=40, seed=1, method="cases")
    assert boot["n_ok"] + boot["n_failed"] == 40 and boot["n_ok"] > 30
    with pytest.raises(ValueError, match="'jackknife'"):
        F.bootstrap_fit(COMPUTE, _noisy(3), method="jackknife")


def test_fit_is_invariant_to_compute_units():
    err = _noisy(4)
    flops = F.fit_saturating_power_law(COMPUTE, err)
    exa = F.fit_saturating_power_law(COMPUTE / 1e18, err)
    assert exa["b"] == pytest.approx(flops["b"], rel=1e-3)
    assert exa["c"] == pytest.approx(flops["c"], rel=1e-3)
    assert exa["d"] * 1e18 == pytest.approx(flops["d"], rel=1e-2)


def test_fit_rejects_too_few_points_and_bad_values():
    with pytest.raises(ValueError, match="at least 4 points.*got 3"):
        F.fit_saturating_power_law([1e15, 1e16, 1e17], [0.5, 0.4, 0.3])
    with pytest.raises(ValueError, match=r"compute\[1\]=0.0"):
        F.fit_saturating_power_law([1e15, 0.0, 1e17, 1e18], [0.5, 0.4, 0.3, 0.2])
    with pytest.raises(ValueError, match=r"compute\[0\]=-5.0"):
        F.fit_saturating_power_law([-5.0, 1e16, 1e17, 1e18], [0.5, 0.4, 0.3, 0.2])
    with pytest.raises(ValueError, match=r"error\[2\]=0.0"):
        F.fit_saturating_power_law([1e15, 1e16, 1e17, 1e18], [0.5, 0.4, 0.0, 0.2])
    with pytest.raises(ValueError, match="5 values but error has 4"):
        F.fit_saturating_power_law(np.logspace(15, 19, 5), [0.5, 0.4, 0.3, 0.2])
    with pytest.raises(ValueError, match="nan"):
        F.fit_saturating_power_law([1e15, 1e16, np.nan, 1e18], [0.5, 0.4, 0.3, 0.2])


def test_fit_respects_bounds():
    got = F.fit_saturating_power_law(COMPUTE, _noisy(5))
    err = _noisy(5)
    assert got["a"] > 0 and got["b"] > 0 and got["d"] >= 0
    assert 0 <= got["c"] < err.min()


def test_pareto_frontier_on_hand_made_points():
    compute = [1, 2, 2, 3, 4, 5, 5, np.nan, 6]
    error = [0.5, 0.6, 0.4, 0.45, 0.3, 0.3, 0.2, 0.01, 0.25]
    # (2, 0.6) loses to (2, 0.4); (3, 0.45) and (6, 0.25) are beaten by cheaper points;
    # of the tie at compute 5 only the lower error is optimal; the NaN point is ignored.
    assert F.pareto_frontier(compute, error).tolist() == [0, 2, 4, 6]
    assert F.pareto_frontier([3, 1, 2], [0.1, 0.3, 0.2]).tolist() == [1, 2, 0]  # sorted by C
    assert F.pareto_frontier([], []).tolist() == []
    with pytest.raises(ValueError, match="3 values but error has 2"):
        F.pareto_frontier([1, 2, 3], [0.1, 0.2])


def test_pareto_frontier_tolerance_merges_near_equal_compute():
    # three runs of one nominal budget 1e10 (real FLOPs 0.98e10, 1.0e10, 1.01e10), then 3e10
    compute = [0.98e10, 1.0e10, 1.01e10, 3e10, 3.05e10]
    error = [0.35, 0.08, 0.17, 0.05, 0.07]
    assert F.pareto_frontier(compute, error).tolist() == [0, 1, 3]  # exact: 0.98e10 "wins"
    assert F.pareto_frontier(compute, error, rtol=0.05).tolist() == [1, 3]
    # a tolerance never admits a point that a cheaper point beats
    assert F.pareto_frontier([1.0, 1.02, 2.0], [0.1, 0.2, 0.15], rtol=0.05).tolist() == [0]
    with pytest.raises(ValueError, match="rtol"):
        F.pareto_frontier([1.0], [0.1], rtol=-1)


def test_extrapolation_check_predicts_held_out_points():
    out = F.extrapolation_check(COMPUTE, _noisy(6), holdout_fraction=0.2)
    assert out["ok"] and out["n_holdout"] == math.ceil(0.2 * COMPUTE.size)
    assert np.all(out["holdout_compute"] >= COMPUTE[-out["n_holdout"]])  # the largest computes
    assert out["mean_abs_rel_error"] < 0.05  # the law is exactly true here, so it extrapolates


def test_extrapolation_check_says_when_too_few_points():
    out = F.extrapolation_check(COMPUTE[:5], law(COMPUTE[:5]))
    assert not out["ok"]
    assert "too few frontier points" in out["message"] and "5 points" in out["message"]


def test_fit_loglinear_recovers_exponent():
    c = np.logspace(15, 21, 7)
    got = F.fit_loglinear(c, 3.0 * c ** 0.5)
    assert got["k"] == pytest.approx(0.5)
    assert F.predict_loglinear(got, c) == pytest.approx(3.0 * c ** 0.5)
    # a near-vertical slope (two sizes at almost the same compute) stays finite
    steep = F.fit_loglinear([1e10, 1.0001e10], [1e4, 1e5])
    assert np.isfinite(F.predict_loglinear(steep, [1e10])).all()
    with pytest.raises(ValueError, match="2 distinct"):
        F.fit_loglinear([1e15, 1e15], [1.0, 2.0])


def test_predict_accepts_plain_constants():
    # a dict with only a, b, c, d (e.g. typed in from a paper) works as well as a fit result
    assert F.predict(TRUE_LAW, COMPUTE) == pytest.approx(law(COMPUTE))
    fitted = F.fit_saturating_power_law(COMPUTE, law(COMPUTE))
    assert F.predict(fitted, COMPUTE) == pytest.approx(law(COMPUTE), rel=1e-6)


def test_poorly_determined_flags_loose_fits_only():
    good = F.bootstrap_fit(COMPUTE, _noisy(7), n_boot=50, seed=0)
    assert F.poorly_determined(good) == []
    # six points within one decade, far from the floor: c and d cannot be pinned down
    c = np.logspace(16, 17, 6)
    loose = F.bootstrap_fit(c, law(c) * np.exp(np.random.default_rng(0).normal(0, 0.03, 6)),
                            n_boot=50, seed=0)
    assert {"c", "d"} <= set(F.poorly_determined(loose))

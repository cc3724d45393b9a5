"""The robust (Huber) fit of E = a (C + d)^(-b) + c next to least squares, on results trees of a
known law (analysis.synthetic) written with scaling.results writers."""

import numpy as np
import pytest

from analysis.fit import frontier as FR
from analysis.fit import law as F
from analysis.load.runs import load_results
from analysis.synthetic import TRUE_LAW, law, write_synthetic_results

# Two injected faults at the ends of the frontier, where a point has the most leverage: the
# first eval of the smallest model logged 1.2x too high (83 % -> 99 % error), the last of the
# largest 0.6x too low.
OUTLIERS = {("Ti/16", 0): 1.2, ("H/14", 9): 0.6}


def _frontier(tmp_path, outliers=None, seed=0):
    write_synthetic_results(tmp_path, outliers=outliers, seed=seed)
    front = FR.frontier_table(load_results(tmp_path).evals, "flops")
    return front["flops_seen"].to_numpy(), front["error"].to_numpy(), front


def _max_rel(fit, compute):
    grid = np.logspace(np.log10(compute.min()), np.log10(compute.max()), 100)
    return float(np.max(np.abs(F.predict(fit, grid) / law(grid) - 1)))


@pytest.mark.parametrize("seed", [0, 1])
def test_huber_ignores_two_outliers_that_pull_least_squares_off(tmp_path, seed):
    c, e, front = _frontier(tmp_path, OUTLIERS, seed)
    # both faults are on the frontier (first and last point), so both fits see them
    assert front["model"].iloc[0] == "Ti/16" and front["model"].iloc[-1] == "H/14"
    assert e[0] / law(c[0]) > 1.15 and e[-1] / law(c[-1]) < 0.65
    lsq = F.fit_saturating_power_law(c, e, loss="lsq")
    hub = F.fit_saturating_power_law(c, e, loss="huber")
    assert _max_rel(lsq, c) > 0.15 and abs(lsq["b"] - TRUE_LAW["b"]) > 0.05
    assert _max_rel(hub, c) < 0.06 and abs(hub["b"] - TRUE_LAW["b"]) < 0.03
    assert {0, len(c) - 1} <= set(F.outliers(hub, c, e))


def test_both_losses_agree_on_clean_data(tmp_path):
    c, e, _ = _frontier(tmp_path)
    lsq = F.fit_saturating_power_law(c, e, loss="lsq")
    hub = F.fit_saturating_power_law(c, e, loss="huber")
    for fit in (lsq, hub):
        assert _max_rel(fit, c) < 0.04 and abs(fit["b"] - TRUE_LAW["b"]) < 0.02
    assert hub["loss"] == "huber" and lsq["loss"] == "lsq"


def test_huber_bootstrap_intervals_cover_the_truth_despite_outliers(tmp_path):
    c, e, _ = _frontier(tmp_path, OUTLIERS)
    boot = F.bootstrap_fit(c, e, n_boot=40, loss="huber")
    assert boot["n_ok"] >= 35 and boot["fit"]["loss"] == "huber"
    lo, hi = boot["intervals"]["b"]
    assert lo < boot["fit"]["b"] < hi and lo <= TRUE_LAW["b"] <= hi


def test_fit_frontier_uses_huber_by_default_and_reports_both(tmp_path):
    _, _, front = _frontier(tmp_path, OUTLIERS)
    res = FR.fit_frontier(front, "flops", n_boot=10)
    assert res["ok"] and res["loss"] == "huber" and res["alt"]["loss"] == "lsq"
    assert "default" in res["why"] and "Hoffmann et al. 2022" in res["why"]
    assert res["extrapolation"]["loss"] == "huber"
    assert res["alt_max_rel_diff"] > 0.1  # the two fits visibly disagree on these data
    chosen = FR.fit_frontier(front, "flops", n_boot=10, loss="lsq")
    assert chosen["loss"] == "lsq" and chosen["alt"]["loss"] == "huber"
    with pytest.raises(ValueError, match="loss='l1'"):
        FR.fit_frontier(front, "flops", loss="l1")


def test_extrapolation_error_of_the_robust_fit(tmp_path):
    c, e, _ = _frontier(tmp_path)
    ex = F.extrapolation_check(c, e, loss="huber")
    assert ex["ok"] and ex["loss"] == "huber" and ex["n_holdout"] == int(np.ceil(0.2 * c.size))
    # the held-out points are the largest computes, and the law predicts them within 5 %
    assert np.all(ex["holdout_compute"] >= np.sort(c)[-ex["n_holdout"]])
    assert ex["mean_abs_rel_error"] < 0.05

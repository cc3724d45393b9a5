"""analysis.fit.backtest: each law refitted without the largest size / the largest FLOPs budget
predicts the left-out runs' final errors. On trees with a known law (analysis.synthetic) the
errors are small; where the largest size breaks the law they are large."""

import json
import shutil

import numpy as np
import pytest

from analysis.fit import backtest as B
from analysis.fit.frontier import frontier_points
from analysis.load.runs import load_results
from analysis.report.build import analyse
from analysis.synthetic import (
    isoflop_error,
    write_isoflop_results,
    write_run,
    write_synthetic_results,
)
from scaling.flops import flops_for_images
from scaling.results import read_metrics

BROKEN = 0.7  # the largest size's errors are this factor of what the law says


def _points(root):
    return frontier_points(load_results(root).evals, "flops")


def _break_largest(info):
    """Rewrite the H/14 runs of an IsoFLOP tree with their errors times BROKEN."""
    for (model, budget, seed), run in info["runs"].items():
        if model != "H/14":
            continue
        rows = [{**r, "top1": 1 - BROKEN * (1 - r["top1"])} for r in read_metrics(run)]
        final = json.loads((run / "final.json").read_text())
        shutil.rmtree(run)
        write_run(run, model, final["params"], final["macs_per_image"], rows, seed=seed,
                  config={"flops": budget, "steps": None})


@pytest.fixture(scope="module")
def isoflop_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("iso")
    write_isoflop_results(root, noise=0.01)
    return root


def test_known_law_isoflop_tree_is_predicted_within_a_few_percent(isoflop_tree):
    res = B.backtest(_points(isoflop_tree), [B.frontier_method(), B.parametric_method()])
    assert list(res) == ["frontier:largest_size", "frontier:largest_budget",
                         "parametric:largest_size", "parametric:largest_budget"]
    # approach 3 predicts all 5 final points of H/14 (fitted on the 20 other runs) and all 5 of
    # the 1e20 budget; the truth is not exactly its form (D is images, and MACs per param differ
    # by size), so a few percent remain
    for key, n_used in (("parametric:largest_size", 20), ("parametric:largest_budget", 20)):
        e = res[key]
        assert e["reason"] is None and e["n_points_used"] == n_used
        assert len(e["rel_errors"]) == 5 and max(map(abs, e["rel_errors"])) < 0.08
        assert e["mean_abs_rel_error"] == pytest.approx(np.mean(np.abs(e["rel_errors"])))
    assert res["parametric:largest_size"]["held_out"] == "H/14"
    assert res["parametric:largest_budget"]["held_out"] == "1e+20 FLOPs"
    # the frontier law predicts the best final point of the 1e20 budget ...
    fb = res["frontier:largest_budget"]
    assert len(fb["rel_errors"]) == 1 and abs(fb["rel_errors"][0]) < 0.06
    assert fb["predictions"][0]["compute"] == pytest.approx(1e20, rel=0.01)
    # ... but no H/14 point is compute-optimal here, so it has nothing to predict there
    fs = res["frontier:largest_size"]
    assert fs["rel_errors"] is None and "frontier of all the runs" in fs["reason"]


def test_largest_size_off_the_law_gives_large_errors(tmp_path):
    info = write_isoflop_results(tmp_path, noise=0.01)
    _break_largest(info)
    e = B.backtest(_points(tmp_path), [B.parametric_method()], kinds=("largest_size",))
    rel = e["parametric:largest_size"]["rel_errors"]
    # predicted from the law, measured at 0.7x the law: about +1 / 0.7 - 1 = +43 %
    assert len(rel) == 5 and min(rel) > 0.3
    # far outside the measured points' own intervals (50,000 eval images each): none inside
    assert e["parametric:largest_size"]["n_within_interval"] == 0
    assert e["parametric:largest_size"]["n_with_interval"] == 5


def test_each_prediction_carries_the_measured_interval_and_the_relative_error_it_allows(
        isoflop_tree):
    """rel_error_interval = (predicted - err_hi) / err_hi .. (predicted - err_lo) / err_lo, around
    rel_error; within_interval says whether the prediction falls in [err_lo, err_hi]."""
    points = _points(isoflop_tree)
    e = B.backtest(points, [B.parametric_method()], kinds=("largest_size",))
    e = e["parametric:largest_size"]
    h14 = points[(points["model"] == "H/14") & points["is_final"]].sort_values("images_seen")
    assert e["n_with_interval"] == 5
    n_inside = 0
    for p in e["predictions"]:
        row = h14[h14["images_seen"] == p["images"]].iloc[0]
        lo, hi = row["err_lo"], row["err_hi"]
        assert p["error_interval"] == pytest.approx([lo, hi])
        assert p["rel_error_interval"] == pytest.approx(
            [(p["predicted"] - hi) / hi, (p["predicted"] - lo) / lo])
        assert p["rel_error_interval"][0] < p["rel_error"] < p["rel_error_interval"][1]
        assert p["within_interval"] == (lo <= p["predicted"] <= hi)
        n_inside += p["within_interval"]
    assert e["n_within_interval"] == n_inside


@pytest.mark.parametrize("factor, lo, hi", [(1.0, -0.05, 0.05), (BROKEN, 0.3, 0.6)])
def test_frontier_law_leaving_out_the_largest_size_of_long_curves(tmp_path, factor, lo, hi):
    # one long run per size along TRUE_LAW (a small penalty away from each size's optimal
    # compute, so the other sizes' frontier stays near the law); H/14's evals times `factor`
    write_synthetic_results(tmp_path, penalty=0.02, noise=0.005,
                            outliers={("H/14", j): factor for j in range(10)})
    res = B.backtest(_points(tmp_path), [B.frontier_method(), B.parametric_method()])
    e = res["frontier:largest_size"]
    assert e["held_out"] == "H/14" and e["n_points_used"] >= 20
    assert len(e["rel_errors"]) == 1 and lo < e["rel_errors"][0] < hi
    # no FLOPs budgets, and 4 runs are too few for the 5 constants of approach 3: said, not run
    assert "0 FLOPs budget(s)" in res["frontier:largest_budget"]["reason"]
    assert "need at least 5" in res["parametric:largest_size"]["reason"]


def test_a_method_is_a_function_the_backtest_takes(isoflop_tree):
    """Any law plugs in: the true error function predicts the left-out runs up to their noise
    (one log-normal draw per run, sd 0.01)."""
    def predict(fitted, targets):
        flops = flops_for_images(targets["macs_per_image"].to_numpy(float),
                                 targets["images_seen"].to_numpy(float))
        return isoflop_error(targets["params"].to_numpy(float), flops)

    truth = B.Method(name="truth", fit=lambda train: {"ok": True, "n_points": len(train)},
                     predict=predict, targets=lambda held, points: held, used="points")
    res = B.backtest(_points(isoflop_tree), [truth])
    for kind in B.KINDS:
        assert max(map(abs, res[f"truth:{kind}"]["rel_errors"])) < 0.04
    with pytest.raises(ValueError, match="kind='smallest'"):
        B.backtest(_points(isoflop_tree), [truth], kinds=("smallest",))


def test_backtest_heads_summary_md_and_is_in_summary_json(isoflop_tree, tmp_path):
    report = analyse(isoflop_tree, tmp_path / "out", n_boot=10)
    md = (tmp_path / "out" / "summary.md").read_text().splitlines()
    first = md.index("## Backtest: predicting the largest runs")
    assert first < 6 and first < md.index("## Extrapolation check")
    table = [line for line in md[first:first + 12] if line.startswith("| approach 3")]
    size = report.backtest["parametric:largest_size"]
    assert len(table) == 2 and "H/14" in table[0] and "20 runs' final points" in table[0]
    assert f"{100 * size['rel_errors'][0]:+.1f}%" in table[0]
    assert f"{100 * size['mean_abs_rel_error']:.1f}%" in table[0]
    bt = json.loads((tmp_path / "out" / "summary.json").read_text())["backtest"]
    assert set(bt) == {f"{m}:{k}" for m in ("frontier", "parametric") for k in B.KINDS}
    assert bt["parametric:largest_size"]["rel_errors"] == pytest.approx(size["rel_errors"])
    assert bt["parametric:largest_size"]["n_points_used"] == 20
    assert bt["frontier:largest_size"]["rel_errors"] is None
    assert bt["frontier:largest_size"]["reason"]

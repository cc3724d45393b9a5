"""analysis.fit.noise: Wilson intervals on eval points, seeds averaged into one point, ties between
sizes; on results trees written with scaling.results writers (analysis.synthetic.write_run)."""

import math

import numpy as np
import pytest
from matplotlib.collections import LineCollection

from analysis.fit import frontier as FR
from analysis.fit.noise import aggregate_seeds, close_calls, wilson_interval
from analysis.load.runs import NOT_RECIPE, load_results
from analysis.report.build import analyse
from analysis.report.figures import compute_figure
from analysis.synthetic import SIZES, write_run

MODEL, PARAMS, MACS = SIZES[1]  # S/16


def _row(step, top1, n=1000, macs=MACS):
    images = 1000 * step
    return {"kind": "eval", "step": step, "epoch": step / 10, "images_seen": images,
            "flops_seen": 6.0 * macs * images, "wall_s": 10.0 * step, "loss": 1.0,
            "top1": top1, "top5": min(1.0, top1 + 0.1), "num_samples": n}


def test_wilson_interval_matches_hand_computed_cases():
    # 80 of 100: z = 1.959964, z^2 / n = 0.0384146; centre (0.8 + 0.0192073) / 1.0384146
    # = 0.788902; half 1.959964 / 1.0384146 * sqrt(0.0016 + 0.0000960) = 0.077732, so
    # [0.711170, 0.866634] (tables print 0.7112, 0.8666)
    lo, hi = wilson_interval(0.8, 100)
    assert float(lo) == pytest.approx(0.711170, abs=2e-6)
    assert float(hi) == pytest.approx(0.866634, abs=2e-6)
    # 0 of 10: centre = half = 0.192073 / 1.384146 = 0.138767, so [0, 0.277533]
    # (the upper end is (z^2 / n) / (1 + z^2 / n) = 0.384146 / 1.384146)
    lo, hi = wilson_interval(0.0, 10)
    assert float(lo) == pytest.approx(0.0, abs=1e-12)
    assert float(hi) == pytest.approx(0.277533, abs=2e-6)
    # symmetric in p <-> 1 - p (an error interval is 1 - the accuracy interval)
    lo_acc, hi_acc = wilson_interval(0.2, 100)
    assert (float(lo_acc), float(hi_acc)) == pytest.approx((1 - 0.866634, 1 - 0.711170),
                                                           abs=2e-6)
    # narrower with more images, NaN where there is no count
    assert np.diff(wilson_interval(0.8, 10_000)) < np.diff(wilson_interval(0.8, 100))
    assert all(math.isnan(float(v)) for v in wilson_interval(0.8, 0))
    assert all(math.isnan(float(v)) for v in wilson_interval(1.2, 100))


def test_eval_table_keeps_num_samples(tmp_path):
    write_run(tmp_path / "s" / "r", MODEL, PARAMS, MACS, [_row(1, 0.5, n=321), _row(2, 0.6)])
    ev = load_results(tmp_path).evals
    assert ev["num_samples"].tolist() == [321, 1000]


def test_two_seeds_become_one_point_with_their_mean(tmp_path):
    sweep = tmp_path / "sw"
    for seed, tops in ((0, (0.70, 0.80)), (1, (0.74, 0.82))):
        write_run(sweep / f"s{seed}", MODEL, PARAMS, MACS,
                  [_row(1, tops[0]), _row(2, tops[1])], seed=seed)
    # same model and seed, another learning rate: another experiment, never averaged in
    write_run(sweep / "lr", MODEL, PARAMS, MACS, [_row(1, 0.5), _row(2, 0.6)],
              config={"lr": 3e-3})
    res = load_results(tmp_path)
    assert res.runs["recipe"].nunique() == 2
    pts = FR.frontier_points(res.evals, "flops")
    assert len(pts) == 4  # 2 steps x 2 recipes
    pair = pts[pts["n_seeds"] == 2].sort_values("step")
    assert pair["error"].to_numpy() == pytest.approx([0.28, 0.19])
    assert pair["seeds"].tolist() == ["0,1", "0,1"]
    assert pair["runs"].iloc[0] == "sw/s0; sw/s1"
    # interval across the 2 seeds: mean -/+ t(0.975, 1) sd / sqrt(2), t = 12.706;
    # errors 0.30 and 0.26 at step 1: sd / sqrt(2) = 0.02, so [0.0259, 0.5341]
    first = pair.iloc[0]
    assert first["seed_lo"] == pytest.approx(0.28 - 12.7062 * 0.02, abs=1e-4)
    assert first["err_lo"] == first["seed_lo"] and first["err_hi"] == first["seed_hi"]
    single = pts[pts["n_seeds"] == 1].sort_values("step").iloc[0]
    lo, hi = wilson_interval(0.5, 1000)
    assert (single["err_lo"], single["err_hi"]) == pytest.approx((float(lo), float(hi)))
    # the frontier is built from the averaged points and says how many seeds each has
    front = FR.frontier_table(res.evals, "flops")
    assert set(front["n_seeds"]) <= {1, 2} and "num_samples" in front


def test_not_recipe_covers_every_field_that_does_not_change_results():
    from scaling.config import RESUMABLE_FIELDS

    assert set(RESUMABLE_FIELDS) | {"seed"} <= set(NOT_RECIPE)
    assert "lr" not in NOT_RECIPE and "flops" not in NOT_RECIPE


def test_running_seed_keeps_its_own_count(tmp_path):
    write_run(tmp_path / "sw" / "a", MODEL, PARAMS, MACS, [_row(1, 0.7), _row(2, 0.8)], seed=0)
    write_run(tmp_path / "sw" / "b", MODEL, PARAMS, MACS, [_row(1, 0.72)], seed=1,
              status="running")
    pts = aggregate_seeds(load_results(tmp_path).evals).sort_values("step")
    assert pts["n_seeds"].tolist() == [2, 1]
    assert pts["status"].tolist() == ["running", "ok"]
    assert pts["error"].iloc[0] == pytest.approx(0.29)


def test_close_sizes_are_reported_and_far_ones_are_not(tmp_path):
    small, big = SIZES[0], SIZES[1]
    # two sizes evaluated on 200 images at (nearly) one compute: 30 % vs 31 % error overlaps
    for (model, params, macs), top1 in ((small, 0.70), (big, 0.69)):
        images = round(1e17 / (6 * macs))
        row = {**_row(1, top1, n=200, macs=macs), "images_seen": images,
               "flops_seen": 6.0 * macs * images}
        write_run(tmp_path / "sw" / model.replace("/", "-"), model, params, macs, [row])
    res = load_results(tmp_path)
    front = FR.frontier_table(res.evals, "flops")
    close = close_calls(FR.frontier_points(res.evals, "flops"), front, "flops_seen")
    assert close[["model", "other"]].values.tolist() == [["Ti/16", "S/16"]]
    # the same evals on 50,000 images each are told apart
    many = res.evals.assign(num_samples=50_000)
    assert close_calls(FR.frontier_points(many, "flops"), FR.frontier_table(many, "flops"),
                       "flops_seen").empty
    analyse(tmp_path, tmp_path / "out", n_boot=10)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "another size differs from the frontier size by less than their intervals" in summary
    assert "| Ti/16 | 30.00 [" in summary


def test_curves_figure_draws_each_points_wilson_interval(tmp_path):
    write_run(tmp_path / "sw" / "r", MODEL, PARAMS, MACS, [_row(1, 0.5, n=100), _row(2, 0.6)])
    ev = load_results(tmp_path).evals
    pts = FR.usable_points(ev, "flops")
    fig = compute_figure(pts, FR.frontier_table(ev, "flops"), [MODEL], {MODEL: "C0"})
    segments = [seg for c in fig.axes[0].collections if isinstance(c, LineCollection)
                for seg in c.get_segments()]
    lo, hi = wilson_interval(0.5, 100)
    x = 6.0 * MACS * 1000
    assert any(np.allclose(seg, [[x, float(lo)], [x, float(hi)]]) for seg in segments)
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]  # under axes
    assert any("95% interval (Wilson on 100–1,000 images" in t for t in labels)

"""analysis.fit.isoflop: compute-optimal size from IsoFLOP profiles (Hoffmann et al. 2022, approach
2) on sweeps of sizes x FLOPs budgets x seeds with a known N_opt ∝ C^0.5
(analysis.synthetic.write_isoflop_results, written with scaling.results writers)."""

import json

import numpy as np
import pytest

from analysis.fit import isoflop as I
from analysis.load.runs import load_results
from analysis.report.build import analyse
from analysis.report.figures_optimal import optimal_size_figure
from analysis.synthetic import (
    ISOFLOP_BUDGETS,
    SIZES,
    optimal_params,
    write_isoflop_results,
    write_run,
)
from scaling.results import read_metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exponent_is_recovered_from_5_budgets_of_5_sizes_with_noise(tmp_path, seed):
    info = write_isoflop_results(tmp_path, seeds=(0, 1), noise=0.01, seed=seed)
    assert info["exponent"] == 0.5
    res = I.optimal_size(load_results(tmp_path).evals, n_boot=200, seed=seed)
    fit = res["fit"]
    assert fit is not None and res["reason"] is None and fit["n"] == 5
    assert fit["exponent"] == pytest.approx(0.5, abs=0.05)
    lo, hi = fit["interval"]
    assert lo < 0.5 < hi and hi - lo < 0.3
    assert fit["monotone"]
    for p in res["profiles"]:
        assert p["n_sizes"] == 5 and p["bound"] is None and p["seeds"] == [2] * 5
        assert p["params_opt"] == pytest.approx(optimal_params(p["compute"]), rel=0.25)
        assert p["interval"][0] < p["params_opt"] < p["interval"][1]


def test_noise_free_profiles_put_vertices_on_the_truth(tmp_path):
    write_isoflop_results(tmp_path, noise=0.0)
    res = I.optimal_size(load_results(tmp_path).evals, n_boot=50)
    assert res["fit"]["exponent"] == pytest.approx(0.5, abs=0.01)
    for p in res["profiles"]:
        assert p["params_opt"] == pytest.approx(optimal_params(p["compute"]), rel=0.05)


def test_runs_are_grouped_by_budget_not_by_their_exact_flops(tmp_path):
    write_isoflop_results(tmp_path, budgets=ISOFLOP_BUDGETS[:3])
    ev = load_results(tmp_path).evals
    finals = ev[ev["is_final"]]
    # whole steps: every run spends a little less than its budget, each a different amount
    assert (finals["flops_seen"] < finals["budget"]).all()
    assert finals.groupby("budget")["flops_seen"].nunique().min() == len(SIZES)
    pts = I.budget_points(ev)
    assert sorted(set(pts["budget"])) == list(ISOFLOP_BUDGETS[:3])
    assert pts.groupby("budget").size().tolist() == [len(SIZES)] * 3


def test_a_vertex_beyond_the_sizes_tried_is_a_bound(tmp_path):
    # the three smallest sizes at 1e20 FLOPs: N_opt (1.9e8) is above the largest (8.7e7)
    write_isoflop_results(tmp_path, sizes=SIZES[:3], budgets=(1e20,), noise=0.0)
    res = I.optimal_size(load_results(tmp_path).evals, n_boot=50)
    (p,) = res["profiles"]
    assert p["bound"] == "lower" and p["interval"] is None
    assert p["params_opt"] == SIZES[2][1]
    assert res["fit"] is None and "need at least 3" in res["reason"]
    fig = optimal_size_figure(res)
    labels = [line.get_label() for line in fig.axes[1].lines]
    assert not any("N_{opt}" in label for label in labels)  # no line drawn
    assert "no line:" in " ".join(t.get_text() for t in fig.axes[1].texts)


def test_two_budgets_cannot_determine_the_exponent(tmp_path):
    write_isoflop_results(tmp_path, budgets=(1e18, 1e19))
    res = I.optimal_size(load_results(tmp_path).evals, n_boot=20)
    assert len(res["profiles"]) == 2 and all(p["bound"] is None for p in res["profiles"])
    assert res["fit"] is None
    assert res["reason"].startswith("2 budget(s) with a vertex inside the sizes tried")
    analyse(tmp_path, tmp_path / "out", n_boot=10)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "No exponent: 2 budget(s) with a vertex inside" in summary
    payload = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert payload["optimal_size"]["exponent"] is None
    assert len(payload["optimal_size"]["per_budget"]) == 2


def test_fewer_than_three_sizes_give_no_parabola(tmp_path):
    write_isoflop_results(tmp_path, sizes=SIZES[:2])
    res = I.optimal_size(load_results(tmp_path).evals, n_boot=20)
    assert res["profiles"] == [] and res["fit"] is None
    assert "at least 3 sizes" in res["reason"]


def test_the_best_learning_rate_of_each_size_is_used(tmp_path):
    write_isoflop_results(tmp_path, budgets=(1e19,), seeds=(0,))
    # the same runs again with another learning rate and 20 % more error: never averaged in
    for run in sorted((tmp_path / "isoflop").iterdir()):
        rows = [{**r, "top1": 1 - 1.2 * (1 - r["top1"])} for r in read_metrics(run)]
        config = json.loads((run / "config.json").read_text())
        final = json.loads((run / "final.json").read_text())
        write_run(tmp_path / "isoflop" / f"{run.name}_lr3e-3", config["model"],
                  final["params"], final["macs_per_image"], rows,
                  config={"flops": 1e19, "steps": None, "lr": 3e-3})
    pts = I.budget_points(load_results(tmp_path).evals)
    assert len(pts) == len(SIZES) and (pts["n_recipes"] == 2).all()
    assert (pts["lr"] == 1e-3).all()


def test_monotone_flags_an_optimum_that_shrinks_with_compute():
    rng = np.random.default_rng(0)

    def profile(c, n):
        return {"compute": c, "params_opt": n, "bound": None,
                "samples": np.log(n) + rng.normal(0, 0.01, 50)}

    grows = I.fit_exponent([profile(1e18, 1e7), profile(1e19, 3e7), profile(1e20, 1e8)])
    assert grows["monotone"] and grows["exponent"] == pytest.approx(0.5, abs=0.03)
    dips = I.fit_exponent([profile(1e18, 1e7), profile(1e19, 5e7), profile(1e20, 4e7)])
    assert not dips["monotone"]
    # the t interval with 1 degree of freedom is wide, and the reported one contains it
    assert dips["interval"][0] <= dips["interval_t"][0] and dips["interval_t"][1] <= \
        dips["interval"][1]


def test_two_sizes_draw_the_profiles_without_a_line(tmp_path):
    """A sweep of two sizes (the headline `--sizes S,B`) has no parabola to fit: the figure is
    still drawn (both sizes per budget on the left, no line on the right), and says why."""
    root = tmp_path / "results"
    write_isoflop_results(root, sweep="s", sizes=(("Ti/16", 5_717_416, 1.26e9),
                                                  ("S/16", 22_050_664, 4.61e9)),
                          budgets=(1e18, 3e18))
    report = analyse(root, tmp_path / "out", n_boot=10)
    assert "optimal_model_size.png" in {p.name for p in report.figures}
    assert report.optimal["fit"] is None and "at least 3 sizes" in report.optimal["reason"]

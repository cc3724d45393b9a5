"""analysis.frontier.optimal_size_fit: params_opt ∝ C^k over one point per frontier size."""

import numpy as np
import pandas as pd
import pytest

from analysis import fit as F
from analysis import frontier as FR
from analysis.figures import optimal_size_figure
from analysis.report import analyse
from analysis.summary import size_fit_section
from analysis.synthetic import SIZES, write_synthetic_results

# size -> (params, compute of its evals); errors fall with compute, so every eval is on the
# frontier: "mu" has 8 frontier points over two decades, the others 2 each.
LADDER = {"mu/4": (1.5e4, np.logspace(10, 12, 8)), "m1/4": (6e4, np.array([3e12, 1e13])),
          "m2/4": (2.4e5, np.array([3e13, 1e14]))}


def _evals(ladder: dict) -> pd.DataFrame:
    """Eval rows of a made-up sweep, one per (size, compute), error decreasing with compute."""
    rows = [{"model": m, "params": p, "flops_seen": c, "status": "ok"}
            for m, (p, cs) in ladder.items() for c in cs]
    ev = pd.DataFrame(rows)
    ev["error"] = 0.5 * (ev["flops_seen"] / 1e10) ** -0.2
    ev["top1"] = 1 - ev["error"]
    return ev


def test_size_fit_uses_one_point_per_size():
    front = FR.frontier_table(_evals(LADDER), "flops")
    assert len(front) == 12  # all points on the frontier, mu with 8 of them
    got = FR.optimal_size_fit(front, "flops")
    assert got["ok"] and got["n"] == got["n_sizes"] == 3 and got["n_frontier"] == 12
    # expected: log-log slope through each size's log-midpoint sqrt(first * last compute)
    mids = [np.sqrt(cs.min() * cs.max()) for _, cs in LADDER.values()]
    params = [p for p, _ in LADDER.values()]
    k_expected = np.polyfit(np.log(mids), np.log(params), 1)[0]
    assert got["k"] == pytest.approx(k_expected)
    assert got["points"]["model"].tolist() == list(LADDER)
    assert got["points"]["compute"].to_numpy() == pytest.approx(mids)
    # the old fit over all 12 frontier points is pulled flat by mu's eight points
    k_all = F.fit_loglinear(front["flops_seen"], front["params"])["k"]
    assert abs(got["k"] - k_all) > 0.05


def test_size_fit_needs_two_sizes_and_says_so():
    front = FR.frontier_table(_evals({"mu/4": LADDER["mu/4"]}), "flops")
    got = FR.optimal_size_fit(front, "flops")
    assert not got["ok"] and "k" not in got
    assert "only 1 model size(s) on the frontier (mu/4)" in got["message"]
    text = "\n".join(size_fit_section(got, "flops"))
    assert "Not fitted: only 1 model size(s)" in text and "| mu/4 |" in text
    fig = optimal_size_figure(front, {"mu/4": "C0"}, got)
    assert not fig.axes[0].lines  # no fitted line drawn
    empty = FR.optimal_size_fit(front.iloc[:0], "flops")
    assert not empty["ok"] and empty["n_sizes"] == 0


def test_size_fit_needs_compute_spread_between_sizes():
    ladder = {"mu/4": (1.5e4, np.array([1e10, 2e10])), "m1/4": (6e4, np.array([3e10]))}
    got = FR.optimal_size_fit(FR.frontier_table(_evals(ladder), "flops"), "flops")
    assert not got["ok"] and "need at least 0.5" in got["message"]


def test_summary_says_when_one_size_is_on_the_frontier(tmp_path):
    write_synthetic_results(tmp_path, n_evals=3, sizes=SIZES[:1])
    report = analyse(tmp_path, tmp_path / "out", n_boot=10)
    assert not report["size_fit"]["ok"]
    assert (tmp_path / "out" / "optimal_model_size.png").stat().st_size > 10_000
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## Compute-optimal model size" in summary
    assert "Not fitted: only 1 model size(s) on the frontier" in summary

"""Upstream to downstream in two steps (analysis.fit.ladder, issue 26 item 8): the link forms
recovered from synthetic truth, the chosen form, the run-clustered interval, and the whole
two-step prediction of a left-out size on a sweep whose transfer error is a known function of
its loss, through the CLI's summary.md, summary.json and figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.fit.ladder import fit_link, link, predict_interval, run_ladders
from analysis.load.runs import load_results
from analysis.report.build import read_transfer
from analysis.synthetic import write_isoflop_results, write_transfer

SIGMOID = ("sigmoid", {"c": 0.1, "a": 0.8, "k": 2.0, "L0": 1.5})
POWER = ("shifted_power", {"c": 0.05, "a": 0.3, "g": 1.5, "L0": 0.1})


def _points(truth, *, runs=10, per_run=8, noise=0.005, seed=0) -> pd.DataFrame:
    """Checkpoints of `runs` runs with losses spread over 0.3..3 nats and error = the true link
    plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    loss = np.exp(rng.uniform(np.log(0.3), np.log(3.0), runs * per_run))
    err = link(*truth, loss) + rng.normal(0.0, noise, loss.size)
    return pd.DataFrame({"loss": loss, "error": err,
                         "cluster": np.repeat([f"r{i}" for i in range(runs)], per_run)})


@pytest.mark.parametrize("truth", [SIGMOID, POWER], ids=["sigmoid", "shifted_power"])
def test_each_form_is_recovered_and_chosen_by_fit_quality(truth):
    form, true = truth
    fit = fit_link(_points(truth), n_boot=100)
    assert fit["ok"] and fit["form"] == form
    other = next(f for f in fit["forms"] if f != form)
    assert fit["forms"][form]["rmse"] < fit["forms"][other]["rmse"]
    assert fit["forms"][form]["rmse"] == pytest.approx(0.005, rel=0.3)  # the noise, no more
    got = fit["forms"][form]["params"]
    for name, value in true.items():
        assert got[name] == pytest.approx(value, rel=0.15, abs=0.02), name
    # the link's prediction and its 95 % band cover the truth inside the data
    grid = np.array([0.4, 1.0, 2.5])
    lo, hi = predict_interval(fit, grid)
    assert np.all((lo <= link(*truth, grid) + 0.003) & (link(*truth, grid) - 0.003 <= hi))
    assert np.all(hi - lo < 0.03)


def test_the_interval_resamples_runs_not_checkpoints():
    """Correlated checkpoints: each run is offset by its own draw. Resampling whole runs must
    give a wider band than the same points treated as independent."""
    pts = _points(SIGMOID, runs=8, per_run=12, noise=0.002, seed=3)
    rng = np.random.default_rng(4)
    pts["error"] += np.repeat(rng.normal(0.0, 0.02, 8), 12)
    by_run = fit_link(pts, n_boot=200)
    by_point = fit_link(pts.assign(cluster=[f"p{i}" for i in range(len(pts))]), n_boot=200)
    width = [np.subtract(*predict_interval(f, [1.0])[::-1])[0] for f in (by_run, by_point)]
    assert width[0] > 1.5 * width[1]


def test_too_few_points_or_runs_is_said_not_fitted():
    pts = _points(SIGMOID, runs=2, per_run=10)
    fit = fit_link(pts)
    assert not fit["ok"] and "at least 8 points of 3" in fit["reason"]
    flat = pts.assign(loss=1.0, cluster=np.arange(len(pts)) % 5)
    assert "same upstream loss" in fit_link(flat)["reason"]


@pytest.fixture(scope="module")
def ladder_tree(tmp_path_factory):
    """An IsoFLOP sweep (5 sizes x 5 budgets) whose 10-shot error is SIGMOID of each eval's
    loss, 1 % noise on the top-1 of each of 3 probe draws."""
    root = tmp_path_factory.mktemp("ladder")
    write_isoflop_results(root, noise=0.01)
    write_transfer(root, shots=(10,), link=SIGMOID, noise=0.01)
    return root


def test_two_step_predicts_the_left_out_size_from_its_loss(ladder_tree):
    res = load_results(ladder_tree)
    rows, _ = read_transfer(ladder_tree)
    ladder = run_ladders(res, rows, n_boot=100)
    e = ladder["fewshot:shapes:10"]
    assert e["reason"] is None and e["held_out"] == "H/14"
    assert e["form"] == "sigmoid"
    assert e["n_runs"] == 20 and e["n_points"] == 80  # 4 sizes x 5 budgets, 4 evals each
    preds = e["predictions"]
    assert len(preds) == 5 and all(p["model"] == "H/14" for p in preds)
    for p in preds:
        truth = float(link(*SIGMOID, p["loss"]))  # measured loss -> true error
        assert p["predicted"] == pytest.approx(truth, rel=0.03)
        assert p["interval"][0] < p["predicted"] < p["interval"][1]
        assert p["error_interval"][0] < p["error"] < p["error_interval"][1]
        assert p["loss_predicted"] is not None and p["predicted_chained"] is not None
    assert e["mean_abs_rel_error"] < 0.03
    # the chained prediction: approach 3 on the loss recovers it (the sweep follows E(N, D))
    assert e["mean_abs_rel_error_chained"] < 0.06
    assert set(e["direct"]) == {"frontier", "parametric"}
    assert e["direct"]["parametric"]["n_predicted"] == 5


def _cli(*args):
    return subprocess.run([sys.executable, "analysis/plot_scaling.py", *map(str, args)],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1], check=False)


def test_cli_writes_the_section_the_json_and_the_figure(ladder_tree, tmp_path):
    out = tmp_path / "out"
    r = _cli("--results", ladder_tree, "--out", out, "--n-boot", 50)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    e = summary["ladder"]["fewshot:shapes:10"]
    assert e["form"] == "sigmoid" and len(e["predictions"]) == 5
    assert "link_samples" not in e and "link_points" not in e
    md = (out / "summary.md").read_text()
    assert "## Upstream to downstream: two-step prediction" in md
    assert "`fewshot:shapes:10` | **sigmoid**" in md
    assert (out / "upstream_to_transfer.png").stat().st_size > 10_000
    assert "upstream_to_transfer.png" in summary["figures"]


def test_no_transfer_rows_no_section_and_no_figure(tmp_path):
    root = tmp_path / "res"
    write_isoflop_results(root, budgets=(1e18, 1e19), noise=0.01)
    out = tmp_path / "out"
    r = _cli("--results", root, "--out", out, "--n-boot", 20)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "summary.json").read_text())["ladder"] == {}
    assert "two-step" not in (out / "summary.md").read_text()
    assert not (out / "upstream_to_transfer.png").exists()

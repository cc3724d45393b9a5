"""Transfer metrics in the analysis (analysis.fit.transfer): --metric fewshot:NAME:K selects the
transfer rows, averages them over probe seeds per (run, step) against pre-training compute, and
goes through the same frontier, fit and summaries; a metric without rows is a one-line error
(exit 2) before anything is written; the upstream-vs-transfer figure is drawn whenever transfer
rows exist. Results trees are written with the scaling.results writers."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.fit import transfer
from analysis.fit.noise import aggregate_seeds, wilson_interval
from analysis.load.runs import load_results
from analysis.report.build import analyse, read_transfer
from analysis.synthetic import write_isoflop_results, write_transfer
from scaling.results import append_transfer

REPO = Path(__file__).resolve().parents[1]


def _row(step, top1, *, shots=10, seed=0, dataset="shapes", num_test=400, flops=None):
    return {"kind": "fewshot", "dataset": dataset, "shots": shots, "seed": seed, "top1": top1,
            "step": step, "images_seen": 64 * step,
            "flops_seen": float(flops if flops is not None else 1e12 * step),
            "num_train": 10 * shots, "num_test": num_test}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """An IsoFLOP sweep (5 sizes x 5 budgets, 2 seeds) with few-shot rows at every eval."""
    root = tmp_path_factory.mktemp("transfer") / "results"
    write_isoflop_results(root, sweep="synth", seeds=(0, 1))
    write_transfer(root, dataset="shapes", shots=(1, 5, 10), seeds=3, num_test=1000)
    return root


def test_metric_parsing_and_names():
    m = transfer.parse_metric("fewshot:shapes8:10")
    assert (m.kind, m.dataset, m.shots, m.transfer) == ("fewshot", "shapes8", 10, True)
    assert m.slug == "fewshot-shapes8-10shot" and m.label == "10-shot shapes8 error"
    assert transfer.parse_metric("finetune:cifar").slug == "finetune-cifar"
    assert not transfer.parse_metric("error").transfer
    for bad in ("fewshot:shapes", "fewshot:shapes:0", "fewshot:shapes:x", "linear:shapes:5",
                "finetune:", "errors"):
        with pytest.raises(ValueError, match="expected error, top1, loss, fewshot:NAME:K"):
            transfer.parse_metric(bad)


def test_points_average_probe_seeds_and_keep_their_counts(tmp_path):
    root = tmp_path / "results"
    run = root / "s" / "r0"
    write_isoflop_results(root, sweep="s", sizes=(("Ti/16", 5_717_416, 1.26e9),),
                          budgets=(1e18,))
    (run,) = (root / "s").iterdir()
    steps = sorted({r["step"] for r in map(json.loads, (run / "metrics.jsonl").open())
                    if r["kind"] == "eval"})
    accs = {0: 0.30, 1: 0.36, 2: 0.33}
    for step in steps:
        for seed, acc in accs.items():
            append_transfer(run, _row(step, acc, seed=seed))
            append_transfer(run, _row(step, 0.9, seed=seed, shots=1))  # another metric
    res = load_results(root)
    rows, skipped = read_transfer(root)
    assert skipped == [] and len(rows) == 6 * len(steps)
    ev = transfer.transfer_evals(res, rows, transfer.parse_metric("fewshot:shapes:10"))
    assert len(ev) == len(steps) and ev["step"].tolist() == steps
    assert np.allclose(ev["top1"], 0.33) and np.allclose(ev["error"], 0.67)
    assert (ev["probe_seeds"] == 3).all() and (ev["num_samples"] == 400).all()
    assert np.allclose(ev["probe_sd"], np.std([0.30, 0.36, 0.33], ddof=1))
    assert ev["is_final"].tolist() == [False] * (len(steps) - 1) + [True]
    assert (ev["model"] == "Ti/16").all() and ev["wall_s"].notna().all()  # from the eval rows
    pts = aggregate_seeds(ev)
    assert (pts["n_seeds"] == 1).all()  # one training seed: the draws are not seeds
    lo, hi = wilson_interval(0.67, 400)  # on the test images, not 3 x 400 trials
    half = 4.302653 * np.std([0.30, 0.36, 0.33], ddof=1) / np.sqrt(3)  # t(2) over the draws
    assert np.allclose(pts["wilson_lo"], lo) and np.allclose(pts["wilson_hi"], hi)
    assert np.allclose(pts["err_lo"], min(lo, 0.67 - half))
    assert np.allclose(pts["err_hi"], max(hi, 0.67 + half))


def test_bad_transfer_lines_are_skipped_and_named(tmp_path):
    root = tmp_path / "results"
    write_isoflop_results(root, sweep="s", sizes=(("Ti/16", 5_717_416, 1.26e9),),
                          budgets=(1e18,))
    (run,) = (root / "s").iterdir()
    good = json.dumps(_row(1, 0.5))
    lines = [good, good, json.dumps(_row(2, 1.5)), "{torn", json.dumps(_row(3, 0.4, seed=1)),
             json.dumps(_row(3, 0.41, seed=1))]
    (run / "transfer.jsonl").write_text("\n".join(lines) + "\n")
    rows, skipped = read_transfer(root)
    assert rows[["step", "top1"]].values.tolist() == [[1, 0.5]]
    reasons = {s.line: s.reason for s in skipped}
    assert set(reasons) == {2, 3, 4, 5, 6}
    assert "exact copy" in reasons[2] and "top1=1.5" in reasons[3]
    assert "not JSON" in reasons[4] and "none is kept" in reasons[5]
    assert reasons[5] == reasons[6]


def test_fewshot_metric_goes_through_frontier_fit_isoflop_and_summary(tree, tmp_path):
    out = tmp_path / "out"
    report = analyse(tree, out, metric="fewshot:shapes:10", n_boot=20)
    names = {p.name for p in report.figures}
    assert {"fewshot-shapes-10shot_vs_flops.png", "scaling_law_fit.png",
            "optimal_model_size.png", "upstream_vs_transfer.png"} <= names
    ev = report.results.evals
    assert (ev["num_samples"] == 1000).all() and (ev["probe_seeds"] == 3).all()
    frontier = report.frontier
    assert (frontier["n_seeds"] == 2).all()  # training seeds, averaged after the draws
    up = report.upstream.evals
    # the synthetic transfer error is above the upstream one at every point (top1 x 0.95)
    assert frontier["error"].min() > up["error"].min()
    assert report.fit["ok"] and report.optimal["profiles"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "fewshot:shapes:10"
    assert summary["transfer"]["is_transfer"] and summary["transfer"]["label"] == \
        "10-shot shapes error"
    assert [m["metric"] for m in summary["transfer"]["available"]] == [
        "fewshot:shapes:1", "fewshot:shapes:5", "fewshot:shapes:10"]
    assert all(p["probe_seeds"] == 3 for p in summary["frontier"])
    md = (out / "summary.md").read_text()
    assert "## Transfer" in md and "**10-shot shapes error**" in md and "k-shot draws" in md
    assert len(pd.read_csv(out / "transfer.csv")) == 50 * 4 * 9


def test_side_by_side_figure_with_the_upstream_metric(tree, tmp_path):
    report = analyse(tree, tmp_path / "out", metric="error", n_boot=10)
    path = tmp_path / "out" / "upstream_vs_transfer.png"
    assert path in report.figures and path.stat().st_size > 20_000
    assert (tmp_path / "out" / "error_vs_flops.png").exists()
    assert not json.loads((tmp_path / "out" / "summary.json").read_text())["transfer"][
        "is_transfer"]


def _cli(*args):
    return subprocess.run([sys.executable, "analysis/plot_scaling.py", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("metric, says", [
    ("fewshot:cifar:10", "no fewshot dataset 'cifar'"),
    ("fewshot:shapes:25", "no fewshot 25-shot rows of 'shapes'"),
    ("finetune:shapes", "no finetune dataset 'shapes'"),
    ("linear:shapes:10", "unknown kind 'linear'"),
])
def test_a_metric_without_rows_is_one_line_exit_2_before_any_work(tree, tmp_path, metric,
                                                                   says):
    out = tmp_path / "out"
    proc = _cli("--results", tree, "--out", out, "--metric", metric)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and says in proc.stderr
    if not metric.startswith("linear"):
        assert "available: error, top1, loss, fewshot:shapes:1, fewshot:shapes:5, " \
               "fewshot:shapes:10" in proc.stderr
    assert not out.exists()  # nothing written, not even the metrics cache


def test_no_transfer_rows_lists_the_upstream_metrics(tmp_path):
    root = tmp_path / "results"
    write_isoflop_results(root, sweep="s", sizes=(("Ti/16", 5_717_416, 1.26e9),),
                          budgets=(1e18,))
    proc = _cli("--results", root, "--out", tmp_path / "out", "--metric", "fewshot:shapes:10")
    assert proc.returncode == 2 and "no transfer.jsonl rows" in proc.stderr
    assert "available: error, top1" in proc.stderr
    report = analyse(root, tmp_path / "out2", n_boot=10)  # upstream: a note, no figure
    assert not any(p.name.startswith("upstream_vs_transfer") for p in report.figures)
    assert any("no transfer.jsonl rows" in n for n in report.notes)


def test_finetune_rows_give_the_finetune_metric(tmp_path):
    """The rows scaling.finetune writes (kind finetune, shots null; scaling.results schema)
    are read and analysed as `--metric finetune:NAME`; a finetune row with shots is skipped."""
    root = tmp_path / "results"
    write_isoflop_results(root, sweep="s", sizes=(("Ti/16", 5_717_416, 1.26e9),
                                                  ("S/16", 22_050_664, 4.61e9)),
                          budgets=(1e18, 3e18))
    for k, run in enumerate(sorted((root / "s").iterdir())):
        append_transfer(run, {"kind": "finetune", "dataset": "stripes", "shots": None,
                              "seed": 0, "top1": 0.6 + 0.05 * k, "step": 10, "images_seen": 640,
                              "flops_seen": 1e18 * (k + 1), "num_test": 200})
    (run / "transfer.jsonl").open("a").write(json.dumps(
        {**_row(10, 0.7, dataset="stripes"), "kind": "finetune"}) + "\n")
    rows, skipped = read_transfer(root)
    assert len(rows) == 4 and set(rows["kind"]) == {"finetune"} and rows["shots"].isna().all()
    assert len(skipped) == 1 and "a fine-tune uses no k-shot set" in skipped[0].reason
    assert "finetune:stripes" in transfer.metric_names(rows)
    report = analyse(root, tmp_path / "out", metric="finetune:stripes", n_boot=10)
    assert report.results.evals["num_samples"].eq(200).all()


def test_two_finetune_recipes_are_both_kept_and_one_must_be_named(tmp_path):
    """Issue 27 N23c: two fine-tunes of one run on one set (another --finetune-lr) write rows
    that differ by `recipe` only. Both are kept (not dropped as a clash, not averaged as seeds),
    and `--metric finetune:NAME` names the recipes to choose from (one line, exit 2)."""
    root = tmp_path / "results"
    write_isoflop_results(root, sweep="s", sizes=(("Ti/16", 5_717_416, 1.26e9),
                                                  ("S/16", 22_050_664, 4.61e9)),
                          budgets=(1e18, 3e18))
    for k, run in enumerate(sorted((root / "s").iterdir())):
        for recipe, top1 in (("a1b2c3", 0.6), ("d4e5f6", 0.8)):
            append_transfer(run, {"kind": "finetune", "dataset": "stripes", "shots": None,
                                  "seed": 0, "top1": top1 + 0.01 * k, "step": 10,
                                  "images_seen": 640, "flops_seen": 1e18 * (k + 1),
                                  "num_test": 200, "recipe": recipe})
    rows, skipped = read_transfer(root)
    assert len(rows) == 8 and not skipped
    assert [m for m in transfer.metric_names(rows) if m.startswith("finetune")] == \
        ["finetune:stripes:a1b2c3", "finetune:stripes:d4e5f6"]
    proc = _cli("--results", root, "--out", tmp_path / "out", "--metric", "finetune:stripes")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "2 recipes; name one: finetune:stripes:a1b2c3, finetune:stripes:d4e5f6" in proc.stderr
    report = analyse(root, tmp_path / "out", metric="finetune:stripes:d4e5f6", n_boot=10)
    evals = report.results.evals
    assert sorted(evals["error"].round(6)) == sorted((0.2 - 0.01 * np.arange(4)).round(6))


def test_a_branch_counts_only_its_own_probes_and_a_trunk_has_no_final(tmp_path):
    """A branch run starts with copies of its trunk's transfer rows up to branch_step
    (scaling/branch.py): those are the trunk's, counted once there; the trunk's last probe is no
    budget's final point (it stops before any cooldown)."""
    from analysis.synthetic import SIZES, write_run

    model, params, macs = SIZES[0]

    def ev(step, top1):
        return {"kind": "eval", "step": step, "epoch": step / 10, "images_seen": 64 * step,
                "flops_seen": 1e12 * step, "wall_s": step, "loss": 1.0, "top1": top1,
                "top5": None, "num_samples": 100}

    trunk = write_run(tmp_path / "sw" / "trunk", model, params, macs,
                      [ev(s, 0.5) for s in (1, 2, 3)])
    branch = write_run(tmp_path / "sw" / "branch", model, params, macs,
                       [ev(1, 0.5), ev(2, 0.5), ev(3, 0.6)],
                       config={"trunk_run": "trunk", "branch_step": 2})
    for run, steps in ((trunk, (1, 2, 3)), (branch, (1, 2, 3))):
        for s in steps:
            append_transfer(run, _row(s, 0.3 + 0.01 * s + (0.1 if run == branch else 0)))
    res = load_results(tmp_path, cache_dir=None)
    rows, _ = read_transfer(tmp_path)
    pts = transfer.transfer_evals(res, rows, transfer.parse_metric("fewshot:shapes:10"))
    steps = {run: sorted(g["step"]) for run, g in pts.groupby("run_id")}
    assert steps == {"trunk": [1, 2, 3], "branch": [3]}
    assert sorted(pts[pts["is_final"]]["run_id"]) == ["branch"]

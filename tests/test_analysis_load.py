"""analysis.load.runs and analysis.fit.frontier on synthetic run dirs written with scaling.results."""

import json
import logging

import numpy as np
import pandas as pd
import pytest

from analysis.fit import frontier as FR
from analysis.load.bench_rows import load_bench
from analysis.load.runs import (
    NoResultsError,
    load_results,
    model_order,
    select_sweeps,
    status_counts,
)
from analysis.synthetic import SIZES, write_bench, write_run, write_synthetic_results
from scaling.results import append_metrics, write_json


def _eval_row(step, images, macs, top1):
    return {"kind": "eval", "step": step, "epoch": images / 1000, "images_seen": images,
            "flops_seen": 6.0 * macs * images, "wall_s": 10.0 * step, "loss": 1.0,
            "top1": top1, "top5": None if top1 is None else min(1.0, top1 + 0.1),
            "num_samples": 100}


@pytest.fixture
def results(tmp_path):
    """Five healthy runs, plus running / diverged / failed runs and three broken files."""
    info = write_synthetic_results(tmp_path, n_evals=6)
    model, params, macs = SIZES[2]  # B/16
    sweep = tmp_path / "synth"
    evals = [_eval_row(s, 1000 * s, macs, 0.2 + 0.05 * s) for s in (1, 2)]
    write_run(sweep / "running", model, params, macs, evals, status="running")
    # a diverged run with a spectacular early point: kept and marked, but not on the frontier
    bad = [_eval_row(1, 10, macs, 0.999), _eval_row(2, 20, macs, None)]
    write_run(sweep / "diverged", model, params, macs, bad, status="diverged",
              error="loss is NaN at step 2")
    write_run(sweep / "failed", model, params, macs, evals[:1], status="failed", error="OOM")
    broken = tmp_path / "broken"
    (broken / "bad_config").mkdir(parents=True)
    (broken / "bad_config" / "config.json").write_text("{not json")
    write_run(broken / "bad_final", model, params, macs, evals)
    write_json(broken / "bad_final" / "final.json", {"status": "ok"})  # missing keys
    run = write_run(broken / "bad_line", model, params, macs, evals[:1])
    with open(run / "metrics.jsonl", "a") as f:
        f.write("garbage\n")
    append_metrics(run, evals[1])
    return tmp_path, info


def test_model_names_are_read_by_the_model_s_own_parser(tmp_path):
    """config.json's model through scaling.model.split_name: SIZE/PATCH of the size table; a
    run under any other name is skipped, naming the valid sizes."""
    evals = [_eval_row(1, 100, 4e6, 0.5)]
    for name in ("B/16", "mu/4", "m2/4", "B16", "B/", "/16", "B/x", None, "X/16"):
        write_run(tmp_path / "s" / str(name).replace("/", "_"), name, 1000, 4e6, evals)
    res = load_results(tmp_path)
    runs = res.runs.set_index("run_id")
    assert runs[["size", "patch"]].to_dict("index") == {
        "B_16": {"size": "B", "patch": 16}, "mu_4": {"size": "mu", "patch": 4},
        "m2_4": {"size": "m2", "patch": 4}}
    assert sorted(s.path.split("/")[-2] for s in res.skipped) == sorted(
        ["B16", "B_", "_16", "B_x", "None", "X_16"])
    assert all("unknown ViT name" in s.reason and "'Ti'" in s.reason for s in res.skipped)


def test_load_keeps_and_marks_every_status(results, caplog):
    root, _ = results
    with caplog.at_level(logging.WARNING, logger="analysis"):
        res = load_results(root)
    runs = res.runs.set_index("run_id")
    assert runs.loc["running", "status"] == "running"
    assert runs.loc["diverged", "status"] == "diverged"
    assert runs.loc["failed", "status"] == "failed"
    assert runs.loc["diverged", "message"] == "loss is NaN at step 2"
    assert status_counts(res.runs) == {"ok": 6, "running": 1, "failed": 1, "diverged": 1}
    # one row per eval point, running/diverged rows included; the diverged run's NaN top-1
    # row is skipped (a skipped line, never plotted), its valid row kept
    assert len(res.evals) == 5 * 6 + 2 + 1 + 1 + 2
    assert res.evals["top1"].notna().all()
    assert res.runs.set_index("run_id").loc["diverged", "n_evals"] == 1
    # final points only for finished runs; a running run's last eval is not "final"
    assert not res.evals.loc[res.evals["run_id"] == "running", "is_final"].any()
    assert res.evals.groupby("run")["is_final"].sum().max() == 1
    assert set(res.evals.columns) >= {"sweep", "size", "patch", "params", "macs_per_image",
                                      "images_seen", "flops_seen", "device_hours", "top1",
                                      "top5", "loss", "status"}


def test_malformed_files_are_reported_and_skipped(results, caplog):
    root, _ = results
    with caplog.at_level(logging.WARNING, logger="analysis"):
        res = load_results(root)
    paths = sorted(s.path for s in res.skipped)
    assert res.n_skipped == 4
    assert paths == sorted([*(str(root / "broken" / p) for p in (
        "bad_config/config.json", "bad_final/final.json", "bad_line/metrics.jsonl:2")),
        str(root / "synth" / "diverged" / "metrics.jsonl:2")])  # its top-1 is null
    for path in paths:
        assert path in caplog.text
    # the run with a bad metrics line keeps its valid rows; the other two are skipped whole
    assert set(res.runs["run_id"]) & {"bad_config", "bad_final"} == set()
    assert (res.evals["run_id"] == "bad_line").sum() == 2


def test_derived_columns(results):
    root, _ = results
    res = load_results(root)
    ev = res.evals.set_index("run_id")
    _, params, macs = SIZES[2]
    # a run without final.json gets params from its sweep-mates and MACs from flops / images
    assert ev.loc["running", "params"].unique().tolist() == [params]
    assert ev.loc["running", "macs_per_image"].iloc[0] == pytest.approx(macs)
    # per-row device hours end at the run's total for finished runs
    run = res.runs.set_index("run_id").loc["B-16_s0"]
    last = res.evals[res.evals["run_id"] == "B-16_s0"].iloc[-1]
    assert last["device_hours"] == pytest.approx(run["device_hours"])
    assert res.evals["error"].equals(1 - res.evals["top1"])
    # sizes order small -> large by parameter count
    assert model_order(res.runs) == [m for m, _, _ in SIZES]


def test_frontier_excludes_diverged_and_failed_runs(results):
    root, _ = results
    res = load_results(root)
    front = FR.frontier_table(res.evals, "flops")
    assert "diverged" not in set(front["run_id"])
    assert front["flops_seen"].is_monotonic_increasing
    assert front["error"].is_monotonic_decreasing
    # with diverged runs allowed, its 99.9 % point at tiny compute would lead the frontier
    anyrun = FR.frontier_table(res.evals, "flops", statuses=("ok", "running", "diverged"))
    assert anyrun.iloc[0]["run_id"] == "diverged"


def test_frontier_fit_recovers_synthetic_law(tmp_path):
    info = write_synthetic_results(tmp_path, n_evals=10, seed=0)
    res = load_results(tmp_path)
    result = FR.fit_frontier(FR.frontier_table(res.evals, "flops"), "flops", n_boot=50)
    assert result["ok"]
    true, got = info["law"], result["fit"]
    # the frontier only approximates the law (the per-size penalty lifts it between sizes)
    assert got["b"] == pytest.approx(true["b"], abs=0.03)
    assert got["c"] == pytest.approx(true["c"], rel=0.15)
    assert got["d"] == pytest.approx(true["d"], rel=0.5)


def test_fit_frontier_says_when_too_few_points(tmp_path):
    write_synthetic_results(tmp_path, n_evals=2, sizes=SIZES[:2])
    res = load_results(tmp_path)
    result = FR.fit_frontier(FR.frontier_table(res.evals, "flops"), "flops")
    assert not result["ok"] and "need at least 5" in result["message"]


def test_empty_or_missing_results_dir_is_an_error(tmp_path):
    with pytest.raises(NoResultsError, match="does not exist"):
        load_results(tmp_path / "nope")
    with pytest.raises(NoResultsError, match="no runs under"):
        load_results(tmp_path)
    (tmp_path / "sweep" / "run").mkdir(parents=True)  # a dir without config.json is no run
    with pytest.raises(NoResultsError, match="no runs under"):
        load_results(tmp_path)
    (tmp_path / "sweep" / "run" / "config.json").write_text("[1, 2]")
    with pytest.raises(NoResultsError, match="none of the 1 runs"):
        load_results(tmp_path)


def test_load_bench(tmp_path):
    assert load_bench(tmp_path)[0].empty
    path = write_bench(tmp_path)
    with open(path, "a") as f:
        f.write("{broken\n" + json.dumps({"model": "B16", "images_per_s": 1.0}) + "\n")
    bench, skipped = load_bench(tmp_path)
    assert len(bench) == 2 * len(SIZES)
    assert [s.path for s in skipped] == [f"{path}:{2 * len(SIZES) + i}" for i in (1, 2)]
    assert isinstance(bench["images_per_s"], pd.Series) and np.all(bench["images_per_s"] > 0)
    # rows of the benchmark's other modes are valid rows, left out without a warning
    (tmp_path / "bench" / "zero_memory.jsonl").write_text(
        json.dumps({"kind": "zero_memory", "model": "Ti/16", "zero": 3}) + "\n"
        + json.dumps({"kind": "overhead", "model": "m2/4", "steps": 10}) + "\n")
    # and the host-cost benchmark's rows (scaling.bench.host, results/bench/host.jsonl)
    (tmp_path / "bench" / "host.jsonl").write_text(
        json.dumps({"kind": "host_stage", "stage": "decode", "cpu_ms_per_image": 1.0}) + "\n"
        + json.dumps({"kind": "host_cores", "model": "B/16", "images_per_s_per_gpu": 4690})
        + "\n")
    again, skipped_again = load_bench(tmp_path)
    assert len(again) == len(bench) and len(skipped_again) == len(skipped)


def test_select_sweeps(tmp_path):
    write_synthetic_results(tmp_path, sweep="a", n_evals=2, sizes=SIZES[:2])
    write_synthetic_results(tmp_path, sweep="b", n_evals=3, sizes=SIZES[:1])
    res = load_results(tmp_path)
    assert sorted(set(res.runs["sweep"])) == ["a", "b"]
    only_b = select_sweeps(res, ["b"])
    assert set(only_b.runs["sweep"]) == {"b"} and len(only_b.evals) == 3
    with pytest.raises(NoResultsError, match=r"\['c'\] not found.*\['a', 'b'\]"):
        select_sweeps(res, ["b", "c"])


def test_plan_json_supplies_params_of_unfinished_runs(tmp_path):
    run = write_run(tmp_path / "s" / "r", "m2/4", None, 4e6,
                    [_eval_row(1, 100, 4e6, 0.5)], status="running")
    write_json(run / "plan.json", {"params": 12345, "macs_per_image": 4e6, "world_size": 2})
    res = load_results(tmp_path)
    row = res.evals.iloc[0]
    assert row["params"] == 12345 and row["status"] == "running"
    assert row["device_hours"] == pytest.approx(10.0 / 3600 * 2)  # wall_s x world_size


def test_throughput_bars_of_a_model_come_from_one_configuration():
    from analysis.report.figures import comparable_latest

    def row(impl, ips, device, time):
        return {"model": "S/16", "impl": impl, "images_per_s": ips, "device": device,
                "precision": "fp32", "compile": False, "batch_size": 8, "time": time}

    bench = pd.DataFrame([
        row("ours", 4.6, "cpu (2 threads)", "2026-01-01T00:00:00"),   # older, faster setting
        row("transformers", 4.8, "cpu (2 threads)", "2026-01-01T00:00:01"),
        row("transformers", 2.4, "cpu (1 threads)", "2026-01-02T00:00:00"),
        row("ours", 2.6, "cpu (1 threads)", "2026-01-02T00:00:01"),
        row("ours", 2.8, "cpu (1 threads)", "2026-01-03T00:00:00"),  # latest of that setting
        row("transformers", 2.5, "cpu (1 threads)", "2026-01-03T00:00:01"),
    ])
    got = comparable_latest(bench).set_index("impl")
    assert set(got["device"]) == {"cpu (1 threads)"}
    assert got.loc["ours", "images_per_s"] == 2.8
    assert got.loc["transformers", "images_per_s"] == 2.5


def test_a_branch_counts_only_its_own_evals(tmp_path):
    """A branch run dir starts with a copy of its trunk's rows up to branch_step (scaling/branch
    .py); those evals are the trunk's measurements and must be counted once, in the trunk."""
    model, params, macs = SIZES[0]
    trunk_rows = [_eval_row(s, 1000 * s, macs, 0.1 * s) for s in (1, 2, 3, 4)]
    write_run(tmp_path / "sw" / "trunk", model, params, macs, trunk_rows)
    branch_rows = trunk_rows[:2] + [_eval_row(s, 1000 * s, macs, 0.15 * s) for s in (3, 4)]
    write_run(tmp_path / "sw" / "branch", model, params, macs, branch_rows,
              config={"trunk_run": "trunk", "branch_step": 2})
    res = load_results(tmp_path, cache_dir=tmp_path / "cache")
    steps = {run: sorted(g["step"]) for run, g in res.evals.groupby("run_id")}
    assert steps == {"trunk": [1, 2, 3, 4], "branch": [3, 4]}
    assert int(res.runs.set_index("run_id").loc["branch", "n_evals"]) == 2


def test_a_trunk_has_no_final_eval(tmp_path):
    """A branching sweep's trunk stops before any cooldown: its evals are curve points, but its
    last one is no budget's final eval (not on a size's final line, not in IsoFLOP profiles)."""
    model, params, macs = SIZES[0]
    rows = [_eval_row(s, 1000 * s, macs, 0.1 * s) for s in (1, 2, 3, 4)]
    write_run(tmp_path / "sw" / "trunk", model, params, macs, rows)
    write_run(tmp_path / "sw" / "branch", model, params, macs,
              rows[:2] + [_eval_row(3, 3000, macs, 0.5)],
              config={"trunk_run": "trunk", "branch_step": 2})
    write_run(tmp_path / "sw" / "plain", model, params, macs, rows[:3])
    res = load_results(tmp_path, cache_dir=None)
    finals = res.evals[res.evals["is_final"]]
    assert sorted(finals["run_id"]) == ["branch", "plain"]
    assert len(res.evals[res.evals["run_id"] == "trunk"]) == 4  # its curve is kept


def test_fine_tune_runs_are_left_out_and_said(tmp_path):
    """A fine-tune run dir (config init_from: scaling.finetune) trains on another data set from
    a finished run: it is no pre-training point; the analysis leaves it out and says so."""
    from analysis.report.build import analyse

    write_synthetic_results(tmp_path, n_evals=4)
    model, params, macs = SIZES[0]
    write_run(tmp_path / "synth-finetune" / "ft", model, params, macs,
              [_eval_row(1, 10, macs, 0.9)], config={"init_from": str(tmp_path / "synth" / "x")})
    res = load_results(tmp_path, cache_dir=None)
    assert res.finetunes == ("synth-finetune/ft",) and "ft" not in set(res.runs["run_id"])
    report = analyse(tmp_path, tmp_path / "out", n_boot=10)
    assert any("1 fine-tune run(s) left out" in n for n in report.notes)


def test_runs_on_different_data_sets_are_named_and_noted(tmp_path):
    """Two sweeps on two data sets (the demo's digits and demo-full's shapes, say) in one
    results dir: load_results says which sweeps used which data, --sweep narrows it, and the
    report notes the mix, naming both, because one law over two tasks is no scaling law."""
    from analysis.report.build import analyse

    for sweep, data in (("digits", "/d/digits"), ("shapes", "/d/shapes")):
        for model, params, macs in SIZES[:3]:
            evals = [{"kind": "eval", "step": s, "epoch": 0.0, "images_seen": s * 256,
                      "flops_seen": 6.0 * macs * s * 256, "wall_s": float(s), "loss": 1.0,
                      "top1": 0.5 + s / 1000, "top5": 0.95, "num_samples": 1000}
                     for s in (100, 200, 400)]
            write_run(tmp_path / sweep / model.replace("/", "-"), model, params, macs, evals,
                      config={"data": data})
    res = load_results(tmp_path)
    assert res.data_sets == {"/d/digits": ["digits"], "/d/shapes": ["shapes"]}
    assert select_sweeps(res, ["shapes"]).data_sets == {"/d/shapes": ["shapes"]}
    report = analyse(tmp_path, tmp_path / "out", n_boot=10)
    mixed = [n for n in report.notes if "different data sets" in n]
    assert len(mixed) == 1 and "/d/digits: digits" in mixed[0] and "/d/shapes: shapes" in mixed[0]
    assert "different data sets" in (tmp_path / "out" / "summary.md").read_text()
    one = analyse(tmp_path, tmp_path / "one", n_boot=10, sweeps=["shapes"])
    assert not [n for n in one.notes if "different data sets" in n]


def _train_row(step, flops):
    return {"kind": "train", "step": step, "epoch": 0.1, "images_seen": 10 * step,
            "flops_seen": flops, "wall_s": 1.0 * step, "loss": 1.0, "lr": 1e-3,
            "images_per_s": 10.0, "tflops": 1.0, "mfu": None, "mem_gb": 1.0,
            "skipped_samples": 0}


def test_compute_spent_comes_from_the_loaded_results(tmp_path):
    """compute_spent counts every run dir once, from what load_results read (issue 25 item 3):
    finished runs by final.json, a running one by its largest flops_seen (a train row's, past
    the last eval, and a broken line's ignored), fine-tunes and runs the tables skip included,
    a branch without its trunk's prefix; the same through a cold and a warm cache."""
    import os
    import time

    from analysis.fit.compute import sweep_compute

    model, params, macs = SIZES[0]
    rows = [_eval_row(s, 1000 * s, macs, 0.1 * s) for s in (1, 2, 3, 4)]
    per_image = 6.0 * macs
    write_run(tmp_path / "sw" / "trunk", model, params, macs, rows)  # 4000 images
    write_run(tmp_path / "sw" / "branch", model, params, macs,
              rows[:2] + [_eval_row(s, 1000 * s, macs, 0.15 * s) for s in (3, 4, 5)],
              config={"trunk_run": "trunk", "branch_step": 2, "batch_size": 1000})
    write_json(tmp_path / "sw" / "branch" / "plan.json", {"macs_per_image": macs})
    live = write_run(tmp_path / "sw" / "live", model, params, macs, rows[:2], status="running")
    append_metrics(live, _train_row(3, per_image * 2500))  # past the last eval (2000 images)
    with open(live / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "flops_seen": 1e30}\n{"flops_seen": 2e30, "kind": "tr')
    write_run(tmp_path / "sw-finetune" / "ft", model, params, macs, rows[:1],
              config={"init_from": str(tmp_path / "sw" / "trunk")})  # 1000 images
    write_run(tmp_path / "sw" / "bad-name", model, params, macs, rows[:3],
              config={"model": "nope"})  # skipped by the tables: 3000 images still spent
    write_run(tmp_path / "sw" / "bad-final", model, params, macs, rows[:3])
    (tmp_path / "sw" / "bad-final" / "final.json").write_text("{")  # unreadable: 0 counted
    newest = max(os.stat(p).st_ctime for p in tmp_path.rglob("*") if p.is_file())
    time.sleep(max(0.0, newest + 2.05 - time.time()))  # older than the cache's racy window
    spent = per_image * (4000 + (5000 - 2000) + 2500 + 1000 + 3000)
    independent = per_image * (5000 + 2500 + 1000 + 3000)
    for cache in (None, tmp_path / "cache", tmp_path / "cache"):
        res = load_results(tmp_path, cache_dir=cache)
        assert set(res.runs["run_id"]) == {"trunk", "branch", "live"}
        got = sweep_compute(res)
        assert got["compute_spent"] == pytest.approx(spent, rel=1e-12)
        assert got["compute_independent"] == pytest.approx(independent, rel=1e-12)
        assert sweep_compute(select_sweeps(res, ["sw"])) == got  # the whole results dir
    assert res.cache["hits"] == 3  # warm: the running run's largest flops_seen from the cache
    # (the other run dirs have a final.json: their metrics files are not needed, nor read)


def test_one_recipe_and_seed_in_two_run_dirs_is_counted_once(tmp_path):
    """Two dirs of one recipe and seed (run ids made before they left out the world size,
    found by launchers/legacy.py; or a copied dir) are one experiment trained twice: the
    finished one is kept, the other skipped naming it; their compute is still counted."""
    model, params, macs = SIZES[0]
    ev = [{"kind": "eval", "step": s, "epoch": s / 10, "images_seen": 64 * s,
           "flops_seen": 1e12 * s, "wall_s": s, "loss": 1.0, "top1": 0.5, "top5": 0.9,
           "num_samples": 100} for s in (1, 2)]
    write_run(tmp_path / "sw" / "mu4_3e9_33a22f", model, params, macs, ev)  # the old id, done
    write_run(tmp_path / "sw" / "mu4_3e9_42747d", model, params, macs, ev[:1], status="running")
    write_run(tmp_path / "sw" / "mu4_3e9_9b0c1d", model, params, macs, ev, seed=1)  # a 2nd seed
    res = load_results(tmp_path)
    assert sorted(res.runs["run_id"]) == ["mu4_3e9_33a22f", "mu4_3e9_9b0c1d"]
    (left,) = res.skipped
    assert left.path == str(tmp_path / "sw" / "mu4_3e9_42747d")
    assert "as sw/mu4_3e9_33a22f" in left.reason
    assert len(res.evals) == 4  # 2 evals of each kept run, none of the repeat
    assert len(res.spend) == 3  # its compute was spent all the same

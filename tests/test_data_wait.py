"""Every run says when the input set its speed: `data_wait_fraction` in train rows and final.json
(scaling/results.py), one warning per input-bound window, the local sweep's closing line, and
the analysis's runs.csv column, summary.md note and summary.json list."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import train_env

from analysis.synthetic import write_synthetic_results
from launchers.sweep import main as sweep_main
from scaling import results
from scaling.results import INPUT_BOUND

REPO = Path(__file__).resolve().parents[1]
# Streamed images decoded in the training process itself (no workers) for a micro model at
# 8 px: at batch 64 the decoding takes about twice as long as the step (measured 0.62-0.77 of
# the loop per window on 2 shared cores), several times the 0.10 at which a run is input-bound.
# A window can still dip when another process takes the cores during its steps, so the tests
# check that the warnings and the summary line match the logged fractions exactly, and that
# the run as a whole was input-bound.
STREAMED = ["--in-memory", "off", "--num-workers", "0"]
WARNING = re.compile(r"input-bound: steps (\d+)-(\d+) spent (\d+)% of their time waiting")


def _train(*args, faults=None):
    return subprocess.run([sys.executable, "-m", "scaling.train", *args], cwd=REPO,
                          env=train_env(faults), capture_output=True, text=True, timeout=600,
                          check=False)


def test_input_bound_run_warns_once_per_window_and_totals_over_a_resume(digits_data,
                                                                         tmp_path):
    out = tmp_path / "run"
    args = ["--model", "mu/4", "--image-size", "8", "--batch-size", "64", "--lr", "3e-3",
            "--data", digits_data, "--out", str(out), "--steps", "30", "--log-every", "10",
            "--eval-every", "30", "--no-tensorboard", *STREAMED]
    first = _train(*args, faults="sigterm@15")  # checkpoints at step 15 and stops
    assert first.returncode == results.EXIT_PREEMPTED, first.stderr[-3000:]
    second = _train(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = [r for r in results.read_metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert all(0 < r["data_wait_fraction"] <= 1 for r in rows), rows
    # one warning line per input-bound window, naming its steps (a resumed window keeps its
    # first step) and its fraction, with the remedies
    lines = [line for line in (first.stderr + second.stderr).splitlines()
             if "input-bound:" in line]
    want = [(str(a + 1), str(r["step"]), f"{100 * r['data_wait_fraction']:.0f}")
            for a, r in zip([0, 10, 20], rows) if r["data_wait_fraction"] > INPUT_BOUND]
    assert want and [WARNING.search(line).groups() for line in lines] == want, (lines, rows)
    for line in lines:
        assert "--num-workers" in line and "--in-memory on" in line
        assert "--decode-on device" in line and "(now: --num-workers 0, --in-memory off" in line
    # final.json: over the whole run, both processes (their times carried by the checkpoint)
    final = results.read_final(out)
    parts = final["overhead_breakdown_s"]
    assert final["status"] == "ok" and final["data_wait_fraction"] > INPUT_BOUND
    assert final["data_wait_fraction"] == pytest.approx(
        parts["data_wait"] / (parts["data_wait"] + parts["steps"]), rel=1e-9)
    assert sum(parts.values()) == pytest.approx(final["wall_hours"] * 3600, rel=1e-9)


def test_sweep_summary_names_the_input_bound_runs(digits_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--preset", "demo", "--sizes", "mu", "--budget-kind", "steps", "--budgets", "6,12",
            "--set", "log_every=3", "--set", "in_memory=off", "--cluster", "local",
            "--max-parallel", "2", "--data", digits_data, "--results", "res"]
    # the demo preset reads with num_workers=0; 2 runs side by side get one thread each, so a
    # busy machine slows their steps and their decoding alike (with 2 threads a step slows
    # more: its threads wait for each other)
    assert sweep_main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    finals = {d.name: results.read_final(d) for d in (tmp_path / "res" / "demo").iterdir()
              if (d / results.CONFIG_FILE).exists()}
    ranked = sorted(((f["data_wait_fraction"], run) for run, f in finals.items()), reverse=True)
    assert len(ranked) == 2 and ranked[0][0] > INPUT_BOUND, ranked
    bound = [line for line in out if line.startswith("input-bound")]
    assert len(bound) == 1 and out.index(bound[0]) == len(out) - 2, out  # before "next:"
    line = bound[0]
    assert "--set num_workers=N" in line and "--set in_memory=on" in line
    assert "--set decode_on=device" in line
    named = line.split("): ", 1)[1].split(", ")
    assert named == [f"{run} {f:.1%}" for f, run in ranked if f > INPUT_BOUND]


def _analyse(results_dir: Path, out: Path) -> tuple[pd.DataFrame, str, dict]:
    proc = subprocess.run([sys.executable, "analysis/plot_scaling.py", "--results",
                           str(results_dir), "--out", str(out), "--n-boot", "10", "--no-cache"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (pd.read_csv(out / "runs.csv"), (out / "summary.md").read_text(),
            json.loads((out / "summary.json").read_text()))


def test_analysis_names_input_bound_runs_and_reads_runs_without_the_field(tmp_path):
    sizes = [("mu/4", 20_000, 1e6), ("m1/4", 40_000, 2e6), ("m2/4", 80_000, 4e6)]
    runs = write_synthetic_results(tmp_path / "old", n_evals=3, sizes=sizes)["runs"]
    table, summary, info = _analyse(tmp_path / "old", tmp_path / "out_old")
    # runs written before data_wait_fraction existed: an empty column, no note, no list
    assert "data_wait_fraction" in table and table["data_wait_fraction"].isna().all()
    assert "input-bound" not in summary and info["input_bound"] == []
    fractions = {"mu/4": 0.42, "m1/4": 0.05}  # m2/4 stays a run of before
    for model, fraction in fractions.items():
        final = json.loads((runs[model] / results.FINAL_FILE).read_text())
        results.write_json(runs[model] / results.FINAL_FILE,
                           {**final, "data_wait_fraction": fraction})
    table, summary, info = _analyse(tmp_path / "old", tmp_path / "out_new")
    by_model = table.set_index("model")["data_wait_fraction"]
    assert by_model["mu/4"] == 0.42 and by_model["m1/4"] == 0.05
    assert pd.isna(by_model["m2/4"])
    assert (tmp_path / "out_new" / "runs.csv").read_text().splitlines()[0].count(
        "data_wait_fraction") == 1
    run = f"synth/{runs['mu/4'].name}"
    note = next(line for line in summary.splitlines() if "input-bound" in line)
    assert f"{run} (42.0 %)" in note and runs["m1/4"].name not in note
    assert "device-hours and MFU are the loader's, not the model's" in note
    assert info["input_bound"] == [{"run": run, "model": "mu/4", "data_wait_fraction": 0.42}]
    assert note.removeprefix("- note: ") in info["notes"]

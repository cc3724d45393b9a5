"""Few-shot probes on real DeepSpeed runs (CPU): rows at every eval point with an unchanged
trajectory, resume after SIGKILL/SIGTERM and a torn line counting no row twice, probe quality,
and the post-hoc CLI over a results dir (idempotent, lock-aware, equal to the in-training rows,
checkpoints of ZeRO 0 and 3)."""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import train_env
from safetensors.torch import load_file

from scaling import engine, fewshot, results
from scaling.data import make_builtin_shards
from scaling.export import load_exported
from scaling.model import create_model

FAST = ["--model", "mu/4", "--image-size", "8", "--batch-size", "32", "--num-workers", "0",
        "--no-progress", "--lr", "3e-3", "--warmup-steps", "5"]
# dropout draws from the global torch RNG: any RNG use by the probes would change the run
ARGS = [*FAST, "--steps", "150", "--eval-every", "50", "--ckpt-every", "50", "--keep-ckpts",
        "3", "--dropout", "0.1"]
SHOTS, SEEDS, STEPS = (1, 5, 10), (0, 1, 2), (50, 100, 150)
TIMING = set(results.TIMING_KEYS)


def train(*args, faults=None, code=0):
    proc = subprocess.run([sys.executable, "-m", "scaling.train", *map(str, args)],
                          env=train_env(faults), capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == code, proc.stderr[-3000:]
    return proc


def posthoc(*args):
    proc = subprocess.run([sys.executable, "-m", "scaling.fewshot", *map(str, args)],
                          env=train_env(), capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def comparable(run):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in results.read_metrics(run)]


def key(r):
    return r["dataset"], r["shots"], r["seed"], r["step"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    digits = make_builtin_shards("digits", root / "digits").root
    # 16 px: the 8 px model is probed through a position-embedding resize of a copy
    shapes = make_builtin_shards("shapes", root / "shapes16", image_size=16,
                                 num_samples=600).root
    return {"digits": str(digits), "shapes": str(shapes), "both": f"{digits},{shapes}"}


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    train(*ARGS, "--data", data["digits"], "--out", root / "plain")
    train(*ARGS, "--data", data["digits"], "--out", root / "ref", "--fewshot", data["both"],
          "--fewshot-shots", "1,5,10")
    return root / "plain", root / "ref"


def test_rows_at_every_eval_point_and_the_trajectory_is_unchanged(runs):
    plain, ref = runs
    assert comparable(ref) == comparable(plain)  # every logged figure but timings
    rows = results.read_transfer(ref)
    want = itertools.product(("digits", "shapes16"), SHOTS, SEEDS, STEPS)
    assert sorted(map(key, rows)) == sorted(want)  # every eval point, each row once
    evals = {r["step"]: r for r in results.read_metrics(ref) if r["kind"] == "eval"}
    for r in rows:
        assert set(results.TRANSFER_KEYS) <= set(r) and r["source"] == "train"
        assert (r["images_seen"], r["flops_seen"]) == (evals[r["step"]]["images_seen"],
                                                       evals[r["step"]]["flops_seen"])
        assert r["num_train"] == 10 * r["shots"] and 0 <= r["top1"] <= 1
        assert (r["num_test"], r["image_size"]) == {"digits": (180, 8),
                                                    "shapes16": (60, 16)}[r["dataset"]]
    final, parts = results.read_final(ref), results.read_final(ref)["overhead_breakdown_s"]
    assert parts["fewshot"] > 0 and results.read_final(plain)["overhead_breakdown_s"][
        "fewshot"] == 0
    assert sum(parts.values()) == pytest.approx(final["wall_hours"] * 3600, rel=1e-9)
    print(f"few-shot overhead: {parts['fewshot']:.2f} s of {final['wall_hours'] * 3600:.2f} s "
          f"wall ({parts['fewshot'] / (final['wall_hours'] * 3600):.1%})")


def test_trained_model_beats_one_shot_chance_and_its_initialisation(runs, data):
    _, ref = runs
    last = [r for r in results.read_transfer(ref) if r["step"] == 150
            and r["dataset"] == "digits"]
    mean = {k: np.mean([r["top1"] for r in last if r["shots"] == k]) for k in SHOTS}
    assert mean[10] > mean[1] + 0.1 and mean[10] > 0.1 + 0.4  # 10 classes: chance is 0.1
    torch.manual_seed(0)  # the run's own initial weights (train.py seeds before create_model)
    init = create_model(load_exported(str(ref / results.EXPORT_FILE)).config)
    sets = fewshot.open_downstream([data["digits"]], [10], 3)
    rows = fewshot.probe_model(init, sets, [10], 3, device=torch.device("cpu"))
    assert np.mean([r["top1"] for r in rows]) < mean[10] - 0.05


def test_resume_after_kill_and_sigterm_counts_no_transfer_row_twice(runs, data, tmp_path):
    _, ref = runs
    out = tmp_path / "run"
    args = [*ARGS, "--data", data["digits"], "--out", out, "--fewshot", data["both"],
            "--fewshot-shots", "1,5,10"]
    train(*args, faults="kill_in_save@100", code=-signal.SIGKILL)  # after the eval at 100
    assert {r["step"] for r in results.read_transfer(out)} == {50, 100}
    second = train(*args, faults="sigterm@120", code=results.EXIT_PREEMPTED)
    assert "resumed from step00000050" in second.stderr
    assert "18 transfer rows of a lost attempt" in second.stderr  # step 100's, evaluated again
    with open(out / results.TRANSFER_FILE, "a") as f:
        f.write('{"kind": "fewshot", "data')  # a kill in the middle of an append
    assert "resumed from step00000120" in train(*args).stderr
    lines = (out / results.TRANSFER_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == results.read_transfer(ref)  # bitwise, once
    assert comparable(out) == comparable(ref)


def test_posthoc_over_a_results_dir_is_idempotent_and_equals_the_training_rows(runs, data,
                                                                                tmp_path):
    _, ref = runs
    res = tmp_path / "results"
    fresh, done, unfinished = res / "fresh", res / "done", res / "unfinished"
    for run in (fresh, done):
        shutil.copytree(ref, run)
    (fresh / results.TRANSFER_FILE).unlink()
    unfinished.mkdir()
    shutil.copy(ref / results.CONFIG_FILE, unfinished)
    flags = ["--results", res, "--data", data["both"], "--shots", "1,5,10", "--batch-size", "32"]
    out = posthoc(*flags, "--checkpoints")
    assert f"skip {unfinished}: not finished ok" in out
    assert f"{fresh}: 54 row(s) added" in out and f"{done}: 0 row(s) added" in out
    got = results.read_transfer(fresh)
    assert {r["source"] for r in got if r["step"] == 150} == {"export"}  # ckpt 150: same step
    assert {r["source"] for r in got if r["step"] < 150} == {"checkpoint"}
    strip = [{k: v for k, v in r.items() if k != "source"} for r in results.read_transfer(ref)]
    assert sorted(({k: v for k, v in r.items() if k != "source"} for r in got), key=key) == \
        sorted(strip, key=key)  # the same probes as during training, from the files
    before = {run: (run / results.TRANSFER_FILE).read_bytes() for run in (fresh, done)}
    assert (done / results.TRANSFER_FILE).read_bytes() == (ref / results.TRANSFER_FILE
                                                           ).read_bytes()
    again = posthoc(*flags, "--checkpoints")
    assert "0 row(s) added" in again and "54 row(s)" not in again
    assert {run: (run / results.TRANSFER_FILE).read_bytes() for run in before} == before
    lock = results.RunLock(fresh).acquire()  # as a run being trained holds it
    try:
        out = posthoc("--run", fresh, "--data", data["both"], "--shots", "25")
    finally:
        lock.release()
    assert f"skip {fresh}: run dir {fresh} in use by PID {os.getpid()}" in out
    assert (fresh / results.TRANSFER_FILE).read_bytes() == before[fresh]
    assert f"{fresh}: 6 row(s) added" in posthoc("--run", fresh, "--data", data["both"],
                                                 "--shots", "25")
    added = results.read_transfer(fresh)[len(got):]
    assert {(r["shots"], r["step"], r["source"]) for r in added} == {(25, 150, "export")}


def test_checkpoint_weights_of_zero_0_and_zero_3_equal_the_export(runs, data, tmp_path):
    _, ref = runs
    ckpt = ref / results.CHECKPOINT_DIR / "step00000150"
    export = load_file(str(ref / results.EXPORT_FILE))
    state = engine.checkpoint_state(ckpt)
    assert set(state) == set(export) and all(torch.equal(state[k], export[k]) for k in export)
    z3 = tmp_path / "z3"
    train(*FAST, "--zero", "3", "--steps", "20", "--data", data["digits"], "--out", z3)
    ckpt = z3 / results.CHECKPOINT_DIR / "step00000020"
    assert not (ckpt / "mp_rank_00_model_states.pt").exists()  # ZeRO-3: partitioned files
    state, export = engine.checkpoint_state(ckpt), load_file(str(z3 / results.EXPORT_FILE))
    assert set(state) == set(export) and all(torch.equal(state[k], export[k]) for k in export)


@pytest.mark.parametrize("flags, message", [
    (["--shots", "0"], "--shots '0'"),
    (["--seeds", "0"], "--seeds 0"),
    (["--data", "/nonexistent/fs"], "/nonexistent/fs does not exist"),
    (["--run", "/nonexistent/run"], "--run /nonexistent/run is not a directory"),
])
def test_posthoc_bad_flags_exit_2_with_one_line(data, tmp_path, capsys, flags, message):
    argv = ["--run", str(tmp_path), "--data", data["digits"], *flags]
    assert fewshot.main(argv) == results.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_posthoc_results_without_runs_says_so(data, tmp_path):
    empty = tmp_path / "empty"
    (empty / "not-a-run").mkdir(parents=True)  # a folder, but no config.json below it
    run = subprocess.run([sys.executable, "-m", "scaling.fewshot", "--results", str(empty),
                          "--data", data["digits"]], capture_output=True, text=True, check=False)
    assert run.returncode == results.EXIT_BAD_INPUT
    assert run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        f"error: --results {empty}: no runs found (no run dir with config.json below it)"]


def test_posthoc_run_and_results_together_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        fewshot.main(["--run", str(tmp_path), "--results", str(tmp_path), "--data", "x"])
    assert e.value.code == results.EXIT_BAD_INPUT
    assert "not allowed with argument --run" in capsys.readouterr().err

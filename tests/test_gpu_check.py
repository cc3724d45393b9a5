"""The GPU check keeps working without a GPU: `--dry-run` runs every stage at toy sizes on the
CPU and writes every file a lent GPU's run would write (at most 8, none in subfolders: what the
device tool brings back)."""

import json
import subprocess
import sys

import pytest


def run(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "scaling.bench.gpu_check", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_writes_every_file(tmp_path):
    out = tmp_path / "out"
    # a budget no stage here comes near: the dry run checks code paths, not the GPU's 480 s
    proc = run("--dry-run", out, "--work-dir", tmp_path / "work", "--budget-s", 3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["env.jsonl", "fork.jsonl", "inputs.jsonl", "report.txt", "stages.jsonl",
                     "stages.log", "throughput.jsonl"]
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert all(s["status"] == "ok" or (s["status"] == "skipped" and s["reason"])
               for s in stages), stages
    ran = {s["stage"] for s in stages if s["status"] == "ok"}
    grid = {f"inputs-mu/4-{d}-{c}" for d in ("workers", "device") for c in ("eager", "compiled")}
    assert {"env", "B/16-zero0", "B/16-zero2", "B/16-compiled-transformers", "inputs-shards",
            "fork-sweep", *grid} <= ran
    rows = [json.loads(line) for line in (out / "throughput.jsonl").read_text().splitlines()]
    assert {(r["impl"], r["engine"], r["zero"], r["compile"]) for r in rows} >= {
        ("ours", "bare", 0, False), ("transformers", "bare", 0, False),
        ("ours", "deepspeed", 0, False), ("ours", "deepspeed", 2, False),
        ("ours", "bare", 0, True)}
    inputs = [json.loads(line) for line in (out / "inputs.jsonl").read_text().splitlines()]
    assert {(r["decode_on"], r["compile"], r["compile_cache"]) for r in inputs} == {
        ("workers", False, None), ("device", False, None), ("device", True, "cold"),
        ("workers", True, "warm")}
    for r in inputs:  # 10 steps in windows of 2, the first 4 steps left out: 3 windows
        assert r["status"] == "ok" and r["model"] == "mu/4" and r["steps"] == 10, r
        assert r["steady_steps"] == 6 and r["steady_images"] == 6 * r["batch_size"], r
        assert r["images_per_s"] > 0 and r["steady_s"] > 0 and r["mfu"] is None, r  # a CPU
        assert 0 <= r["data_wait_fraction"] <= 1 and 0 <= r["run_data_wait_fraction"] <= 1, r
        assert (r["compile_s"] > 0) == r["compile"], r  # compile seconds only when compiled
    fork = json.loads((out / "fork.jsonl").read_text())
    assert fork["sweep_ok"] and fork["finals"] == ["ok"]
    assert "dry run" in proc.stdout and "img/s" in proc.stdout
    assert sum(line.split()[:2] == ["mu/4", "device"] for line in proc.stdout.splitlines()) == 2


def test_input_grid_runs_the_imagenet_recipe_in_a_2x2_grid_per_size(tmp_path):
    from launchers.presets import imagenet
    from scaling.bench import input_grid
    from scaling.config import TrainConfig

    cells = input_grid.cells(dry_run=False)
    assert [(c.model, c.decode_on, c.compile, c.cache) for c in cells] == [
        ("S/16", "workers", False, None), ("S/16", "device", False, None),
        ("B/16", "workers", False, None), ("B/16", "device", False, None),
        ("S/16", "device", True, "cold"), ("S/16", "workers", True, "warm"),
        ("B/16", "device", True, "cold"), ("B/16", "workers", True, "warm")]
    cell = cells[6]
    cfg = TrainConfig.from_args(input_grid.train_args(cell, tmp_path / "d", tmp_path / "r",
                                                      dry_run=False))
    preset = imagenet()  # the library keeps a copy of its recipe: the two must agree
    assert cfg.lr == preset.lr(batch_size=cfg.batch_size)
    for key, value in preset.train.items():
        if key not in ("eval_every", "ckpt_every"):  # the grid's runs are short
            assert getattr(cfg, key) == value, key
    assert (cfg.model, cfg.decode_on, cfg.compile, cfg.in_memory) == ("B/16", "device", True,
                                                                      "off")
    assert cfg.samples_per_epoch == cfg.steps * cfg.batch_size  # one epoch: no worker restart
    assert cfg.steps > input_grid.SKIP_STEPS and cfg.eval_every == 0


def test_steady_state_leaves_out_the_first_steps_and_weights_windows_by_seconds():
    from scaling.bench.input_grid import steady

    def row(step, images_per_s, mfu, wait):
        return {"kind": "train", "step": step, "images_seen": 100 * step,
                "images_per_s": images_per_s, "mfu": mfu, "tflops": mfu,
                "data_wait_fraction": wait}

    rows = [row(20, 100.0, 0.4, 0.1), row(10, 10.0, 0.1, 0.9), row(30, 500.0, 0.2, 0.4),
            {"kind": "eval", "step": 30, "images_seen": 3000, "top1": 0.5}]
    s = steady(rows, skip=10)  # windows (10, 20] of 10 s and (20, 30] of 2 s; (0, 10] left out
    assert s["steady_steps"] == 20 and s["steady_images"] == 2000 and s["steady_s"] == 12
    assert s["images_per_s"] == pytest.approx(2000 / 12)
    assert s["mfu"] == pytest.approx((0.4 * 10 + 0.2 * 2) / 12)
    assert s["data_wait_fraction"] == pytest.approx((0.1 * 10 + 0.4 * 2) / 12)
    assert s["first_window_images_per_s"] == 10.0
    del rows[0]["data_wait_fraction"]  # a row written before the field existed
    assert steady(rows, skip=10)["data_wait_fraction"] is None
    assert steady(rows, skip=30)["images_per_s"] is None  # no window left


@pytest.mark.parametrize("args, message", [
    ([], "give OUT"),
    (["out", "--budget-s", "0"], "--budget-s must be positive"),
    (["out", "--wheels", "/nonexistent"], "--wheels /nonexistent is not a folder"),
])
def test_bad_flags_fail_with_one_line(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "scaling.bench.gpu_check", *args],
                          capture_output=True, text=True, timeout=120, check=False,
                          cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()

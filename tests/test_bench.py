"""The benchmark: CLI rows with the transformers peer, analytic TFLOP/s, ZeRO memory accounting
(paper formula, tensor-storage counting, a real 2-rank ZeRO-3 run), overhead breakdown."""

import json
import math
import os
import statistics
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

from launchers import bench_overhead
from launchers.bench_overhead import first_window_excess
from scaling.bench import throughput as bench
from scaling.bench.zero import StorageCounter, paper_bytes, state_bytes
from scaling.flops import param_count, training_flops
from scaling.model import vit_config

# The benchmark-row schema of docs/architecture.md.
SCHEMA = ("model", "impl", "images_per_s", "step_s", "tflops", "mfu", "mem_gb", "batch_size",
          "image_size", "precision", "zero", "compile", "world_size", "device", "versions",
          "time")
MICRO = ["--sizes", "mu/4", "--image-size", "16", "--num-classes", "10"]


def run_cli(args, timeout=300, module="scaling.bench"):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", module, *args], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_micro_with_peer_writes_schema_rows(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = run_cli([*MICRO, "--batch-size", "2", "--steps", "2", "--warmup", "1", "--rounds",
                    "2", "--peer", "transformers", "--peak-tflops", "2.0", "--out", str(out)])
    ours, peer = read_rows(out)
    vit = vit_config("mu/4", image_size=16, num_classes=10)
    assert (ours["impl"], peer["impl"]) == ("ours", "transformers")
    for r in (ours, peer):
        assert set(SCHEMA) <= set(r)
        assert (r["model"], r["batch_size"], r["image_size"], r["precision"], r["zero"],
                r["compile"], r["world_size"], r["engine"]) == ("mu/4", 2, 16, "fp32", 0,
                                                                 False, 1, "bare")
        assert r["params"] == param_count(vit)  # same shape on both sides
        assert len(r["step_s_rounds"]) == 2 and r["step_s"] == statistics.median(
            r["step_s_rounds"])
        assert r["images_per_s"] == pytest.approx(2 / r["step_s"], rel=1e-12)
        assert r["tflops"] == pytest.approx(training_flops(vit, 2) / r["step_s"] / 1e12,
                                            rel=1e-12)
        assert r["mfu"] == pytest.approx(r["tflops"] / 2.0, rel=1e-12)
        assert r["mem_gb"] > 0 and r["mem_method"] == "cpu_allocated_peak"
        assert r["versions"]["torch"] == torch.__version__ and r["versions"]["transformers"]
        assert "threads" in r["device"]
        datetime.strptime(r["time"], "%Y-%m-%dT%H:%M:%S%z")
    ratio = ours["images_per_s"] / peer["images_per_s"]
    assert ours["ratio_ours_to_peer"] == pytest.approx(ratio, rel=1e-12)
    # Not a speed target: both models do the same work, so a ratio off by 10x means a bug.
    assert 0.1 < ratio < 10 and math.isfinite(ours["ratio_paired_median"])
    assert "ours / transformers" in proc.stdout


def test_tflops_are_training_flops_over_median_step_time():
    vit = vit_config("Ti/16")
    args = bench.parse_args(["--sizes", "Ti/16", "--batch-size", "8", "--steps", "3"])
    args.precision = "bf16"
    trainer = bench.Trainer("ours", step=lambda: None, params=param_count(vit),
                            fused_adamw=True, held=lambda: 0, mem_gb=[1.5, 2.5])
    env = {"device": "test", "versions": {}, "world_size": 2, "peak_tflops": 989.0}
    row = bench.row(vit, trainer, [0.5, 0.2, 0.3], args, env)
    assert row["step_s"] == 0.3
    assert row["tflops"] == training_flops(vit, 8) / 0.3 / 1e12  # per device
    assert row["images_per_s"] == 8 * 2 / 0.3  # all ranks
    assert row["mfu"] == row["tflops"] / 989.0
    assert row["mem_gb"] == 2.5 and row["batch_size"] == 16


@pytest.mark.parametrize("argv", [["--sizes", "Ti/16", "--bare", "--zero", "2"],
                                  ["--sizes", "X/16"], [], ["--sizes", "Ti/16", "--steps", "0"]])
def test_bad_flags_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2


def test_zero_paper_formula():
    # Rajbhandari et al. 2020, Sec. 5: 2 + 2 + K bytes per parameter with K = 12.
    assert [paper_bytes(1000, s, 2) for s in range(4)] == [16000, 10000, 9000, 8000]
    assert [paper_bytes(1000, s, 1) for s in range(4)] == [16000] * 4
    assert paper_bytes(1000, 3, 8) == 2000
    # The paper's Figure 1: Psi = 7.5B on N = 64 ranks: 120, 31.4, 16.6 and 1.9 GB.
    got = [paper_bytes(7.5e9, s, 64) / 1e9 for s in range(4)]
    assert got == pytest.approx([120, 31.4, 16.6, 1.9], abs=0.05)
    with pytest.raises(ValueError):
        paper_bytes(1000, 4, 2)


def test_storage_counter_counts_each_byte_once():
    counter = StorageCounter()
    flat = torch.zeros(100)  # a flat buffer holding two parameters as views
    params = [flat[:60].view(6, 10), flat[60:]]
    bucket = torch.zeros(1000, dtype=torch.bfloat16)  # a gradient waits in this bucket
    counter.walk({"state": [torch.zeros(50), torch.zeros(50)]}, "optimizer_state")
    counter.walk(params, "params")
    counter.walk({"ipg_bucket": bucket, "averaged_gradients": [torch.zeros(20)]}, "buffers")
    counter.walk([bucket[:100]], "grads")
    got = counter.bytes()
    assert got == {"optimizer_state": 400, "params": 400, "grads": 80, "buffers": 2000,
                   "master_params": 0}
    assert state_bytes(got) == 880


@pytest.mark.multiproc
def test_zero3_per_rank_state_matches_paper(tmp_path):
    out = tmp_path / "zero.jsonl"
    run_cli(["--zero-memory", *MICRO, "--out", str(out)])
    rows = {r["zero"]: r for r in read_rows(out)}
    assert sorted(rows) == [0, 1, 2, 3]
    psi = param_count(vit_config("mu/4", image_size=16, num_classes=10))
    for stage, r in rows.items():
        assert r["params"] == psi and r["world_size"] == 2 and len(r["by_kind_per_rank"]) == 2
        assert r["paper_bytes"] == paper_bytes(psi, stage, 2)
        assert r["measured_bytes"] == max(state_bytes(b) for b in r["by_kind_per_rank"])
    assert rows[3]["measured_bytes"] == pytest.approx(16 * psi / 2, rel=0.2)
    assert rows[0]["measured_bytes"] == pytest.approx(16 * psi, rel=0.2)
    assert rows[3]["measured_bytes"] < 0.6 * rows[0]["measured_bytes"]  # ZeRO-3 shards


def test_overhead_breakdown_adds_up():
    parts = {"startup": 3.0, "build": 2.0, "data_wait": 1.0, "eval": 4.0, "checkpoint": 0.5,
             "export": 0.5, "steps": 88.0, "other": 1.0}
    final = {"wall_hours": 100 / 3600, "overhead_fraction": 0.12, "overhead_breakdown_s": parts}
    out = bench_overhead.breakdown(101.5, final)
    assert out == pytest.approx({**parts, "exit": 1.5})
    assert sum(out.values()) == pytest.approx(101.5)
    metrics = [{"kind": "train", "step": 10, "wall_s": 30.0, "images_per_s": 32.0},
               {"kind": "eval", "step": 10, "wall_s": 35.0},
               {"kind": "train", "step": 20, "wall_s": 75.0, "images_per_s": 16.0}]
    assert first_window_excess(metrics, 64) == 0.0  # paces 2 and 4 s/step: median 3


def test_first_window_excess_is_startup_beyond_median_pace():
    rows = [{"kind": "train", "step": 10 * i, "wall_s": 0.0, "images_per_s": 640 / s}
            for i, s in ((1, 30.0), (2, 10.0), (3, 12.0))]
    assert first_window_excess(rows, 64) == pytest.approx(30.0 - 10 * 1.2)


@pytest.mark.slow
def test_overhead_mode_runs_a_demo_both_ways(tmp_path):
    out = tmp_path / "overhead.jsonl"
    run_cli(["--sizes", "mu/4", "--steps", "30", "--batch-size", "32", "--data",
             "digits", "--work-dir", str(tmp_path), "--train-args", "--log-every 5",
             "--out", str(out)], module="launchers.bench_overhead")
    rows = read_rows(out)
    assert [r["launch"] for r in rows] == ["fork", "process"]
    for row in rows:
        assert row["kind"] == "overhead" and 0 <= row["overhead_fraction"] < 1
        assert sum(row["breakdown_s"].values()) == pytest.approx(row["process_s"], rel=1e-9)
        assert row["breakdown_s"]["steps"] > 0 and row["process_overhead_fraction"] >= 0
        assert "--eval-spacing log" in row["command"]  # the demo preset's recipe
    assert rows[0]["server_start_s"] > 0 and rows[1]["server_start_s"] is None


def test_default_output_leaves_git_status_clean(tmp_path):
    """Run from a clone (of the committed tree: `python -m` there imports the clone's code)."""
    clone = tmp_path / "clone"
    repo = Path(__file__).resolve().parents[1]
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True, timeout=120)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "scaling.bench", *MICRO, "--batch-size", "2",
                           "--steps", "1", "--warmup", "0", "--rounds", "1"], cwd=clone,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_rows(clone / "results/bench/local/bench.jsonl")) == 1
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True,
                            text=True, check=True).stdout
    assert status == ""

"""One training run under real DeepSpeed on CPU: schema, ZeRO equivalence, resume, export."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from scaling import results
from scaling.data import default_augment, make_builtin_shards, make_eval_loader
from scaling.data.device import normalize
from scaling.export import load_exported
from scaling.flops import forward_macs, training_flops
from scaling.model import vit_config
from scaling.train import main as train_main

BASE = ["--model", "mu/2", "--image-size", "16", "--batch-size", "16", "--num-workers", "0",
        "--lr", "3e-3"]
# Loss curves of runs that differ only in ZeRO stage or world size agree to this relative
# tolerance: the math is the same, only the order of fp32 reductions differs.
CURVE_RTOL = 1e-5


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return str(make_builtin_shards("digits", tmp_path_factory.mktemp("data") / "digits").root)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
              "SLURM_NTASKS", "VIT_SCALING_FAULTS"):
        env.pop(k, None)
    return env


def _cmd(args, nproc=1):
    if nproc == 1:
        return [sys.executable, "-m", "scaling.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "scaling.train", *args]


def train(args, nproc=1, faults=None, check=True):
    env = _env()
    if faults:
        env["VIT_SCALING_FAULTS"] = faults
    proc = subprocess.run(_cmd(args, nproc), env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


def rows(run_dir, kind=None):
    return [r for r in results.read_metrics(run_dir) if kind is None or r["kind"] == kind]


def comparable(run_dir):
    """Every logged figure of a run except timings."""
    timing = set(results.TIMING_KEYS)
    return [{k: v for k, v in r.items() if k not in timing} for r in rows(run_dir)]


def test_micro_model_learns_and_follows_schema(digits, tmp_path):
    out = tmp_path / "run"
    args = ["--model", "mu/4", "--image-size", "16", "--batch-size", "32", "--num-workers", "0",
            "--lr", "3e-3", "--warmup-steps", "5", "--data", digits, "--out", str(out),
            "--steps", "100", "--log-every", "25", "--eval-every", "50"]
    train(args)
    final = results.read_final(out)
    assert final["status"] == "ok" and final["steps"] == 100
    train_rows, eval_rows = rows(out, "train"), rows(out, "eval")
    assert [r["step"] for r in train_rows] == [25, 50, 75, 100]
    assert [r["step"] for r in eval_rows] == [50, 100]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.2  # it learns
    assert eval_rows[-1]["loss"] < eval_rows[0]["loss"]
    assert eval_rows[-1]["top1"] > 0.3  # 10 classes: chance is 0.1
    vit = vit_config("mu/4", image_size=16, num_classes=10)
    for r in train_rows + eval_rows:
        assert r["images_seen"] == r["step"] * 32
        assert set(results.TRAIN_KEYS if r["kind"] == "train" else results.EVAL_KEYS) <= set(r)
        assert r["flops_seen"] == training_flops(vit, r["images_seen"])
    assert eval_rows[-1]["num_samples"] == 180  # the whole val split
    assert set(results.FINAL_KEYS) <= set(final)
    assert final["total_flops"] == 6 * forward_macs(vit) * 100 * 32
    assert final["macs_per_image"] == forward_macs(vit)
    assert final["final_top1"] == eval_rows[-1]["top1"]
    assert 0 <= final["overhead_fraction"] < 1
    parts = final["overhead_breakdown_s"]
    assert sum(parts.values()) == pytest.approx(final["wall_hours"] * 3600, rel=1e-9)
    assert parts["steps"] == pytest.approx((1 - final["overhead_fraction"]) * sum(parts.values()))
    assert min(parts.values()) >= 0 and parts["startup"] > 0 and parts["build"] > 0
    assert parts["eval"] > 0 and parts["export"] > 0 and parts["checkpoint"] > 0
    # the share of the loop's time spent waiting for batches: per window, and over the run
    assert all(0 <= r["data_wait_fraction"] <= 1 for r in train_rows)
    assert 0 <= final["data_wait_fraction"] <= 1
    assert final["data_wait_fraction"] == pytest.approx(
        parts["data_wait"] / (parts["data_wait"] + parts["steps"]), rel=1e-9)
    assert json.loads((out / "config.json").read_text())["model"] == "mu/4"
    assert json.loads((out / "plan.json").read_text())["total_steps"] == 100
    # rerunning a finished run does nothing and keeps its results
    before = (out / "metrics.jsonl").read_text()
    assert "nothing to do" in train(args).stderr
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.multiproc
def test_zero_stages_and_world_sizes_give_the_same_curve(digits, tmp_path):
    args = [*BASE, "--data", digits, "--steps", "12", "--log-every", "2",
            "--data-order", "global"]
    curves = {}
    for name, nproc, extra in [("single", 1, ["--zero", "0"]),
                               ("single_accum", 1, ["--zero", "0", "--micro-batch-size", "8"]),
                               ("z0", 2, ["--zero", "0"]), ("z2", 2, ["--zero", "2"]),
                               ("z3", 2, ["--zero", "3"])]:
        out = tmp_path / name
        train([*args, *extra, "--out", str(out)], nproc=nproc)
        curves[name] = [r["loss"] for r in rows(out, "train")]
        assert results.read_final(out)["world_size"] == nproc
    ref = curves["single"]
    assert len(ref) == 6 and len(set(ref)) == 6  # a real, moving curve
    for name, curve in curves.items():
        assert curve == pytest.approx(ref, rel=CURVE_RTOL), name


def _wait_for_step(out, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        if any(r["step"] >= step for r in rows(out)) if (out / "metrics.jsonl").exists() else 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.mark.parametrize("sig, in_memory", [(signal.SIGTERM, "off"), (signal.SIGUSR2, "on")])
def test_interrupt_and_resume_equals_uninterrupted(digits, tmp_path, sig, in_memory):
    """Streaming and in-memory data (scaling.data.memory) both resume exactly, dropout too
    (it draws from torch's global generator, which a loader must not touch: a DataLoader
    iterator made at the resume once took a seed from it)."""
    args = [*BASE, "--data", digits, "--steps", "200", "--log-every", "7", "--eval-every", "50",
            "--ckpt-every", "40", "--drop-path", "0.1", "--dropout", "0.1", "--mixup-alpha", "0.2",
            "--label-smoothing", "0.1", "--in-memory", in_memory]
    train([*args, "--out", str(tmp_path / "ref")])
    out = tmp_path / "int"
    proc = subprocess.Popen(_cmd([*args, "--out", str(out)]), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(out, 30, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == results.EXIT_PREEMPTED, err[-2000:]
    stopped = max(r["step"] for r in rows(out))
    assert stopped < 200 and (out / "final.json").exists() is False
    resumed = train([*args, "--out", str(out)])
    assert "resumed from step" in resumed.stderr
    got, want = comparable(out), comparable(tmp_path / "ref")
    assert got == want  # bitwise: same data, RNG, optimizer and scheduler state
    steps = [r["step"] for r in rows(out, "train")]
    assert steps == sorted(set(steps))  # no step counted twice
    a, b = results.read_final(out), results.read_final(tmp_path / "ref")
    assert {k: a[k] for k in ("final_top1", "steps", "total_flops", "final_loss")} == \
           {k: b[k] for k in ("final_top1", "steps", "total_flops", "final_loss")}
    # time is carried over the restart: both processes' start-up and build are in the parts
    parts = a["overhead_breakdown_s"]
    assert sum(parts.values()) == pytest.approx(a["wall_hours"] * 3600, rel=1e-9)
    assert parts["checkpoint"] > 0 and parts["other"] > -1e-3


def test_kill_during_checkpoint_write_resumes_from_previous(digits, tmp_path):
    args = [*BASE, "--data", digits, "--steps", "60", "--log-every", "5", "--ckpt-every", "20",
            "--eval-every", "30"]
    train([*args, "--out", str(tmp_path / "ref")])
    out = tmp_path / "run"
    proc = train([*args, "--out", str(out)], faults="kill_in_save@40", check=False)
    assert proc.returncode == -signal.SIGKILL
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step00000020", "step00000040"]  # 40 was written but never completed
    assert not (out / "checkpoints" / "step00000040" / "COMPLETE").exists()
    resumed = train([*args, "--out", str(out)])
    assert "resumed from step00000020" in resumed.stderr
    assert "removed incomplete checkpoints ['step00000040']" in resumed.stderr
    assert comparable(out) == comparable(tmp_path / "ref")


def test_nan_loss_stops_with_diverged_and_keeps_last_checkpoint(digits, tmp_path):
    out = tmp_path / "run"
    args = [*BASE, "--data", digits, "--out", str(out), "--steps", "40", "--log-every", "5",
            "--ckpt-every", "10"]
    proc = train(args, faults="nan@23", check=False)
    assert proc.returncode == results.EXIT_DIVERGED
    final = results.read_final(out)
    assert final["status"] == "diverged" and "nan" in final["error"].lower()
    ckpt = out / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step00000010",
                                                                    "step00000020"]
    assert (ckpt / "latest").read_text().strip() == "step00000020"
    assert max(r["step"] for r in rows(out)) == 20  # nothing logged from the diverged steps
    states = torch.load(ckpt / "step00000020" / "mp_rank_00_model_states.pt",
                        weights_only=False)
    assert all(torch.isfinite(v).all() for v in states["module"].values())
    # a retry (here without the fault) resumes from the last good checkpoint, keeps the
    # diverged outcome on record, and finishes
    train(args)
    assert results.read_final(out)["status"] == "ok"
    kept = list(out.glob("final.diverged.*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["status"] == "diverged"


@pytest.mark.multiproc
def test_zero3_export_loads_without_deepspeed(digits, tmp_path):
    out = tmp_path / "run"
    train([*BASE, "--model", "mu/4", "--data", digits, "--out", str(out), "--steps", "60",
           "--zero", "3", "--batch-size", "32", "--warmup-steps", "5"], nproc=2)
    final = results.read_final(out)
    # 2 real ranks evaluated the 180 val images exactly once between them
    assert rows(out, "eval")[-1]["num_samples"] == 180
    model = load_exported(str(out / "model.safetensors")).eval()
    assert model.config.name == "mu/4" and model.config.image_size == 16
    hits = total = 0
    with torch.no_grad():
        for batch in make_eval_loader(digits, image_size=16, batch_size=64, rank=0,
                                      world_size=1, num_workers=0):
            images = normalize(batch["image"], default_augment("digits"))
            hits += (model(images).argmax(1) == batch["label"]).sum().item()
            total += len(batch["label"])
    assert total == 180
    assert hits / total == final["final_top1"]
    assert final["final_top1"] > 0.2


@pytest.mark.parametrize("extra, env, message", [
    (["--model", "Q/4", "--steps", "5"], {}, "unknown ViT name 'Q'"),
    (["--steps", "0"], {}, "budget --steps must be positive"),
    (["--samples", "8"], {}, "less than one step of 16 images"),
    (["--flops", "1e3"], {}, "less than one step of 16 images"),
    (["--steps", "5"], {"RANK": "0", "WORLD_SIZE": "3"},
     "global batch size 16 is not divisible by the world size 3"),
    (["--steps", "5"], {"VIT_SCALING_JPEG_DRAFT": "yes"},
     "VIT_SCALING_JPEG_DRAFT='yes'; expected 0 or 1"),
    (["--steps", "5", "--data", "/nonexistent/shards"], {},
     "data dir '/nonexistent/shards' does not exist"),
    pytest.param(["--steps", "5", "--precision", "fp16"], {}, "fp16 needs a GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")),
])
def test_bad_input_fails_before_training(digits, tmp_path, monkeypatch, capsys, extra, env,
                                         message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = [*BASE, "--data", digits, "--out", str(tmp_path / "run"), *extra]
    assert train_main(args) == results.EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_out_dir_holding_another_config_is_refused(digits, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    results.write_json(out / "config.json", {"model": "m1/2", "lr": 0.1})
    code = train_main([*BASE, "--data", digits, "--out", str(out), "--steps", "5"])
    assert code == results.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "holds another run's config" in err and "model: 'm1/2' -> 'mu/2'" in err


def test_data_dir_without_dataset_json_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = train_main([*BASE, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r"),
                       "--steps", "5"])
    assert code == results.EXIT_BAD_INPUT
    assert str(tmp_path / "empty") in capsys.readouterr().err
    assert not (tmp_path / "r").exists()

"""Fine-tuning transfer (scaling.finetune) on real DeepSpeed runs (CPU): a ZeRO-3 pre-training
run at 8 px fine-tuned at 16 px on another data set (loss falls, top-1 above the few-shot
probe's), final.json and the pre-training run's transfer row (written once; a rerun does
nothing), a resume that continues from the fine-tune's own checkpoint and not from the export,
and bad input (one line, exit 2)."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import train_env
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from scaling import fewshot, finetune, results
from scaling.data import make_builtin_shards
from scaling.data.writer import Encoding, Source, write_dataset

PRE = ["--model", "mu/4", "--image-size", "8", "--batch-size", "32", "--num-workers", "0",
       "--no-progress", "--lr", "3e-3", "--warmup-steps", "5", "--zero", "3", "--steps", "60"]
FT = ["--image-size", "16", "--steps", "60", "--eval-every", "20", "--num-workers", "0",
      "--no-progress", "--lr", "0.03"]
ORIENTATIONS = ("horizontal", "vertical", "diagonal", "antidiagonal")
TIMING = set(results.TIMING_KEYS)


def stripes(item):
    """A 16 px image of stripes in one of four orientations (the label), random phase,
    colours and noise: a downstream task the 8 px digits model has not seen."""
    seed, label = item
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:16, 0:16]
    on = (((y, x, x + y, x - y)[label] + rng.integers(0, 4)) // 2) % 2 == 0
    fg, bg = rng.integers(128, 256, 3), rng.integers(0, 100, 3)
    img = np.where(on[..., None], fg, bg) + rng.normal(0, 20, (16, 16, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), label


def run(module, *args, faults=None, code=0):
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)],
                          env=train_env(faults), capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == code, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    digits = make_builtin_shards("digits", root / "digits").root
    items = [(i, i % 4) for i in range(1000)]
    source = Source("stripes", ORIENTATIONS, {"train": items[:800], "val": items[800:]},
                    stripes, 16)
    write_dataset(source, root / "stripes", enc=Encoding(), shard_size=1000, args={})
    pre, ft = root / "pre", root / "ft"
    run("scaling.train", *PRE, "--data", digits, "--out", pre)
    command = ["--from", pre, "--data", root / "stripes", "--out", ft, *FT]
    run("scaling.finetune", *command)
    run("scaling.fewshot", "--run", pre, "--data", root / "stripes", "--shots", "5,10,25")
    return {"root": root, "pre": pre, "ft": ft, "stripes": root / "stripes",
            "digits": digits, "command": command}


def test_fine_tune_of_a_zero3_export_at_16px_learns_and_beats_the_probe(setup):
    pre, ft = setup["pre"], setup["ft"]
    assert not (pre / results.CHECKPOINT_DIR / "step00000060" /
                "mp_rank_00_model_states.pt").exists()  # a ZeRO-3 run: partitioned weights
    cfg = results.read_json(ft / results.CONFIG_FILE)
    assert (cfg["optimizer"], cfg["momentum"], cfg["weight_decay"], cfg["grad_clip"],
            cfg["schedule"], cfg["image_size"], cfg["zero"], cfg["model"]) == (
        "sgd", 0.9, 0.0, 1.0, "cosine", 16, 3, "mu/4")
    rows = results.read_metrics(ft)
    train = [r["loss"] for r in rows if r["kind"] == "train"]
    evals = [r["top1"] for r in rows if r["kind"] == "eval"]
    assert max(train[-2:]) < 0.6 * train[0], train  # measured 1.12 -> 0.41, 0.47, 0.44
    probe = fewshot.summarise([r for r in results.read_transfer(pre) if r["kind"] == "fewshot"])
    best_probe = max(mean for _, _, mean, _ in probe)  # measured 0.705 (10-shot, 3 seeds)
    assert evals[-1] > best_probe, (evals, probe)  # measured 0.75
    with safe_open(str(ft / results.EXPORT_FILE), framework="pt") as f:
        assert '"image_size": 16' in f.metadata()["vit_config"]
    assert load_file(str(ft / results.EXPORT_FILE))["head.weight"].shape == (4, 32)


def test_final_json_and_the_pre_training_run_s_row(setup):
    pre, ft = setup["pre"], setup["ft"]
    final, pre_final = results.read_final(ft), results.read_final(pre)
    assert final["status"] == "ok"
    assert final["pretrain_run"] == str(pre.resolve())
    assert final["pretrain_flops"] == pre_final["total_flops"]
    rows = [r for r in results.read_transfer(pre) if r["kind"] == "finetune"]
    assert len(rows) == 1
    row = rows[0]
    assert (row["dataset"], row["shots"], row["seed"], row["step"]) == ("stripes", None, 0, 60)
    assert (row["images_seen"], row["flops_seen"]) == (pre_final["images_seen"],
                                                       pre_final["total_flops"])
    assert (row["top1"], row["num_test"]) == (final["final_top1"], 200)
    assert row["finetune_run"] == str(ft.resolve()) and row["image_size"] == 16


def test_a_second_invocation_on_a_finished_out_does_nothing(setup):
    pre, ft = setup["pre"], setup["ft"]
    files = [pre / results.TRANSFER_FILE, ft / results.FINAL_FILE, ft / results.METRICS_FILE]
    before = [p.read_bytes() for p in files]
    proc = run("scaling.finetune", *setup["command"])
    assert "already finished" in proc.stderr
    assert [p.read_bytes() for p in files] == before


def test_a_resume_continues_its_own_checkpoint_not_the_export(setup, tmp_path):
    pre = tmp_path / "pre"  # a copy, whose export is then replaced by zeros
    shutil.copytree(setup["pre"], pre, ignore=shutil.ignore_patterns(results.CHECKPOINT_DIR,
                                                                 results.TRANSFER_FILE))
    ft = tmp_path / "ft"
    args = ["--from", pre, "--data", setup["stripes"], "--out", ft, *FT, "--ckpt-every", "20"]
    run("scaling.finetune", *args, faults="sigterm@30", code=results.EXIT_PREEMPTED)
    export = pre / results.EXPORT_FILE
    with safe_open(str(export), framework="pt") as f:
        meta = f.metadata()
    save_file({k: v * 0 for k, v in load_file(str(export)).items()}, str(export), metadata=meta)
    run("scaling.finetune", *args)
    def same(d):
        return [{k: v for k, v in r.items() if k not in TIMING}
                for r in results.read_metrics(d)]
    assert same(ft) == same(setup["ft"])  # as if never stopped: the export was not re-read
    assert [r["kind"] for r in results.read_transfer(pre)] == ["finetune"]


@pytest.mark.parametrize("case, message", [
    ("missing", "not a directory"),
    ("no_config", "no config.json"),
    ("no_export", "no export model.safetensors"),
    ("no_dataset", "has no dataset.json"),
    ("size", "patch size 4 does not divide image size 10"),
    ("model", "a fine-tune keeps the pre-training run's model (mu/4)"),
    ("taken", "already has a fine-tune row"),
])
def test_bad_input_is_one_line_and_exit_2(setup, tmp_path, capsys, case, message):
    pre, data, extra = setup["pre"], setup["stripes"], []
    if case == "missing":
        pre = tmp_path / "nothing"
    elif case == "no_config":
        pre = tmp_path
    elif case == "no_export":
        pre = tmp_path / "pre"
        pre.mkdir()
        for name in (results.CONFIG_FILE, results.FINAL_FILE):
            shutil.copy(setup["pre"] / name, pre / name)
    elif case == "no_dataset":
        data = tmp_path / "data"
        data.mkdir()
        (data / "train-000000.tar").write_bytes(b"")
    elif case == "size":
        extra = ["--image-size", "10"]
    elif case == "model":
        extra = ["--model", "m1/4"]
    argv = ["--from", pre, "--data", data, "--out", tmp_path / "out", "--steps", "5", *extra]
    if case == "taken":  # the fine-tune of the fixture again (same seed, same recipe)
        argv = ["--from", pre, "--data", data, "--out", tmp_path / "out", *FT]
    assert finetune.main([str(a) for a in argv]) == results.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def sweep(setup, tmp_path, *extra, env=None):
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "launchers" / "sweep.py"),
           "--preset", "demo", "--data", setup["digits"], "--results", tmp_path / "res",
           "--sizes", "mu", "--budget-kind", "steps", "--budgets", "30",
           "--finetune", setup["stripes"], "--finetune-image-size", "16",
           "--finetune-steps", "20", *extra]
    return subprocess.run([str(c) for c in cmd], env=env or train_env(), capture_output=True,
                          text=True, timeout=900, check=False, cwd=tmp_path)


def test_sweep_fine_tunes_each_run_after_it_and_a_rerun_submits_nothing(setup, tmp_path):
    first = sweep(setup, tmp_path, "--cluster", "local")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (pre,) = [d for d in (tmp_path / "res" / "demo").iterdir() if (d / "final.json").exists()]
    (ft,) = list((tmp_path / "res" / "demo-finetune").glob(f"{pre.name}_ft16_*"))
    assert results.read_final(ft)["pretrain_run"] == str(pre)
    assert [r["kind"] for r in results.read_transfer(pre)] == ["finetune"]
    again = sweep(setup, tmp_path, "--cluster", "local")
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stdout[-2000:]
    # N23c: another --finetune-lr is another fine-tune of the same run on the same data: it
    # runs (a failure shows its own log, under demo-finetune/) and gets a row of its own
    env = {**train_env(), "VIT_SCALING_FAULTS": "eval_error@20"}
    failed = sweep(setup, tmp_path, "--cluster", "local", "--finetune-lr", "0.003", env=env)
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert "no log at" not in failed.stdout, failed.stdout
    assert "injected eval failure at step 20" in failed.stdout, failed.stdout
    other = sweep(setup, tmp_path, "--cluster", "local", "--finetune-lr", "0.003",
                  "--resubmit-failed")
    assert other.returncode == 0, other.stdout[-3000:] + other.stderr[-3000:]
    rows = results.read_transfer(pre)
    assert [r["kind"] for r in rows] == ["finetune", "finetune"]
    assert len({r["recipe"] for r in rows}) == 2 and len({r["finetune_run"] for r in rows}) == 2


def test_slurm_dry_run_makes_the_fine_tune_depend_on_its_pre_training_job(setup, tmp_path):
    out = sweep(setup, tmp_path, "--cluster", "slurm", "--dry-run")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "#SBATCH --dependency=afterok:PRETRAIN_JOB" in out.stdout
    assert "#SBATCH --kill-on-invalid-dep=yes" in out.stdout
    assert out.stdout.count("--init-from") == 1 and "--optimizer sgd" in out.stdout

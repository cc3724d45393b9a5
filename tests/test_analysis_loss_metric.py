"""--metric loss (issue 26 item 5): eval rows' per-image loss sd, each point's t interval of the
mean loss (checked by hand), the CLI on a synthetic tree with a known law, and old rows without
the sd (one note, no interval); one real tiny training run whose eval rows carry the sd."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.fit.noise import aggregate_seeds, mean_interval
from analysis.fit.transfer import loss_evals, parse_metric
from analysis.load.metrics_file import EVAL_FIELDS, parse_metrics
from analysis.synthetic import LOSS_PER_ERROR, LOSS_SD, TRUE_LAW, write_synthetic_results
from scaling import results
from scaling.data import default_augment, make_builtin_shards, make_eval_loader
from scaling.data.device import normalize
from scaling.export import load_exported

ROOT = Path(__file__).resolve().parents[1]
T_975_99 = 1.984217  # t quantile 0.975 with 99 degrees of freedom (tables, 7 digits)


def test_mean_interval_by_hand():
    lo, hi = mean_interval([2.0, 0.01], [1.5, 0.1], [100, 100])
    half = T_975_99 * 1.5 / 10.0
    assert lo[0] == pytest.approx(2.0 - half, rel=1e-6)
    assert hi[0] == pytest.approx(2.0 + half, rel=1e-6)
    assert lo[1] == 0.0  # a loss is never negative
    assert np.isnan(mean_interval(2.0, np.nan, 100)[0])  # an old row: no interval
    assert np.isnan(mean_interval(2.0, 1.0, 1)[1])  # one image: no sd


def _evals(losses, sds, seeds, n=100):
    k = len(losses)
    return pd.DataFrame({"recipe": ["r"] * k, "run": [f"r_s{s}" for s in seeds], "seed": seeds,
                         "step": [10] * k, "top1": [0.5] * k, "loss": losses,
                         "loss_sd": sds, "num_samples": [n] * k, "status": ["ok"] * k,
                         "is_final": [True] * k})


def test_loss_points_take_the_wider_of_images_and_seeds():
    # one seed: the per-image t interval, not capped at 1 (losses are nats, not fractions)
    one = aggregate_seeds(loss_evals(_evals([2.0], [1.5], [0]).assign(error=0.5)))
    half = T_975_99 * 1.5 / 10.0
    assert one["error"].item() == 2.0
    assert (one["err_lo"].item(), one["err_hi"].item()) == pytest.approx((2.0 - half, 2.0 + half))
    # two seeds 2.0 and 2.2: across seeds t_1 x sd / sqrt 2 = 12.706 x 0.1414 / 1.414 = 1.2706,
    # wider than the images' (mean sd 1.5 over 100 images), so it is the point's interval
    two = aggregate_seeds(loss_evals(_evals([2.0, 2.2], [1.4, 1.6], [0, 1])))
    t1 = 12.706204736174696
    assert two["error"].item() == pytest.approx(2.1)
    assert two["err_hi"].item() == pytest.approx(2.1 + t1 * 0.1, rel=1e-9)
    assert two["err_lo"].item() == pytest.approx(max(2.1 - t1 * 0.1, 0.0))
    # tight seeds: the images' interval is the wider one
    tight = aggregate_seeds(loss_evals(_evals([2.0, 2.0001], [1.5, 1.5], [0, 1])))
    assert tight["err_hi"].item() == pytest.approx(2.00005 + half, rel=1e-6)
    # an old row: no interval at all
    old = aggregate_seeds(loss_evals(_evals([2.0], [np.nan], [0])))
    assert np.isnan(old["err_lo"].item()) and np.isnan(old["err_hi"].item())


def test_metric_parse_and_lenient_loss_sd():
    m = parse_metric("loss")
    assert m.kind == "upstream" and m.label == "Eval cross-entropy (nats)" and m.slug == "loss"
    row = {"kind": "eval", "step": 1, "epoch": 0.1, "images_seen": 8, "flops_seen": 1.0,
           "wall_s": 1.0, "loss": 2.0, "top1": 0.5, "top5": 0.9, "num_samples": 10}
    lines = [row, {**row, "step": 2, "loss_sd": 0.7}, {**row, "step": 3, "loss_sd": "x"},
             {**row, "step": 4, "loss_sd": -1.0}, {**row, "step": 5, "loss_sd": None}]
    parsed = parse_metrics("".join(json.dumps(r) + "\n" for r in lines).encode())
    sd = parsed.rows[:, EVAL_FIELDS.index("loss_sd")]
    assert len(parsed.rows) == 5 and not parsed.skips  # a bad sd never drops the row
    assert sd[1] == 0.7 and np.isnan(sd[[0, 2, 3, 4]]).all()


def _cli(res, out, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "analysis" / "plot_scaling.py"),
                           "--results", str(res), "--out", str(out), "--metric", "loss",
                           "--n-boot", "20", *extra], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text()), (out / "summary.md").read_text()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("loss")
    write_synthetic_results(root / "res", noise=0.0)
    return root


def test_cli_fits_the_loss_law_with_per_image_intervals(synth):
    s, md = _cli(synth / "res", synth / "out")
    assert s["metric"] == "loss"
    z = 1.959963984540054  # t_{49999} is the normal quantile to 5 digits
    for p in s["frontier"]:
        half = p["error"] * LOSS_SD * z / math.sqrt(50_000)  # loss_sd = LOSS_SD x loss
        assert p["err_lo"] == pytest.approx(p["error"] - half, rel=1e-4)
        assert p["err_hi"] == pytest.approx(p["error"] + half, rel=1e-4)
    fit = s["fit"]["params"]
    # the synthetic loss is LOSS_PER_ERROR x the error, so its floor and b are the law's
    assert fit["c"] == pytest.approx(LOSS_PER_ERROR * TRUE_LAW["c"], rel=0.1)
    assert fit["b"] == pytest.approx(TRUE_LAW["b"], rel=0.1)
    assert "| loss (nats) | 95% interval (nats) |" in md
    assert "per-image loss spread" not in md
    assert (synth / "out" / "loss_vs_flops.png").is_file()


def test_old_rows_get_one_note_and_no_interval(synth):
    old = synth / "old"
    for run_dir in results.iter_run_dirs(synth / "res"):
        dest = old / run_dir.relative_to(synth / "res")
        dest.mkdir(parents=True)
        for f in run_dir.iterdir():
            text = f.read_text()
            if f.name == results.METRICS_FILE:
                rows = [json.loads(line) for line in text.splitlines()]
                text = "".join(json.dumps({k: v for k, v in r.items() if k != "loss_sd"}) + "\n"
                               for r in rows)
            (dest / f.name).write_text(text)
    s, md = _cli(old, synth / "out_old")
    notes = [n for n in s["notes"] if "per-image loss spread" in n]
    assert len(notes) == 1 and notes[0].startswith("50 of 50 eval points")
    assert md.count("per-image loss spread") == 1
    assert all(p["err_lo"] is None and p["err_hi"] is None for p in s["frontier"])
    assert s["fit"]["params"]["c"] == pytest.approx(LOSS_PER_ERROR * TRUE_LAW["c"], rel=0.1)


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.multiproc)])
def test_training_eval_rows_carry_the_loss_sd(tmp_path, nproc):
    """On 1 and 2 ranks (each rank sums its shard of the val images, and the sums are
    all-reduced): the row's loss and loss_sd equal those recomputed over every val image."""
    data = tmp_path / "shapes"
    make_builtin_shards("shapes", data, image_size=8, num_samples=200)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
              "SLURM_NTASKS", "VIT_SCALING_FAULTS"):
        env.pop(k, None)
    launch = (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
              if nproc > 1 else [])
    proc = subprocess.run([sys.executable, *launch, "-m", "scaling.train", "--model", "mu/4",
                           "--image-size", "8", "--batch-size", "16", "--num-workers", "0",
                           "--data", str(data), "--out", str(out), "--steps", "20",
                           "--eval-every", "10"], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [r for r in results.read_metrics(out) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20]
    assert all(r["loss_sd"] > 0 for r in evals)
    # recompute the per-image losses from the exported model (the last eval's weights)
    model = load_exported(str(out / "model.safetensors")).eval()
    losses = []
    with torch.no_grad():
        for batch in make_eval_loader(str(data), image_size=8, batch_size=64, rank=0,
                                      world_size=1, num_workers=0):
            logits = model(normalize(batch["image"], default_augment("shapes")))
            losses.append(torch.nn.functional.cross_entropy(logits, batch["label"],
                                                            reduction="none").double())
    losses = torch.cat(losses)
    last = evals[-1]
    assert len(losses) == last["num_samples"]
    assert last["loss"] == pytest.approx(losses.mean().item(), rel=1e-5)
    assert last["loss_sd"] == pytest.approx(losses.std(correction=1).item(), rel=1e-5)

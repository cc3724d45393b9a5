"""The GPU check's input-path grid (scaling.bench.gpu_check): short real training runs of S/16
and B/16 with the DeiT recipe, decoding in the loader's workers or on the device, eager or
compiled, from 224 px JPEG shards made on the spot. This module owns what the grid runs
(`cells`, `shard_args`, `train_args`) and how one run's files become one row of
OUT/inputs.jsonl (`summarise`, `steady`); gpu_check runs the processes. The steady-state rule
and the sizing: docs/benchmarks.md ("GPU", stage 4).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from scaling import results
from scaling.config import TrainConfig

# The imagenet preset's train settings (launchers.presets.imagenet: DeiT, Touvron et al. 2021,
# Table 9), which the library may not import (tests/test_layers.py); tests/test_gpu_check.py
# keeps the two equal. Its peak lr: 5e-4 at a batch of 512, scaled linearly.
RECIPE = {"image_size": 224, "weight_decay": 0.05, "warmup_fraction": 5 / 300, "min_lr": 1e-5,
          "schedule": "cosine", "label_smoothing": 0.1, "mixup_alpha": 0.8, "cutmix_alpha": 1.0,
          "drop_path": 0.1, "grad_clip": 0.0, "precision": "bf16", "zero": 1, "num_workers": 8}
BASE_LR, LR_BATCH = 5e-4, 512
BATCH = 256  # per GPU: what one H100 holds for B/16 in bf16 (gpu_check.GPU_SIZES)
IMAGE_SIZE, WORKERS = RECIPE["image_size"], RECIPE["num_workers"]
LOG_EVERY, SKIP_STEPS = 10, 30  # windows of 10 steps; the first three are warm-up
SIZES = (("S/16", 230), ("B/16", 110))  # (model, steps): SKIP_STEPS + ~3-6 s measured
SHARD_IMAGES, VAL_IMAGES, SHARD_SIZE = 8192, 256, 512  # resampled: repeats cost nothing
# --dry-run: one toy model (both sizes would be the same toy run), 32 px shapes JPEGs
DRY = {"model": "mu/4", "steps": 10, "batch": 8, "image_size": 16, "workers": 2,
       "log_every": 2, "skip": 4, "shard_px": 32, "images": 256, "val": 16, "shard_size": 64}
MIN_S = {None: 40, "cold": 130, "warm": 60}  # eager, compiled cold, compiled warm (module doc)


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    model: str
    steps: int
    decode_on: str  # "workers" | "device"
    compile: bool
    cache: str | None  # compiled: "cold" (the size's first compile here) or "warm"
    min_s: float  # budget seconds it needs to start (gpu_check.Stages): estimate + margin

    @property
    def name(self) -> str:
        return f"inputs-{self.model}-{self.decode_on}-{'compiled' if self.compile else 'eager'}"


def cells(dry_run: bool) -> list[Cell]:
    """The runs, most valuable first under a short budget: every size eager (workers, then
    device), then per size compiled, the first compile cold and the second warm."""
    sizes = ((DRY["model"], DRY["steps"]),) if dry_run else SIZES
    eager = [Cell(model, steps, decode, False, None, MIN_S[None])
             for model, steps in sizes for decode in ("workers", "device")]
    compiled = [Cell(model, steps, decode, True, cache, MIN_S[cache]) for model, steps in sizes
                for decode, cache in (("device", "cold"), ("workers", "warm"))]
    return eager + compiled


def shard_args(data: Path, dry_run: bool, workers: int) -> list[str]:
    """`python -m scaling.data.make_shards` flags: shapes stored as JPEG (pixel noise keeps
    them near a photo's entropy: ~26 KB at 224 px)."""
    px, n, val, per = ((DRY["shard_px"], DRY["images"], DRY["val"], DRY["shard_size"])
                       if dry_run else (IMAGE_SIZE, SHARD_IMAGES, VAL_IMAGES, SHARD_SIZE))
    return ["--from", "shapes", "--out", str(data), "--image-size", str(px), "--format", "jpg",
            "--num-samples", str(n + val), "--val-fraction", f"{val / (n + val):.6f}",
            "--shard-size", str(per), "--workers", str(workers)]


def train_args(cell: Cell, data: Path, run_dir: Path, dry_run: bool) -> list[str]:
    """`python -m scaling.train` flags: the imagenet preset's recipe at one GPU's batch, one
    epoch over the whole run, streamed (not read into memory), evaluated only at the end."""
    batch = DRY["batch"] if dry_run else BATCH
    train = {**RECIPE, "eval_every": 0, "ckpt_every": "0", "progress": False,
             "log_every": DRY["log_every"] if dry_run else LOG_EVERY, "in_memory": "off",
             "num_workers": DRY["workers"] if dry_run else WORKERS,
             "decode_on": cell.decode_on, "compile": cell.compile,
             "samples_per_epoch": cell.steps * batch}
    if dry_run:
        # bf16 is slow on a CPU; batch 8's lr (7.8e-6) is under the recipe's min_lr
        train.update(image_size=DRY["image_size"], precision="fp32", min_lr=0.0)
    cfg = TrainConfig(model=cell.model, data=str(data), out=str(run_dir), steps=cell.steps,
                      batch_size=batch, lr=BASE_LR * batch / LR_BATCH, **train)
    return cfg.to_args()


def steady(rows: list[dict], skip: int) -> dict:
    """Steady-state figures of a run's train rows (module doc): the windows that start at or
    after step `skip`."""
    rows = sorted((r for r in rows if r.get("kind") == "train"), key=lambda r: r["step"])
    wins, prev = [], (0, 0)  # wins: (row, steps, images, seconds); prev: the row before's
    for r in rows:
        steps, images = r["step"] - prev[0], r["images_seen"] - prev[1]
        if prev[0] >= skip and images > 0 and r.get("images_per_s"):
            wins.append((r, steps, images, images / r["images_per_s"]))
        prev = (r["step"], r["images_seen"])
    images, seconds = sum(w[2] for w in wins), sum(w[3] for w in wins)

    def mean(key: str) -> float | None:  # weighted by seconds; None if a window lacks it
        values = [w[0].get(key) for w in wins]
        if not wins or any(v is None for v in values):
            return None
        return sum(v * w[3] for v, w in zip(values, wins)) / seconds

    return {"steady_steps": sum(w[1] for w in wins), "steady_images": images,
            "steady_s": seconds, "images_per_s": images / seconds if seconds else None,
            "mfu": mean("mfu"), "tflops": mean("tflops"),
            "data_wait_fraction": mean("data_wait_fraction"),
            "first_window_images_per_s": rows[0].get("images_per_s") if rows else None}


def summarise(cell: Cell, run_dir: Path, dry_run: bool) -> dict:
    """One row of OUT/inputs.jsonl from a finished run's metrics.jsonl and final.json (read
    defensively: a field another version lacks is null)."""
    metrics = [json.loads(line) for line in
               (run_dir / results.METRICS_FILE).read_text().splitlines() if line.strip()]
    final = json.loads((run_dir / results.FINAL_FILE).read_text())
    parts = final.get("overhead_breakdown_s") or {}
    skip = DRY["skip"] if dry_run else SKIP_STEPS
    return {"kind": "inputs", "model": final.get("model", cell.model),
            "decode_on": cell.decode_on, "compile": cell.compile, "compile_cache": cell.cache,
            "batch_size": DRY["batch"] if dry_run else BATCH,
            "image_size": DRY["image_size"] if dry_run else IMAGE_SIZE,
            "workers": DRY["workers"] if dry_run else WORKERS, "steps": final.get("steps"),
            "skip_steps": skip, **steady(metrics, skip),
            "run_data_wait_fraction": final.get("data_wait_fraction"),
            "compile_s": parts.get("compile"), "wall_s": final.get("wall_hours", 0) * 3600,
            "breakdown_s": parts, "status": final.get("status")}


def report_lines(rows: list[dict]) -> list[str]:
    """The grid's lines in report.txt."""
    lines = [(f"{'inputs':>7} {'decode':>7} {'compile':>8} {'img/s':>9} {'MFU':>6} "
              f"{'wait':>6} {'compile s':>9} {'first img/s':>11}")]
    for r in rows:
        comp = r["compile_cache"] if r["compile"] else "eager"
        lines.append(f"{r['model']:>7} {r['decode_on']:>7} {comp:>8} "
                     f"{_num(r['images_per_s'], '9.1f')} {_num(r['mfu'], '6.1%')} "
                     f"{_num(r['data_wait_fraction'], '6.1%')} {_num(r['compile_s'], '9.1f')} "
                     f"{_num(r['first_window_images_per_s'], '11.1f')}")
    return lines


def _num(value: float | None, spec: str) -> str:
    width = spec.split(".")[0]
    return f"{'n/a':>{width}}" if value is None else format(value, spec)

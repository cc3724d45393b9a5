"""Synthetic results directories with a known scaling law, for tests and demos.

Every run is written with the schema writers of scaling/results.py. Model size s has an
"optimal" compute C_s; its error at compute C is the law times a penalty that grows with
|log10(C / C_s)|, so every size is best near its own C_s (too big a model at small compute, too
small a model at large compute) and the envelope over sizes follows the law
E = a (C + d)^(-b) + c (Zhai et al. 2022, Sec. 2.2) up to the penalty and the noise. The
smallest size has no penalty below its C_s and the largest none above (no other size could beat
them there), so the frontier follows the law at both ends too.

    python -m analysis.synthetic OUT_DIR
    python analysis/plot_scaling.py --results OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from scaling.results import append_metrics, write_json

TRUE_LAW = {"a": 4.0e4, "b": 0.3, "c": 0.05, "d": 5.0e15}
# (model, params, forward MACs per image): ViT paper Table 1 shapes, 224px, as in
# /work/shared/reference/vit_sizes.csv.
SIZES = (("Ti/16", 5_717_416, 1.26e9), ("S/16", 22_050_664, 4.61e9),
         ("B/16", 86_567_656, 17.58e9), ("L/16", 304_326_632, 61.6e9),
         ("H/14", 632_045_800, 167.4e9))


def law(compute, p: dict = TRUE_LAW) -> np.ndarray:
    """E = a (C + d)^(-b) + c with the constants in `p`."""
    return p["a"] * (np.asarray(compute, dtype=float) + p["d"]) ** (-p["b"]) + p["c"]


def _config(model: str, seed: int) -> dict:
    """A run config with the keys the analysis reads."""
    return {"model": model, "seed": seed, "lr": 1e-3, "batch_size": 256, "steps": 1000,
            "world_size": 8}


def _final(model, params, macs, evals: list[dict], status: str, error=None) -> dict:
    """A final.json payload that follows scaling.results.FINAL_KEYS."""
    last = evals[-1]
    tops = [e["top1"] for e in evals if e["top1"] is not None]
    wall_hours = last["wall_s"] / 3600.0
    return {"status": status, "final_top1": last["top1"], "best_top1": max(tops, default=None),
            "final_top5": last["top5"], "final_loss": last["loss"], "steps": last["step"],
            "images_seen": last["images_seen"], "total_flops": last["flops_seen"],
            "params": params, "macs_per_image": macs, "model": model,
            "wall_hours": wall_hours, "device_hours": 8 * wall_hours, "world_size": 8,
            "skipped_samples": 0, "overhead_fraction": 0.05, "error": error}


def _evals(macs: float, c_opt: float, rng, *, n: int, noise: float, penalty: float,
           shift: float = 0.0, edge: str = "") -> list:
    """Eval rows of one run spanning about C_s / 100 .. C_s * 10 in compute (shifted by `shift`
    decades, so that sizes are not evaluated at identical computes)."""
    flops = np.logspace(np.log10(c_opt) - 2 + shift, np.log10(c_opt) + 1 + shift, n)
    images = np.round(flops / (6.0 * macs))
    flops = 6.0 * macs * images  # exactly the analytic definition of scaling/results.py
    dist = np.log10(flops / c_opt)
    if edge == "smallest":  # no smaller model exists: it is the optimal one below its C_s
        dist = np.maximum(dist, 0.0)
    elif edge == "largest":  # no larger model exists: it is the optimal one above its C_s
        dist = np.minimum(dist, 0.0)
    err = law(flops) * (1 + penalty * dist ** 2)
    err = np.clip(err * np.exp(rng.normal(0.0, noise, n)), 1e-4, 0.999)
    rows = []
    for i, (im, fl, e) in enumerate(zip(images, flops, err)):
        rows.append({"kind": "eval", "step": (i + 1) * 100, "epoch": float(im) / 1e6,
                     "images_seen": int(im), "flops_seen": float(fl), "wall_s": 3600.0 * fl / 1e18,
                     "loss": float(2.5 * e), "top1": float(1 - e), "top5": float(1 - e / 3),
                     "num_samples": 50_000})
    return rows


def write_run(run_dir, model, params, macs, evals, *, status="ok", seed=0, error=None) -> Path:
    """Write config.json, metrics.jsonl and (unless status is "running") final.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", _config(model, seed))
    for row in evals:
        append_metrics(run_dir, row)
    if status != "running":
        write_json(run_dir / "final.json", _final(model, params, macs, evals, status, error))
    return run_dir


def write_synthetic_results(root, *, sweep: str = "synth", n_evals: int = 10,
                            noise: float = 0.01, penalty: float = 0.1, seed: int = 0,
                            sizes=SIZES) -> dict:
    """One run per size under root/sweep/, optimal computes one decade apart from 1e16 FLOPs.
    Returns {"law": the true constants, "runs": {model: run dir}}."""
    rng = np.random.default_rng(seed)
    runs = {}
    for i, (model, params, macs) in enumerate(sizes):
        evals = _evals(macs, 1e16 * 10.0 ** i, rng, n=n_evals, noise=noise, penalty=penalty,
                       shift=0.1 * (i % 3),
                       edge="smallest" if i == 0 else "largest" if i == len(sizes) - 1 else "")
        run_id = f"{model.replace('/', '-')}_s{seed}"
        runs[model] = write_run(Path(root) / sweep / run_id, model, params, macs, evals,
                                seed=seed)
    return {"law": dict(TRUE_LAW), "runs": runs}


def write_bench(root, sizes=SIZES) -> Path:
    """Benchmark rows (results/bench/*.jsonl schema, docs/architecture.md) for two impls."""
    path = Path(root) / "bench" / "synthetic.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for model, _, macs in sizes:
            for impl, eff in (("ours", 0.45), ("transformers", 0.38)):
                tflops = eff * 989.0
                ips = tflops * 1e12 / (6 * macs)
                f.write(json.dumps({
                    "model": model, "impl": impl, "images_per_s": ips, "step_s": 256 / ips,
                    "tflops": tflops, "mfu": eff, "mem_gb": 10.0, "batch_size": 256,
                    "image_size": 224, "precision": "bf16", "zero": 1, "compile": False,
                    "world_size": 1, "device": "NVIDIA H100 (synthetic)", "versions": {},
                    "time": "2025-01-01T00:00:00"}) + "\n")
    return path


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "results/synthetic")
    info = write_synthetic_results(out)
    write_bench(out)
    print(f"wrote {len(info['runs'])} runs and a benchmark file under {out}")

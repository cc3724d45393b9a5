"""Synthetic results directories with a known scaling law, for tests and demos, written with the
schema writers of scaling/results.py: one run per size along a law (write_synthetic_results), or
an IsoFLOP sweep with a known N_opt (write_isoflop_results). How the truth is built:
analysis/README.md ("Synthetic results").

    python -m analysis.synthetic OUT_DIR [--kind isoflop|curves] [--seeds 2]
    python analysis/plot_scaling.py --results OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from analysis.fit.ladder import link as link_error
from scaling.flops import flops_for_images, images_for_flops
from scaling.results import append_metrics, append_transfer, iter_run_dirs, read_metrics, write_json

TRUE_LAW = {"a": 4.0e4, "b": 0.3, "c": 0.05, "d": 5.0e15}
# An eval's loss is LOSS_PER_ERROR x its error (so --metric loss follows the law scaled by it),
# and the sd of its per-image losses LOSS_SD x its loss (eval rows' loss_sd).
LOSS_PER_ERROR, LOSS_SD = 2.5, 1.2
# (model, params, forward MACs per image): ViT paper Table 1 shapes, 224px, as in
# tests/data/vit_sizes.csv.
SIZES = (("Ti/16", 5_717_416, 1.26e9), ("S/16", 22_050_664, 4.61e9),
         ("B/16", 86_567_656, 17.58e9), ("L/16", 304_326_632, 61.6e9),
         ("H/14", 632_045_800, 167.4e9))


def law(compute, p: dict = TRUE_LAW) -> np.ndarray:
    """E = a (C + d)^(-b) + c with the constants in `p`."""
    return p["a"] * (np.asarray(compute, dtype=float) + p["d"]) ** (-p["b"]) + p["c"]


def _config(model: str, seed: int, **budget) -> dict:
    """A run config with the keys the analysis reads; `budget` (e.g. flops=1e18) replaces the
    default steps=1000."""
    return {"model": model, "seed": seed, "lr": 1e-3, "batch_size": 256,
            **(budget or {"steps": 1000}), "world_size": 8}


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
           shift: float = 0.0, edge: str = "", outliers: dict | None = None) -> list:
    """Eval rows of one run spanning about C_s / 100 .. C_s * 10 in compute (shifted by `shift`
    decades, so that sizes are not evaluated at identical computes)."""
    flops = np.logspace(np.log10(c_opt) - 2 + shift, np.log10(c_opt) + 1 + shift, n)
    images = np.round(images_for_flops(flops, macs))
    flops = flops_for_images(macs, images)  # exactly the analytic definition (scaling.flops)
    dist = np.log10(flops / c_opt)
    if edge == "smallest":  # no smaller model exists: it is the optimal one below its C_s
        dist = np.maximum(dist, 0.0)
    elif edge == "largest":  # no larger model exists: it is the optimal one above its C_s
        dist = np.minimum(dist, 0.0)
    err = law(flops) * (1 + penalty * dist ** 2)
    err = err * np.exp(rng.normal(0.0, noise, n))
    for i, factor in (outliers or {}).items():  # eval index -> factor on its error
        err[i] *= factor
    err = np.clip(err, 1e-4, 0.999)
    rows = []
    for i, (im, fl, e) in enumerate(zip(images, flops, err)):
        rows.append({"kind": "eval", "step": (i + 1) * 100, "epoch": float(im) / 1e6,
                     "images_seen": int(im), "flops_seen": float(fl), "wall_s": 3600.0 * fl / 1e18,
                     "loss": float(LOSS_PER_ERROR * e), "top1": float(1 - e),
                     "top5": float(1 - e / 3), "num_samples": 50_000,
                     "loss_sd": float(LOSS_SD * LOSS_PER_ERROR * e)})
    return rows


def write_run(run_dir, model, params, macs, evals, *, status="ok", seed=0, error=None,
              config: dict | None = None) -> Path:
    """Write config.json (the keys of `config` added to or replacing the defaults),
    metrics.jsonl and (unless status is "running") final.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", {**_config(model, seed), **(config or {})})
    for row in evals:
        append_metrics(run_dir, row)
    if status != "running":
        write_json(run_dir / "final.json", _final(model, params, macs, evals, status, error))
    return run_dir


def write_synthetic_results(root, *, sweep: str = "synth", n_evals: int = 10,
                            noise: float = 0.01, penalty: float = 0.1, seed: int = 0,
                            sizes=SIZES, outliers: dict | None = None) -> dict:
    """One run per size under root/sweep/, optimal computes one decade apart from 1e16 FLOPs;
    `outliers` maps (model, eval index) to a factor on that eval's error (an injected fault).
    Returns {"law": the true constants, "runs": {model: run dir}}."""
    outliers = outliers or {}
    rng = np.random.default_rng(seed)
    runs = {}
    for i, (model, params, macs) in enumerate(sizes):
        evals = _evals(macs, 1e16 * 10.0 ** i, rng, n=n_evals, noise=noise, penalty=penalty,
                       shift=0.1 * (i % 3),
                       edge="smallest" if i == 0 else "largest" if i == len(sizes) - 1 else "",
                       outliers={j: f for (m, j), f in outliers.items() if m == model})
        run_id = f"{model.replace('/', '-')}_s{seed}"
        runs[model] = write_run(Path(root) / sweep / run_id, model, params, macs, evals,
                                seed=seed)
    return {"law": dict(TRUE_LAW), "runs": runs}


# The IsoFLOP sweep's truth: error(N, C) = e_inf + t_ref ((N / n_ref)^-alpha + (D / d_ref)^-beta)
# with D = C / (6 N) (Hoffmann et al. 2022's C = 6 N D, Sec. 3.3) and d_ref = c_ref / (6 n_ref).
# At fixed C the two terms balance at N_opt = n_ref (C / c_ref)^(beta / (alpha + beta))
# (their Eq. 4), so the exponent a of N_opt ∝ C^a is 0.5 here, and n_ref is N_opt at c_ref.
ISOFLOP_LAW = {"e_inf": 0.1, "t_ref": 0.1, "alpha": 0.3, "beta": 0.3, "n_ref": 6e7,
               "c_ref": 1e19}
ISOFLOP_BUDGETS = (1e18, 3.16e18, 1e19, 3.16e19, 1e20)


def isoflop_error(params, compute, p: dict = ISOFLOP_LAW) -> np.ndarray:
    """The IsoFLOP sweep's true error of a model of `params` trained with `compute` FLOPs."""
    n = np.asarray(params, dtype=float)
    d = np.asarray(compute, dtype=float) / (6.0 * n)
    d_ref = p["c_ref"] / (6.0 * p["n_ref"])
    return p["e_inf"] + p["t_ref"] * ((n / p["n_ref"]) ** -p["alpha"]
                                      + (d / d_ref) ** -p["beta"])


def optimal_params(compute, p: dict = ISOFLOP_LAW) -> np.ndarray:
    """The true N_opt(C) of the IsoFLOP sweep."""
    a = p["beta"] / (p["alpha"] + p["beta"])
    return p["n_ref"] * (np.asarray(compute, dtype=float) / p["c_ref"]) ** a


def _budget_evals(params, macs, budget, rng, *, noise: float, batch: int = 256) -> list:
    """Eval rows of one run of a FLOPs budget: whole steps of `batch` images (so slightly
    under the budget, as scaling.config.resolve_steps does), evals at 1/4, 1/2, 3/4 and the end;
    an eval before the end is 10 % x (1 - fraction) worse (the schedule has not decayed)."""
    steps = int(budget // flops_for_images(macs, batch))
    rows, shift = [], rng.normal(0.0, noise)  # one draw per run: a seed's luck
    for frac in (0.25, 0.5, 0.75, 1.0):
        step = max(1, round(frac * steps))
        images = step * batch
        flops = flops_for_images(macs, images)
        err = isoflop_error(params, flops) * (1 + 0.1 * (1 - frac)) * np.exp(shift)
        err = float(np.clip(err, 1e-4, 0.999))
        rows.append({"kind": "eval", "step": step, "epoch": images / 1.28e6,
                     "images_seen": images, "flops_seen": flops, "wall_s": flops / 1e15,
                     "loss": LOSS_PER_ERROR * err, "top1": 1 - err, "top5": 1 - err / 3,
                     "num_samples": 50_000, "loss_sd": LOSS_SD * LOSS_PER_ERROR * err})
    return rows


def write_isoflop_results(root, *, sweep: str = "isoflop", budgets=ISOFLOP_BUDGETS,
                          sizes=SIZES, seeds=(0,), noise: float = 0.01, seed: int = 0) -> dict:
    """A sweep of sizes x FLOPs budgets x seeds (config `flops`), errors from ISOFLOP_LAW with
    `noise` (log-normal, one draw per run). Returns {"law", "exponent", "runs"}."""
    rng = np.random.default_rng(seed)
    runs = {}
    for model, params, macs in sizes:
        for budget in budgets:
            for s in seeds:
                evals = _budget_evals(params, macs, budget, rng, noise=noise)
                run_id = f"{model.replace('/', '-')}_f{budget:.3g}_s{s}"
                runs[(model, budget, s)] = write_run(
                    Path(root) / sweep / run_id, model, params, macs, evals, seed=s,
                    config={"flops": budget, "steps": None})
    law_ = dict(ISOFLOP_LAW)
    return {"law": law_, "exponent": law_["beta"] / (law_["alpha"] + law_["beta"]),
            "runs": runs}


def write_transfer(root, *, dataset: str = "shapes", shots=(1, 5, 10), seeds: int = 3,
                   num_test: int = 1000, noise: float = 0.02, seed: int = 0,
                   link: tuple[str, dict] | None = None) -> int:
    """Few-shot rows (scaling.results.TRANSFER_KEYS) at every eval step of every run under
    `root`: k-shot error = 1 - (1 - upstream error) x (1 - 0.5 / k), or with `link` (form,
    constants of analysis.fit.ladder.link) that link of the eval's loss for every k, times a
    log-normal draw per probe seed. Returns the number of rows written."""
    rng, n = np.random.default_rng(seed), 0
    for run_dir in iter_run_dirs(root):
        for ev in (r for r in read_metrics(run_dir) if r["kind"] == "eval"):
            for k in shots:
                for s in range(seeds):
                    top1 = (ev["top1"] * (1 - 0.5 / k) if link is None
                            else 1 - float(link_error(*link, ev["loss"])))
                    top1 *= np.exp(rng.normal(0.0, noise))
                    append_transfer(run_dir, {
                        "kind": "fewshot", "dataset": dataset, "shots": k, "seed": s,
                        "top1": float(np.clip(top1, 0.0, 1.0)), "step": ev["step"],
                        "images_seen": ev["images_seen"], "flops_seen": ev["flops_seen"],
                        "num_train": 10 * k, "num_test": num_test, "source": "train"})
                    n += 1
    return n


def write_bench(root, sizes=SIZES) -> Path:
    """Benchmark rows (results/bench/*.jsonl schema, docs/architecture.md) for two impls."""
    path = Path(root) / "bench" / "synthetic.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for model, params, macs in sizes:
            for impl, eff in (("ours", 0.45), ("transformers", 0.38)):
                tflops = eff * 989.0
                ips = images_for_flops(tflops * 1e12, macs)
                f.write(json.dumps({
                    "model": model, "impl": impl, "images_per_s": ips, "step_s": 256 / ips,
                    "params": params, "macs_per_image": macs,
                    "tflops": tflops, "mfu": eff, "mem_gb": 10.0, "batch_size": 256,
                    "image_size": 224, "precision": "bf16", "zero": 1, "compile": False,
                    "world_size": 1, "device": "NVIDIA H100 (synthetic)", "versions": {},
                    "time": "2025-01-01T00:00:00"}) + "\n")
    return path


def main(argv=None) -> int:
    """python -m analysis.synthetic OUT_DIR [--kind isoflop|curves] [--seeds 2]"""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", type=Path, default=Path("results/synthetic"))
    p.add_argument("--kind", choices=("isoflop", "curves"), default="isoflop",
                   help="isoflop: sizes x FLOPs budgets x seeds (default); curves: one long "
                        "run per size")
    p.add_argument("--seeds", type=int, default=2, help="seeds per run of --kind isoflop")
    p.add_argument("--transfer", action="store_true",
                   help="also write few-shot rows (1/5/10 shots, 3 probe seeds) at every eval")
    args = p.parse_args(argv)
    if args.kind == "isoflop":
        info = write_isoflop_results(args.out, seeds=tuple(range(args.seeds)))
    else:
        info = write_synthetic_results(args.out)
    write_bench(args.out)
    if args.transfer:
        write_transfer(args.out)
    print(f"wrote {len(info['runs'])} runs and a benchmark file under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

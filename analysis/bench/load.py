"""Benchmark of the loader at the scale of a study: load_results and re-plots on a synthetic tree,
next to the reference loader of before the fast path and the cache (analysis.bench.load_reference).

    python -m analysis.bench.load --runs 5000 --rows 2000 --out-dir /tmp/bench_load

What it times and writes, and the figures: analysis/README.md ("Speed: the cache, worker
processes, remembered fits").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from analysis.bench import load_reference
from analysis.load import runs as load
from analysis.load.cache import RACY_S
from analysis.load.parse_pool import default_workers
from analysis.synthetic import SIZES, isoflop_error, write_bench
from scaling.flops import flops_for_images
from scaling.results import append_metrics, write_json

BUDGETS = tuple(10.0 ** e for e in np.linspace(18, 20, 10))


def train_line(step: int, images: int, macs: float, wall: float, loss: float, lr: float,
               mfu) -> str:
    """A train row in the byte form scaling.results.append_metrics writes (json.dumps with
    sort_keys=True: floats by repr, None as null), without the cost of json.dumps."""
    ips = 256 / 0.37
    return (f'{{"epoch": {images / 1.28e6!r}, "flops_seen": {flops_for_images(macs, images)!r}, '
            f'"images_per_s": {ips!r}, "images_seen": {images!r}, "kind": "train", '
            f'"loss": {loss!r}, "lr": {lr!r}, "mem_gb": 11.25, '
            f'"mfu": {"null" if mfu is None else repr(mfu)}, "skipped_samples": 0, '
            f'"step": {step!r}, "tflops": 412.5, "wall_s": {wall!r}}}\n')


def eval_row(step: int, images: int, macs: float, wall: float, err: float) -> dict:
    """An eval row (written with json.dumps(sort_keys=True), as append_metrics does)."""
    return {"kind": "eval", "step": step, "epoch": images / 1.28e6, "images_seen": images,
            "flops_seen": flops_for_images(macs, images), "wall_s": wall, "loss": 2.5 * err,
            "top1": 1.0 - err, "top5": 1.0 - err / 3, "num_samples": 50_000}


def metrics_text(params: float, macs: float, budget: float, rows: int, eval_every: int,
                 rng, start_step: int = 0, lr: float = 1e-3) -> tuple[str, list[dict]]:
    """`rows` metrics lines of one run from `start_step` steps done: a train row per step and,
    as every `eval_every`-th line, an eval row at the steps done; the errors follow
    analysis.synthetic's IsoFLOP law, worse away from lr 1e-3, with one log-normal draw per call
    (a seed's luck)."""
    total = start_step + max(1, rows - rows // eval_every)  # steps at the end
    batch = max(1.0, budget / flops_for_images(macs, total))
    luck = math.exp(rng.normal(0.0, 0.01)) * (1 + 0.02 * math.log2(lr / 1e-3) ** 2)
    lines, evals, step = [], [], start_step
    for i in range(1, rows + 1):
        if i % eval_every:
            step += 1
            images = round(step * batch)
            lines.append(train_line(step, images, macs, step * 0.37, 2.0 + 3.0 / step,
                                    1e-3 / step, None if step % 2 else 0.4125))
            continue
        images = round(step * batch)
        err = float(isoflop_error(params, flops_for_images(macs, max(images, 1))))
        err = min(0.999, err * (1 + 0.1 * (1 - step / total)) * luck)
        evals.append(eval_row(step, images, macs, step * 0.37, err))
        lines.append(json.dumps(evals[-1], sort_keys=True) + "\n")
    return "".join(lines), evals


LRS = tuple(1e-3 * 2.0 ** (k / 2) for k in range(-5, 5))


def _run_dirs(root: Path, n_runs: int):
    """(run dir, model, params, macs, budget, lr, seed) of n_runs runs: sizes x budgets x
    learning rates x seeds, in that order (each learning rate is a recipe of its own)."""
    for i in range(n_runs):
        model, params, macs = SIZES[i % len(SIZES)]
        budget = BUDGETS[i // len(SIZES) % len(BUDGETS)]
        k = i // (len(SIZES) * len(BUDGETS))
        lr, seed = LRS[k % len(LRS)], k // len(LRS)
        name = f"{model.replace('/', '-')}_f{budget:.3g}_lr{lr:.3g}_s{seed}"
        yield root / "study" / name, model, params, macs, budget, lr, seed


def write_tree(root: Path, n_runs: int, rows: int, eval_every: int) -> int:
    """The synthetic tree (config.json, final.json with the scaling.results writers; the
    metrics lines in append_metrics' byte form); returns the bytes of metrics written."""
    rng = np.random.default_rng(0)
    total = 0
    for run_dir, model, params, macs, budget, lr, seed in _run_dirs(root, n_runs):
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", {"model": model, "seed": seed, "lr": lr,
                                             "batch_size": 256, "flops": budget,
                                             "world_size": 8})
        text, evals = metrics_text(params, macs, budget, rows, eval_every, rng, lr=lr)
        (run_dir / "metrics.jsonl").write_text(text)
        total += len(text)
        last = evals[-1] if evals else eval_row(0, 0, macs, 0.0, 0.5)
        write_json(run_dir / "final.json", {
            "status": "ok", "final_top1": last["top1"], "best_top1": max(
                [e["top1"] for e in evals] or [last["top1"]]), "final_top5": last["top5"],
            "final_loss": last["loss"], "steps": last["step"], "images_seen":
            last["images_seen"], "total_flops": last["flops_seen"], "params": params,
            "macs_per_image": macs, "model": model, "wall_hours": last["wall_s"] / 3600,
            "device_hours": 8 * last["wall_s"] / 3600, "world_size": 8, "skipped_samples": 0,
            "overhead_fraction": 0.05, "error": None})
    write_bench(root)
    return total


def check_byte_form(tmp: Path) -> None:
    """The fast writer's train lines are exactly what append_metrics writes."""
    text, _ = metrics_text(1e7, 1e9, 1e18, 30, 7, np.random.default_rng(1))
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "metrics.jsonl").unlink(missing_ok=True)
    for line in text.splitlines():
        append_metrics(tmp, json.loads(line))
    if (tmp / "metrics.jsonl").read_text() != text:
        raise AssertionError("the fast writer's lines differ from append_metrics'")


def touch(root: Path, fraction: float, eval_every: int) -> int:
    """Append eval_every rows (one eval) to `fraction` of the runs, as running runs do."""
    rng = np.random.default_rng(1)
    runs = sorted((root / "study").iterdir())
    chosen = runs[:: max(1, round(1 / fraction))]
    for run_dir in chosen:
        model = json.loads((run_dir / "config.json").read_text())
        _, params, macs = next(s for s in SIZES if s[0] == model["model"])
        last = json.loads((run_dir / "metrics.jsonl").read_bytes().splitlines()[-1])
        text, _ = metrics_text(params, macs, model["flops"], eval_every, eval_every, rng,
                               start_step=last["step"], lr=model["lr"])
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(text)
    return len(chosen)


def _timed(fn, *args, **kw):
    """(seconds, result) of one call."""
    t = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t, out


def _line(what: str, new: float, ref: float | None = None, extra: str = "") -> None:
    speed = f"   reference {ref:7.2f} s   speed-up {ref / new:6.1f}x" if ref else ""
    load = os.getloadavg()[0]
    print(f"{what:<42} {new:7.2f} s{speed}{extra}   [load avg {load:.1f}]", flush=True)


def _same(a, b) -> str:
    """Whether two Results hold the same tables and skipped lists."""
    import pandas as pd

    try:
        pd.testing.assert_frame_equal(a.evals, b.evals)
        pd.testing.assert_frame_equal(a.runs, b.runs)
        return "identical" if a.skipped == b.skipped else "DIFFERENT skipped lists"
    except AssertionError as e:
        return f"DIFFERENT ({str(e).splitlines()[0]})"


def _settle(tree: Path) -> None:
    """Wait until the newest file is older than the cache's racy window (analysis.load.cache)."""
    newest = max(os.stat(p).st_ctime for p in tree.rglob("metrics.jsonl"))
    time.sleep(max(0.0, newest + RACY_S + 0.1 - time.time()))


def _loads(tree: Path, cache: Path):
    """The loads: reference, new without cache (1 process, then workers), cold, warm."""
    ref_s, ref = _timed(load_reference.load_results, tree)
    _line("load, reference (json.loads every line)", ref_s)
    one_s, one = _timed(load.load_results, tree, workers=1)
    _line("load, new, no cache, 1 process", one_s, ref_s, f"   tables {_same(one, ref)}")
    del one
    n = default_workers()
    par_s, par = _timed(load.load_results, tree, workers=n)
    _line(f"load, new, no cache, {n} workers", par_s, ref_s, f"   tables {_same(par, ref)}")
    del par
    cold_s, cold = _timed(load.load_results, tree, cache_dir=cache)
    _line("load, new, cold (fills the cache)", cold_s, ref_s,
          f"   parsed {cold.cache['parsed']} files")
    del cold
    warm_s, warm = _timed(load.load_results, tree, cache_dir=cache)
    _line("load, new, warm (all cached)", warm_s, ref_s,
          f"   {warm.cache['hits']} hits, tables {_same(warm, ref)}")


def _cli(tree: Path, out: Path, cache: Path, n_boot: int) -> float:
    """Wall seconds of `python analysis/plot_scaling.py` (a new interpreter: imports included)."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (
        str(repo), os.environ.get("PYTHONPATH"))))}
    t = time.perf_counter()
    subprocess.run([sys.executable, str(repo / "analysis" / "plot_scaling.py"), "--results",
                    str(tree), "--out", str(out), "--cache-dir", str(cache), "--n-boot",
                    str(n_boot)], check=True, capture_output=True, env=env)
    return time.perf_counter() - t


def measure(out: Path, args) -> None:
    """Time every step and print it (see the module docstring)."""
    from analysis.report import (
        build as report,  # late: matplotlib, which analysis.bench.status never needs
    )

    tree, cache, fig = out / "results", out / "cache", out / "fig"
    shutil.rmtree(cache, ignore_errors=True)
    kw = {"n_boot": args.n_boot, "formats": ("png",)}
    _settle(tree)
    _loads(tree, cache)
    report.analyse(tree, fig / "new", cache_dir=cache, **kw)  # the fits, remembered once
    n = touch(tree, 0.01, args.eval_every)
    print(f"appended {args.eval_every} rows to {n} runs (1 %)")
    t = time.perf_counter()
    ref = load_reference.load_results(tree)
    ref_load_s = time.perf_counter() - t
    report.analyse_results(ref, fig / "reference", **kw)
    ref_plot_s = time.perf_counter() - t
    _line("re-plot, reference loader, no cache", ref_plot_s, extra=f"   (load {ref_load_s:.2f} s)")
    plot_s, rep = _timed(report.analyse, tree, fig / "new", cache_dir=cache, **kw)
    _line("re-plot, new (cache)", plot_s, ref_plot_s,
          f"   parsed {rep.results.cache['parsed']} files, tables "
          f"{_same(rep.results, ref)}")
    del ref, rep
    touch(tree, 0.01, args.eval_every)
    _line("re-plot, new, CLI (plot_scaling.py)", _cli(tree, fig / "cli", cache, args.n_boot),
          ref_plot_s, "   (another 1 % appended; interpreter start and imports included)")


def main(argv=None) -> int:
    """python -m analysis.bench.load [--runs 5000] [--rows 2000] --out-dir DIR"""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_tree_args(p, "the tree, cache and figures go")
    p.add_argument("--n-boot", type=int, default=200,
                   help="bootstrap resamples of the re-plots (default: 200, the CLI's)")
    args = p.parse_args(argv)
    check_byte_form(args.out_dir / "byte_form")
    with prepared_tree(args):
        measure(args.out_dir, args)


def add_tree_args(p: argparse.ArgumentParser, what: str) -> None:
    """The generated tree's options (--runs, --rows, --eval-every, --out-dir, --keep), shared
    by the benchmarks that use prepared_tree; `what`: "where ... (required)" for OUT-DIR."""
    p.add_argument("--runs", type=int, default=5000, help="runs in the tree (default: 5000)")
    p.add_argument("--rows", type=int, default=2000,
                   help="metrics rows per run (default: 2000)")
    p.add_argument("--eval-every", type=int, default=21,
                   help="one eval row per this many rows (default: 21)")
    p.add_argument("--out-dir", type=Path, required=True,
                   help=f"where {what} (required; never the repo)")
    p.add_argument("--keep", action="store_true",
                   help="keep OUT-DIR afterwards; a kept tree of the same shape is reused")


@contextlib.contextmanager
def prepared_tree(args):
    """OUT-DIR/results holding a generated tree of --runs x --rows (one eval per --eval-every),
    reused when a kept one has that shape; OUT-DIR is removed afterwards unless --keep."""
    out = args.out_dir
    shape = {"runs": args.runs, "rows": args.rows, "eval_every": args.eval_every}
    marker = out / "tree.json"
    if not (marker.exists() and json.loads(marker.read_text()) == shape):
        shutil.rmtree(out / "results", ignore_errors=True)
        gen_s, size = _timed(write_tree, out / "results", args.runs, args.rows, args.eval_every)
        marker.write_text(json.dumps(shape))
        print(f"wrote {args.runs} runs x {args.rows} rows ({size / 1e6:.0f} MB of metrics) "
              f"in {gen_s:.0f} s")
    print(f"tree: {args.runs} runs x {args.rows} rows, one eval per {args.eval_every}; "
          f"{os.cpu_count()} CPUs")
    try:
        yield out / "results"
    finally:
        if not args.keep:
            shutil.rmtree(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One command that checks the GPU path and measures it: `python -m scaling.bench.gpu_check OUT`.

Made to fit one short call on a lent H100/H200 (`--budget-s`) and to keep working in CI
(`--dry-run`: every stage at toy sizes on a CPU). Each stage runs as its own subprocess with a
deadline and writes rows under OUT; `--fetch-wheels`/`--wheels` carry the packages the device
lacks. Stages, their order and estimated seconds, OUT's files and the device tool's call:
docs/benchmarks.md ("GPU").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scaling.clihelp import OneLineErrorParser

# (size, per-GPU batch) that fill an H100/H200 in bf16 without activation checkpointing
GPU_SIZES = (("Ti/16", 256), ("S/16", 256), ("B/16", 256), ("L/16", 128))
TOY_SIZE = ("mu/4", 4)  # --dry-run: every stage, seconds on a CPU
# What the device image lacks (docs/benchmarks.md): carried as wheels. DeepSpeed's own
# requirements there: hjson, pydantic (with pydantic-core, annotated-types,
# typing-inspection, a recent typing-extensions); webdataset's: braceexpand. Fetched without
# their other dependencies, which the image has (numpy, torch, ...): a second copy would shadow
# the image's own.
MISSING_WHEELS = ("deepspeed==0.19.8", "hjson", "pydantic", "pydantic-core",
                  "annotated-types", "typing-inspection", "typing-extensions", "webdataset",
                  "braceexpand", "submitit")


class Stages:
    """Runs stage commands under one overall deadline and records each outcome."""

    def __init__(self, out: Path, budget_s: float, env: dict):
        self.out, self.env = out, env
        self.deadline = time.monotonic() + budget_s
        self.rows: list[dict] = []

    def run(self, name: str, cmd: list[str], *, min_s: float = 20.0,
            env: dict | None = None) -> bool:
        """Run `cmd` (with `env` added to the stages' environment) if at least `min_s` of the
        budget is left; its output is appended to OUT/stages.log (one file: the device tool
        brings back at most 8)."""
        left = self.deadline - time.monotonic()
        if left < min_s:
            return self.record(name, "skipped", 0.0, f"{left:.0f} s of the budget left")
        t0 = time.monotonic()
        with open(self.out / "stages.log", "a") as log:
            log.write(f"== {name} == {' '.join(cmd)}\n")
            log.flush()
            try:
                rc = subprocess.run(cmd, env={**self.env, **(env or {})}, stdout=log,
                                    stderr=subprocess.STDOUT, timeout=left,
                                    check=False).returncode
            except subprocess.TimeoutExpired:
                return self.record(name, "failed", time.monotonic() - t0, "out of budget")
        reason = None if rc == 0 else f"exit {rc} (stages.log)"
        return self.record(name, "ok" if rc == 0 else "failed", time.monotonic() - t0, reason)

    def record(self, name: str, status: str, seconds: float, reason: str | None) -> bool:
        row = {"stage": name, "status": status, "seconds": round(seconds, 1), "reason": reason}
        self.rows.append(row)
        _append(self.out / "stages.jsonl", row)
        print(f"[gpu_check] {name}: {status} ({seconds:.0f} s){'; ' + reason if reason else ''}",
              flush=True)
        return status == "ok"


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")


def environment(dry_run: bool) -> dict:
    """Versions, the device and a measured matmul rate (bf16 8192^3 on a GPU)."""
    import torch

    # late, like torch (which both import): the other stages and --fetch-wheels need none
    from scaling.bench import env as bench_env
    from scaling.flops import peak_tflops

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = bench_env.device_name(device)
    n, dtype = (256, torch.float32) if dry_run or not cuda else (8192, torch.bfloat16)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))  # random: zeros
    for _ in range(3):  # run faster than real data (docs/benchmarks.md)
        a @ b
    seconds = _timed(lambda: a @ b, device, repeats=10)
    return {"kind": "env", "device": name, "cuda": torch.version.cuda,
            "driver": _driver(), "torch": torch.__version__,
            "versions": bench_env.versions(), "peak_tflops_table": peak_tflops(name),
            "matmul_n": n, "matmul_dtype": str(dtype).removeprefix("torch."),
            "matmul_tflops": 2 * n**3 / seconds / 1e12, "time": bench_env.now()}


def _timed(fn, device, repeats: int) -> float:
    """Median seconds of fn() (CUDA events on a GPU)."""
    import statistics

    import torch

    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _driver() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def plan(dry_run: bool, peers: set[str]) -> list[tuple[str, list[str], float]]:
    """(stage name, `python -m scaling.bench` flags, minimum seconds to start it), most
    valuable first: what a short lease must not miss comes before the rest."""
    def bench(size, batch, *flags):
        if dry_run:
            size, batch = TOY_SIZE
            flags = (*flags, "--image-size", "16", "--num-classes", "10", "--steps", "1",
                     "--warmup", "0", "--rounds", "2", "--precision", "fp32")
        else:
            flags = (*flags, "--precision", "bf16")
        return ["--sizes", size, "--batch-size", str(batch), *flags]

    sizes = dict(GPU_SIZES)
    out = [(f"{s}-eager-transformers", bench(s, sizes[s], "--peer", "transformers"), 40)
           for s in ("B/16", "L/16")]
    out += [("B/16-zero0", bench("B/16", 256, "--deepspeed", "--zero", "0"), 40),
            ("B/16-zero2", bench("B/16", 256, "--deepspeed", "--zero", "2"), 40)]
    out += [(f"{s}-eager-timm", bench(s, sizes[s], "--peer", "timm"), 40)
            for s in ("B/16", "L/16") if "timm" in peers]
    out += [("B/16-compiled-transformers",
             bench("B/16", 256, "--peer", "transformers", "--compile"), 120)]
    out += [(f"{s}-eager-transformers", bench(s, sizes[s], "--peer", "transformers"), 30)
            for s in ("Ti/16", "S/16")]
    if "timm" in peers:
        out += [("L/16-compiled-timm", bench("L/16", 128, "--peer", "timm", "--compile"), 150)]
    return out


def run_throughput(stages: Stages, planned: list[tuple[str, list[str], float]]) -> None:
    """Throughput stages, rows appended to OUT/throughput.jsonl."""
    for name, flags, min_s in planned:
        stages.run(name, [sys.executable, "-m", "scaling.bench", *flags,
                          "--out", str(stages.out / "throughput.jsonl")], min_s=min_s)



def run_inputs(stages: Stages, work: Path, dry_run: bool) -> None:
    """The input-path grid (scaling.bench.input_grid): JPEG shards made here, then one short
    DeiT-recipe run per cell, each summarised as a row of OUT/inputs.jsonl."""
    from scaling.bench import input_grid  # after --wheels: it imports webdataset (scaling.data)

    data, cache = work / "shapes-jpg", work / "inductor-cache"
    shutil.rmtree(cache, ignore_errors=True)  # each size's first compiled run compiles cold
    if not stages.run("inputs-shards", [
            sys.executable, "-m", "scaling.data.make_shards",
            *input_grid.shard_args(data, dry_run, min(16, os.cpu_count() or 1))], min_s=30):
        return
    env = {"TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton"),
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
    for cell in input_grid.cells(dry_run):
        run = work / cell.name.replace("/", "")
        shutil.rmtree(run, ignore_errors=True)  # a reused --work-dir: never resume a run
        try:  # a bug here costs this cell, not the stages after it
            if stages.run(cell.name, [sys.executable, "-m", "scaling.train",
                                      *input_grid.train_args(cell, data, run, dry_run)],
                          min_s=cell.min_s, env=env):
                _append(stages.out / "inputs.jsonl", input_grid.summarise(cell, run, dry_run))
        except (OSError, ValueError, KeyError, TypeError) as e:
            stages.record(cell.name + "-row", "failed", 0.0, f"{type(e).__name__}: {e}")


def run_fork(stages: Stages, work: Path) -> None:
    """A one-run local sweep next to CUDA: the fork server either starts or the sweep falls
    back to one process per rank; either way the run must finish."""
    results = work / "fork-sweep"
    ok = stages.run("fork-sweep", [
        sys.executable, "-m", "launchers.sweep", "--preset", "demo", "--cluster", "local",
        "--sizes", "mu", "--budgets", "3e9", "--results", str(results)], min_s=40)
    log = (stages.out / "stages.log").read_text(errors="replace")
    finals = [json.loads(p.read_text())["status"] for p in results.rglob("final.json")]
    _append(stages.out / "fork.jsonl", {
        "kind": "fork", "sweep_ok": ok, "finals": finals,
        "fell_back": "no fork server" in log.split("== fork-sweep ==")[-1]})


def install_wheels(folder: Path) -> dict:
    """Install carried wheels into a temporary site dir; the env for every stage."""
    site = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
    wheels = sorted(str(p) for p in folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"gpu_check: error: no wheels in {folder}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--no-cache-dir", "--target", str(site), *wheels],
                   check=True)
    sys.path.insert(0, str(site))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site),
                                                         os.environ.get("PYTHONPATH")]))}


def fetch_wheels(folder: Path) -> int:
    """Here (with PyPI): download or build the wheels the device image lacks into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    platform = [x for n in (28, 17) for x in ("--platform", f"manylinux_2_{n}_x86_64")]
    binary = [n for n in MISSING_WHEELS if not n.startswith("deepspeed")]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platform, "-d",
                    str(folder), *binary], check=True)
    deepspeed = [n for n in MISSING_WHEELS if n.startswith("deepspeed")]
    env = dict(os.environ, DS_BUILD_OPS="0")  # a pure-Python wheel: ops JIT-compile there
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-w", str(folder), *deepspeed], check=True, env=env)
    print(f"wheels in {folder}: " + ", ".join(sorted(p.name for p in folder.glob("*.whl"))))
    return 0


def report(out: Path, stages: Stages, dry_run: bool) -> str:
    """The short table printed last (and written to OUT/report.txt)."""
    lines = ["dry run: every stage at toy sizes (mu/4), not a measurement"] if dry_run else []
    for row in _rows(out / "env.jsonl"):
        lines.append(f"{row['device']}: torch {row['torch']}, CUDA {row['cuda']}, driver "
                     f"{row['driver']}; {row['matmul_dtype']} {row['matmul_n']}^3 matmul "
                     f"{row['matmul_tflops']:.3g} TFLOP/s (table peak {row['peak_tflops_table']})")
    lines.append(f"{'model':>7} {'impl':>12} {'engine':>9} {'zero':>4} {'compile':>7} "
                 f"{'batch':>5} {'img/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'mem GB':>7}")
    for r in _rows(out / "throughput.jsonl"):
        mfu = "n/a" if r.get("mfu") is None else f"{r['mfu']:.1%}"
        lines.append(f"{r['model']:>7} {r['impl']:>12} {r['engine']:>9} {r['zero']:>4} "
                     f"{r['compile']!s:>7} {r['batch_size']:>5} {r['images_per_s']:>9.1f} "
                     f"{r['tflops']:>8.2f} {mfu:>6} {r['mem_gb'] or 0:>7.2f}")
    if (out / "inputs.jsonl").exists():
        from scaling.bench.input_grid import report_lines  # (run_inputs says why not at the top)

        lines += report_lines(_rows(out / "inputs.jsonl"))
    for r in _rows(out / "fork.jsonl"):
        lines.append(f"fork server next to CUDA: sweep ok {r['sweep_ok']}, fell back to "
                     f"processes {r['fell_back']}, runs {r['finals']}")
    lines += [f"stage {r['stage']}: {r['status']} ({r['seconds']} s)"
              + (f" {r['reason']}" if r["reason"] else "") for r in stages.rows]
    text = "\n".join(lines) + "\n"
    (out / "report.txt").write_text(text)
    return text


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The CLI; bad flags exit 2 with one line."""
    p = OneLineErrorParser(prog="python -m scaling.bench.gpu_check",
                           description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?", help="folder for the rows and report (made if absent)")
    p.add_argument("--dry-run", action="store_true", help="every stage at toy sizes (a CPU)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="seconds for all stages; a stage that would not fit is skipped")
    p.add_argument("--work-dir", help="shards and runs (default: a temp dir, not under OUT)")
    p.add_argument("--wheels", help="install the carried wheels in this folder first")
    p.add_argument("--fetch-wheels", metavar="DIR", help="download/build the wheels the "
                   "device image lacks into DIR (here, with PyPI) and exit")
    p.add_argument("--stage-env", action="store_true", help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    if not args.fetch_wheels and not args.out:
        p.error("give OUT (the folder for the rows), or --fetch-wheels DIR")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"OUT {args.out} exists and is not a directory")
    if args.budget_s <= 0:
        p.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.wheels and not Path(args.wheels).is_dir():
        p.error(f"--wheels {args.wheels} is not a folder")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every stage (exit 0 when each ran or was skipped for a stated reason, 1 if any
    failed)."""
    args = parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels(Path(args.fetch_wheels))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage_env:
        _append(out / "env.jsonl", environment(args.dry_run))
        return 0
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.wheels:
        env.update(install_wheels(Path(args.wheels)))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu-check-"))
    stages = Stages(out, args.budget_s, env)
    flag = ["--dry-run"] if args.dry_run else []
    stages.run("env", [sys.executable, "-m", "scaling.bench.gpu_check", str(out), "--stage-env",
                       *flag], min_s=5)
    import importlib.util

    peers = {"transformers"} | ({"timm"} if importlib.util.find_spec("timm") else set())
    if "timm" not in peers:
        stages.record("timm-peer", "skipped", 0.0, "timm is not installed here")
    planned = plan(args.dry_run, peers)
    run_throughput(stages, planned[:1])  # B/16 vs transformers
    run_fork(stages, work)
    run_inputs(stages, work, args.dry_run)  # the input path: decode, compile, data wait
    run_throughput(stages, planned[1:])  # L/16, ZeRO 0 and 2, timm, compiled, Ti/S
    print(report(out, stages, args.dry_run), end="")
    return 1 if any(r["status"] == "failed" for r in stages.rows) else 0


if __name__ == "__main__":
    sys.exit(main())

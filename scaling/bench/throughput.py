"""Training-throughput benchmark of our ViT next to a peer; the entry point of every bench mode.

    python -m scaling.bench --sizes Ti/16,S/16 --peer transformers [--precision bf16] [--compile]
    python -m scaling.bench --zero-memory --sizes S/16     # per-rank ZeRO state (zero.py)

Ours and the peer run alternating (ABBA) rounds of full training steps; TFLOP/s are analytic
(scaling.flops), MFU uses the device's bf16 peak. Protocol, rows: docs/benchmarks.md ("1.").
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scaling import dist
from scaling.bench import env as bench_env
from scaling.bench import zero as bench_zero
from scaling.bench.peer import PEERS, peer_model
from scaling.bench.zero import StorageCounter, count_engine
from scaling.clihelp import OneLineErrorParser
from scaling.config import TrainConfig
from scaling.flops import forward_macs, mfu, param_count, peak_tflops, training_flops
from scaling.model import ViTConfig, create_model, vit_config

LR = 1e-4  # any small rate: the benchmark measures speed, not learning
WEIGHT_DECAY = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The CLI; a bad value exits with code 2 and one line naming the flag, before any work."""
    p = OneLineErrorParser(prog="python -m scaling.bench", description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--zero-memory", action="store_true",
                      help="per-rank ZeRO 0-3 model state vs the ZeRO paper (2 gloo processes)")
    mode.add_argument("--overhead", action="store_true", help=argparse.SUPPRESS)  # moved
    p.add_argument("--sizes", help="comma-separated ViT names, e.g. Ti/16,S/16,B/16")
    p.add_argument("--batch-size", type=int, help="images per rank per step (default 32)")
    p.add_argument("--image-size", type=int, default=224, help="input resolution, pixels")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier outputs")
    p.add_argument("--precision", choices=("fp32", "bf16"),
                   help="default: bf16 on a GPU, fp32 on a CPU (zero-memory mode: bf16)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0,
                   help="ZeRO stage (implies --deepspeed)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--steps", type=int, help="timed steps per round (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the rounds")
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per model")
    p.add_argument("--peer", choices=PEERS, help="also time this implementation")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    p.add_argument("--peak-tflops", type=float, help="device peak TFLOP/s for MFU "
                   "(default: scaling.flops table, GPUs only)")
    eng = p.add_mutually_exclusive_group()
    eng.add_argument("--deepspeed", dest="engine", action="store_const", const="deepspeed",
                     help="step through scaling.engine (DeepSpeed); runs under torchrun too")
    eng.add_argument("--bare", dest="engine", action="store_const", const="bare",
                     help="plain PyTorch: autocast, torch AdamW (default unless --zero > 0)")
    p.add_argument("--world", type=int, default=2, help="zero-memory mode: processes")
    p.add_argument("--out", help="JSON-lines file to append to (default: results/bench/"
                   "local/bench.jsonl or zero_memory.jsonl by mode; git-ignored, "
                   "unlike the reference rows in results/bench/*.jsonl)")
    args = p.parse_args(argv)
    _check(p, args)
    return args


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.engine is None:
        args.engine = "deepspeed" if args.zero else "bare"
    if args.engine == "bare" and args.zero:
        p.error(f"--zero {args.zero} needs DeepSpeed: drop --bare")
    if args.overhead:
        p.error("the overhead benchmark moved: python -m launchers.bench_overhead [--sizes m2/4]")
    if not args.sizes:
        p.error("--sizes is required (e.g. --sizes Ti/16,S/16)")
    if args.peer == "timm" and importlib.util.find_spec("timm") is None:
        p.error("--peer timm needs timm installed (pip install timm; it needs torchvision)")
    _check_sizes(p, args)
    for name in ("batch_size", "steps", "rounds", "image_size", "num_classes", "world",
                 "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    for name in args.size_list:
        try:
            vit_config(name, image_size=args.image_size, num_classes=args.num_classes)
        except ValueError as e:
            p.error(f"--sizes: {e}")
    default = bench_zero.DEFAULT_OUT if args.zero_memory else bench_env.DEFAULT_OUT
    try:  # before any work: an hour of benchmarking must not end in an unwritable file
        bench_env.check_out(args.out or default, "--out" if args.out else "the default --out")
    except ValueError as e:
        p.error(str(e))


def _check_sizes(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """args.size_list from --sizes: a comma-separated list naming each model once."""
    args.size_list = []
    if args.sizes is None:
        return
    names = [s.strip() for s in args.sizes.split(",")]
    if not any(names):
        p.error(f"--sizes {args.sizes!r} names no model (e.g. --sizes Ti/16,S/16)")
    if "" in names:
        p.error(f"--sizes {args.sizes!r} has an empty entry (a stray comma?)")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        p.error(f"--sizes names {', '.join(twice)} more than once")
    args.size_list = names


@dataclass
class Trainer:
    """One implementation ready to take training steps on a fixed batch."""

    impl: str
    step: Callable[[], torch.Tensor]  # one optimizer step; returns the loss, still on device
    params: int
    fused_adamw: bool
    held: Callable[[], int]  # bytes of the tensors it keeps between steps (CPU memory)
    mem_gb: list[float] | None = None  # per rank
    mem_method: str | None = None
    rss_gb: list[float] | None = None  # CPU: peak RSS increase while built and warmed up


def _batch(vit: ViTConfig, batch: int, device: torch.device, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, vit.in_chans, vit.image_size, vit.image_size, generator=g)
    labels = torch.randint(0, vit.num_classes, (batch,), generator=g)
    return images.to(device, dtype), labels.to(device)


def bare_trainer(impl: str, model: torch.nn.Module, vit: ViTConfig, args,
                 device: torch.device) -> Trainer:
    """Plain PyTorch: bf16 autocast (fp32 master weights), torch AdamW, optional compile."""
    model = model.to(device).train()
    fused = dist.fused_adamw(device)  # one fused kernel for the whole update
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY,
                            fused=fused or None)
    forward = torch.compile(model) if args.compile else model
    images, labels = _batch(vit, args.batch_size, device, torch.float32)
    bf16 = args.precision == "bf16"

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(images).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def held() -> int:
        counter = StorageCounter()
        counter.walk([opt, images, labels], "buffers")  # params, their grads, AdamW state
        return sum(counter.bytes().values())

    return Trainer(impl, step, sum(p.numel() for p in model.parameters()), fused, held)


def deepspeed_trainer(impl: str, model: torch.nn.Module, vit: ViTConfig, args,
                      device: torch.device, total_steps: int) -> Trainer:
    """The training engine's path: scaling.engine.initialize (ZeRO stage, bf16, fused AdamW)."""
    from scaling import engine  # late: DeepSpeed takes seconds to import

    params = sum(p.numel() for p in model.parameters())
    world = dist.dist_info().world_size
    # Gradient clipping off: DeepSpeed's clip reads the global norm on the host (a sync).
    cfg = TrainConfig(model=vit.name, data="-", out="-", steps=total_steps, lr=LR,
                      batch_size=args.batch_size * world, zero=args.zero,
                      precision=args.precision, grad_clip=0.0, weight_decay=WEIGHT_DECAY)
    ds = engine.initialize(model, cfg, micro=args.batch_size, accum=1, total_steps=total_steps)
    if args.compile:
        ds.compile()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    images, labels = _batch(vit, args.batch_size, device, dtype)

    def step() -> torch.Tensor:
        loss = F.cross_entropy(ds(images).float(), labels)
        ds.backward(loss)
        ds.step()
        return loss.detach()

    def held() -> int:
        return sum(count_engine(ds).values()) + images.nbytes + labels.nbytes

    return Trainer(impl, step, params, dist.fused_adamw(device), held)


def build(impl: str, vit: ViTConfig, args, device: torch.device) -> Trainer:
    """Build and warm up one implementation; measure its peak memory (scaling.bench.env docstring)."""
    with bench_env.PeakMemory(device) as mem:
        torch.manual_seed(0)
        model = create_model(vit) if impl == "ours" else peer_model(impl, vit, param_count(vit))
        if args.engine == "deepspeed":
            total = args.warmup + args.rounds * args.steps + 1
            trainer = deepspeed_trainer(impl, model, vit, args, device, total)
        else:
            trainer = bare_trainer(impl, model, vit, args, device)
        del model
        for _ in range(args.warmup):
            trainer.step()
    if device.type == "cuda":
        trainer.mem_gb, trainer.mem_method = _per_rank(mem.gb), mem.method
        return trainer
    held, peak = trainer.held(), bench_env.cpu_step_peak_bytes(trainer.step)
    trainer.mem_gb = _per_rank(None if peak is None else (held + peak) / 1e9)
    trainer.mem_method = "cpu_allocated_peak"
    trainer.rss_gb = _per_rank(mem.gb)
    return trainer


def _per_rank(value: float) -> list[float]:
    if not torch.distributed.is_initialized():
        return [value]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def time_round(trainer: Trainer, steps: int, device: torch.device) -> float:
    """Seconds per step over `steps` back-to-back steps."""
    dist.barrier()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            loss = trainer.step()
        end.record()
        end.synchronize()  # the only host-device sync: after the timed steps
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = trainer.step()
        seconds = time.perf_counter() - t0
    if not torch.isfinite(loss):
        raise RuntimeError(f"{trainer.impl}: loss is {float(loss)} in the timed steps")
    return seconds / steps


def run_size(name: str, args, device: torch.device, env: dict) -> list[dict]:
    """Benchmark one size: ours (and the peer), alternating rounds; one row per implementation."""
    vit = vit_config(name, image_size=args.image_size, num_classes=args.num_classes)
    trainers = [build("ours", vit, args, device)]
    if args.peer:
        trainers.append(build(args.peer, vit, args, device))
    times: dict[str, list[float]] = {t.impl: [] for t in trainers}
    for r in range(args.rounds):
        for t in trainers if r % 2 == 0 else trainers[::-1]:  # ABBA: linear drift cancels
            times[t.impl].append(time_round(t, args.steps, device))
    rows = [row(vit, t, times[t.impl], args, env) for t in trainers]
    if args.peer:
        ratio = rows[0]["images_per_s"] / rows[1]["images_per_s"]
        paired = statistics.median(p / o for o, p in zip(times["ours"], times[args.peer]))
        for r in rows:
            r.update(peer=args.peer, ratio_ours_to_peer=ratio, ratio_paired_median=paired)
    return rows


def row(vit: ViTConfig, t: Trainer, step_times: list[float], args, env: dict) -> dict:
    """One benchmark row (schema: docs/architecture.md, extra fields: docs/benchmarks.md)."""
    step_s = statistics.median(step_times)
    world = env["world_size"]
    flops = training_flops(vit, args.batch_size)  # per rank per step
    tflops = flops / step_s / 1e12  # per device
    return {
        "model": vit.name, "impl": t.impl, "images_per_s": args.batch_size * world / step_s,
        "step_s": step_s, "tflops": tflops, "mfu": mfu(tflops * 1e12, env["peak_tflops"]),
        "mem_gb": _max(t.mem_gb), "batch_size": args.batch_size * world,
        "image_size": vit.image_size, "precision": args.precision, "zero": args.zero,
        "compile": args.compile, "world_size": world, "device": env["device"],
        "versions": env["versions"], "time": bench_env.now(),
        "engine": args.engine, "batch_per_rank": args.batch_size, "num_classes": vit.num_classes,
        "params": t.params, "macs_per_image": forward_macs(vit), "flops_per_step": flops,
        # share of the model's MACs this implementation computes (ours: the last block works
        # on the class token only; the peer computes every token); tflops/mfu count model FLOPs
        "executed_macs_fraction": (forward_macs(vit, executed=True) / forward_macs(vit)
                                   if t.impl == "ours" else 1.0),
        "peak_tflops": env["peak_tflops"], "fused_adamw": t.fused_adamw, "attention": "sdpa",
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "step_s_rounds": step_times, "mem_gb_per_rank": t.mem_gb, "mem_method": t.mem_method,
        "rss_increase_gb": _max(t.rss_gb) if t.rss_gb else None,
        "peer": None, "ratio_ours_to_peer": None, "ratio_paired_median": None,
    }


def _max(values: list[float | None]) -> float | None:
    return None if None in values else max(values)


def _print(rows: list[dict]) -> None:
    for r in rows:
        mfu_text = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"{r['model']:>8} {r['impl']:>12}  {r['images_per_s']:9.1f} img/s  "
              f"{r['step_s'] * 1e3:9.1f} ms/step  {r['tflops']:8.3f} TFLOP/s  MFU {mfu_text}  "
              f"mem {r['mem_gb'] or float('nan'):.3f} GB", flush=True)
    if rows and rows[0]["ratio_ours_to_peer"] is not None:
        print(f"{rows[0]['model']:>8} ours / {rows[0]['peer']}: {rows[0]['ratio_ours_to_peer']:.3f}"
              f" (median of per-round ratios {rows[0]['ratio_paired_median']:.3f})", flush=True)


def throughput(args) -> int:
    """The throughput mode: all sizes, rows appended to args.out by rank 0."""
    where = dist.dist_info()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.engine == "deepspeed":
        from scaling import engine  # late: DeepSpeed takes seconds to import

        engine.init_distributed(where)
    elif where.world_size > 1:
        raise SystemExit("--bare runs one process; use --deepspeed under torchrun")
    device = dist.device_for(where)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.batch_size, args.steps = args.batch_size or 32, args.steps or 10
    name = bench_env.device_name(device)
    env = {"device": name, "versions": bench_env.versions(), "world_size": where.world_size,
           "peak_tflops": args.peak_tflops or peak_tflops(name if device.type == "cuda" else None)}
    written = 0
    for size in args.size_list:
        rows = run_size(size, args, device, env)
        if where.is_main:
            _print(rows)
            bench_env.append_rows(args.out or bench_env.DEFAULT_OUT, rows)
            written += len(rows)
    if where.is_main:
        print(f"{written} rows appended to {args.out or bench_env.DEFAULT_OUT}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = parse_args(argv)
    if args.zero_memory:
        return bench_zero.run_zero_memory(args)
    return throughput(args)


if __name__ == "__main__":
    sys.exit(main())

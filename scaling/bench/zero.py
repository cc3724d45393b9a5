"""Per-rank ZeRO model-state memory, measured, next to the ZeRO paper's accounting
(Rajbhandari et al. 2020, Sec. 3.1 and 5.1, Fig. 1).

    python -m scaling.bench --zero-memory --sizes S/16 [--world 2]

launches `--world` gloo processes of this module's worker with torchrun. What is counted, under
which kind (CLAIM_ORDER), when the peak is taken, and the results: docs/benchmarks.md ("2. ZeRO").
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from scaling import dist
from scaling.bench import env as bench_env
from scaling.config import TrainConfig
from scaling.dist import fresh_env
from scaling.model import create_model, vit_config

STATE_KINDS = ("params", "grads", "master_params", "optimizer_state")
KINDS = STATE_KINDS + ("buffers",)
# Who owns a byte that several views cover. Buffers come before gradients: a gradient waiting
# in a bucket for its reduce(-scatter) adds no memory to the bucket's, and the paper counts
# such constant-size buffers apart from model states (Sec. 6.2).
CLAIM_ORDER = ("optimizer_state", "master_params", "params", "buffers", "grads")
ADAM_K = 12  # ZeRO paper Sec. 3.1: fp32 params, momentum and variance, 4 bytes each


def paper_bytes(psi: float, stage: int, world: int) -> float:
    """Per-rank model-state bytes for Psi parameters under ZeRO `stage` on `world` ranks."""
    if stage not in (0, 1, 2, 3) or world < 1:
        raise ValueError(f"stage must be 0-3 and world >= 1, got stage={stage}, world={world}")
    return {
        0: (2 + 2 + ADAM_K) * psi,
        1: (2 + 2) * psi + ADAM_K * psi / world,
        2: 2 * psi + (2 + ADAM_K) * psi / world,
        3: (2 + 2 + ADAM_K) * psi / world,
    }[stage]


class StorageCounter:
    """Bytes of the tensor storages reachable from some roots, by kind.

    A byte belongs to the first kind in CLAIM_ORDER whose tensor view covers it; bytes of a
    storage that no view covers (padding) go to the last kind that references it.
    """

    def __init__(self):
        self.found: dict[str, list[torch.Tensor]] = {k: [] for k in KINDS}
        self._visited: dict[int, object] = {}  # holds the objects: their ids stay unique

    def walk(self, obj, kind: str, path: str = "", depth: int = 0) -> None:
        """Collect every tensor reachable from obj (containers, DeepSpeed/torch objects)."""
        if depth > 10 or id(obj) in self._visited:
            return
        self._visited[id(obj)] = obj
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "meta" and obj.untyped_storage().data_ptr():
                grad_path = kind == "buffers" and "grad" in path.lower()
                self.found["grads" if grad_path else kind].append(obj)
            for attr, sub in (("ds_tensor", kind), ("grad", "grads")):
                if getattr(obj, attr, None) is not None:
                    self.walk(getattr(obj, attr), sub, f"{path}.{attr}", depth + 1)
            return
        if isinstance(obj, dict):
            items = [(_key(k), v) for k, v in obj.items()]
        elif isinstance(obj, (list, tuple, set)):
            items = [("", v) for v in obj]
        elif _walkable(obj):
            items = list(vars(obj).items())
        else:
            return
        for name, value in items:
            self.walk(value, kind, f"{path}.{name}", depth + 1)

    def bytes(self) -> dict[str, int]:
        """Bytes per kind, each storage byte counted once."""
        out = dict.fromkeys(KINDS, 0)
        covered: dict[int, list[tuple[int, int]]] = {}
        last_kind: dict[int, tuple[str, int]] = {}
        for kind in CLAIM_ORDER:
            for t in self.found[kind]:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                out[kind] += _claim(covered.setdefault(key, []), _span(t, storage.nbytes()))
                last_kind[key] = (kind, storage.nbytes())
        for key, (kind, nbytes) in last_kind.items():
            out[kind] += nbytes - sum(b - a for a, b in covered[key])
        return out


def _key(k) -> str:
    return str(k) if isinstance(k, (str, int)) else ""


def _span(t: torch.Tensor, limit: int) -> tuple[int, int]:
    """The byte range of a view inside its storage."""
    size = t.element_size()
    start = t.storage_offset() * size
    if t.numel() == 0:
        return start, start
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return start, min(limit, start + extent * size)


def _claim(intervals: list[tuple[int, int]], span: tuple[int, int]) -> int:
    """Add span to the disjoint sorted intervals; return how many bytes were new."""
    a, b = span
    if b <= a:
        return 0
    new = b - a - sum(max(0, min(b, y) - max(a, x)) for x, y in intervals)
    merged = []
    for x, y in sorted(intervals + [(a, b)]):
        if merged and x <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], y))
        else:
            merged.append((x, y))
    intervals[:] = merged
    return new


def _walkable(obj) -> bool:
    module = type(obj).__module__ or ""
    if isinstance(obj, (torch.distributed.ProcessGroup, type)) or not hasattr(obj, "__dict__"):
        return False
    return module.startswith(("deepspeed", "torch.optim", "torch.nn", "scaling"))


def count_engine(engine) -> dict[str, int]:
    """Bytes this rank holds for a DeepSpeed engine, by kind (see the module docstring)."""
    counter = StorageCounter()
    basic = engine.basic_optimizer  # the torch AdamW that DeepSpeed wraps
    counter.walk(basic.state, "optimizer_state")
    # The state is keyed by the fp32 master tensors; ZeRO-3 empties param_groups after a step.
    counter.walk(list(basic.state) + [p for g in basic.param_groups for p in g["params"]],
                 "master_params")
    params = list(engine.module.parameters())
    # ZeRO-3: a rank's share is p.ds_tensor; p.data is a full copy only while gathered.
    counter.walk([getattr(p, "ds_tensor", p) for p in params], "params")
    counter.walk([p.grad for p in params if p.grad is not None], "grads")
    counter.walk(params, "buffers")
    counter.walk(engine.optimizer, "buffers")
    return counter.bytes()


def measure_stage(vit, stage: int, batch: int) -> dict:
    """Train two bf16 steps under ZeRO `stage`; this rank's peak model state, by kind."""
    from scaling import engine as eng  # late: DeepSpeed takes seconds to import

    torch.manual_seed(0)
    model = create_model(vit)
    psi = sum(p.numel() for p in model.parameters())
    world = dist.dist_info().world_size
    cfg = TrainConfig(model=vit.name, data="-", out="-", steps=2, batch_size=batch * world,
                      zero=stage, precision="bf16", grad_clip=0.0)
    engine = eng.initialize(model, cfg, micro=batch, accum=1, total_steps=2)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, vit.image_size, vit.image_size, generator=g)
    labels = torch.randint(0, vit.num_classes, (batch,), generator=g)
    points: list[dict[str, int]] = []

    def step(measure: bool) -> None:
        loss = F.cross_entropy(engine(images.to(torch.bfloat16)).float(), labels)
        # patch_embed is the first layer, so its gradients are the last that backward makes.
        hooks = [p.register_post_accumulate_grad_hook(lambda _: points.append(
            count_engine(engine))) for p in model.patch_embed.parameters()] if measure else []
        engine.backward(loss)
        for h in hooks:
            h.remove()
        if measure:
            points.append(count_engine(engine))
        engine.step()

    step(measure=False)  # creates the optimizer state
    step(measure=True)
    engine.destroy()
    return {"stage": stage, "psi": psi, "peak": max(points, key=state_bytes),
            "after_backward": points[-1], "max_buffers": max(b["buffers"] for b in points),
            "points": len(points)}


def state_bytes(by_kind: dict[str, int]) -> int:
    """Model-state bytes (the paper's 16 Psi terms) of a by-kind count."""
    return sum(by_kind[k] for k in STATE_KINDS)


def run_zero_memory(args) -> int:
    """The --zero-memory mode: launch the worker on args.world ranks, print, append rows."""
    batch = args.batch_size or 2
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "zero.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.world}", "-m", "scaling.bench.zero",
               "--sizes", ",".join(args.size_list), "--image-size", str(args.image_size),
               "--num-classes", str(args.num_classes), "--batch-size", str(batch),
               "--json", str(out)]
        env = fresh_env(OMP_NUM_THREADS="1")  # 2 ranks share the cores
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.exists():
            print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n", file=sys.stderr)
            print(f"error: the ZeRO memory workers exited with {proc.returncode}",
                  file=sys.stderr)
            return 1
        found = json.loads(out.read_text())
    env = {"device": bench_env.device_name(torch.device("cpu")),
           "versions": bench_env.versions(), "time": bench_env.now()}
    rows = [zero_row(f, batch, args.image_size, env) for f in found]
    print_table(rows)
    path = bench_env.append_rows(args.out or DEFAULT_OUT, rows)
    print(f"rows appended to {path}")
    return 0


DEFAULT_OUT = "results/bench/local/zero_memory.jsonl"  # git-ignored


def zero_row(found: dict, batch: int, image_size: int, env: dict) -> dict:
    """One JSON row per (model, stage): measured per-rank model state vs the paper."""
    psi, stage, world = found["psi"], found["stage"], found["world_size"]
    ranks = found["per_rank"]
    measured = max(state_bytes(r["peak"]) for r in ranks)
    paper = paper_bytes(psi, stage, world)
    return {
        "kind": "zero_memory", "model": found["model"], "zero": stage, "world_size": world,
        "precision": "bf16", "params": psi, "paper_bytes": paper, "measured_bytes": measured,
        "ratio": measured / paper,
        "after_backward_bytes": max(state_bytes(r["after_backward"]) for r in ranks),
        "by_kind_per_rank": [r["peak"] for r in ranks],
        "buffers_bytes": max(r["max_buffers"] for r in ranks),
        "image_size": image_size, "batch_per_rank": batch, **env,
    }


def print_table(rows: list[dict]) -> None:
    """Measured vs formula, bytes per parameter, one line per stage."""
    print(f"{'model':>8} {'ZeRO':>4} {'N':>2} {'params':>11} {'paper B/param':>13} "
          f"{'measured':>9} {'ratio':>6} {'after bwd':>9} {'buffers GB':>10}")
    for r in rows:
        psi = r["params"]
        print(f"{r['model']:>8} {r['zero']:>4} {r['world_size']:>2} {psi:>11,} "
              f"{r['paper_bytes'] / psi:>13.3f} {r['measured_bytes'] / psi:>9.3f} "
              f"{r['ratio']:>6.3f} {r['after_backward_bytes'] / psi:>9.3f} "
              f"{r['buffers_bytes'] / 1e9:>10.3f}", flush=True)


def worker(argv: list[str]) -> int:
    """One rank (run by torchrun): measure stages 0-3 for each size; rank 0 writes JSON."""
    import argparse

    from scaling import engine as eng  # late: DeepSpeed takes seconds to import

    p = argparse.ArgumentParser(prog="python -m scaling.bench.zero")
    p.add_argument("--sizes", required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--json", required=True, help="where rank 0 writes the measurements")
    args = p.parse_args(argv)
    where = dist.dist_info()
    eng.init_distributed(where)
    found = []
    for name in args.sizes.split(","):
        vit = vit_config(name, image_size=args.image_size, num_classes=args.num_classes)
        for stage in range(4):
            mine = measure_stage(vit, stage, args.batch_size)
            ranks = [None] * where.world_size
            torch.distributed.all_gather_object(ranks, mine)
            found.append({"model": name, "stage": stage, "psi": mine["psi"],
                          "world_size": where.world_size, "per_rank": ranks})
            gc.collect()
    if where.is_main:
        Path(args.json).write_text(json.dumps(found))
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))

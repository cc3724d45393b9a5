"""Host CPU cost per trained image of the streaming input path, stage by stage, and the host
cores one GPU needs to stay fed (docs/benchmarks.md, "4. Host cost per image").

    python -m scaling.bench.host                        # 256 JPEGs 500x375 q90 -> 224 px
    python -m scaling.bench.host --images 64 --rounds 2 --models B/16 --peak-tflops 756
    PYTHONPATH=BEFORE python scaling/bench/host.py      # BEFORE: a worktree of ff197da
"""

from __future__ import annotations

import io
import pickle
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from scaling.bench import env as bench_env
from scaling.bench.decode import make_jpegs
from scaling.clihelp import OneLineErrorParser
from scaling.data import transforms
from scaling.data.jpeg import reduce_for_box
from scaling.data.samples import Decode
from scaling.data.shardread import raw_samples
from scaling.flops import training_flops
from scaling.model import vit_config

try:  # issue 24: normalisation on the training device; ff197da normalised in the workers
    from scaling.data.device import normalize
except ImportError:
    normalize = None

DEFAULT_OUT = "results/bench/local/host.jsonl"  # git-ignored: never a tracked file
NUM_CLASSES = 1000  # ImageNet's: the size of the soft targets mixup makes
SHARD_SIZE = 128
DEIT_MIX = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1}  # DeiT recipe
WORKERS = ("tar_read", "decode", "crop_resize", "collate", "handoff", "copy_prep")
DEVICE = ("tar_read", "header", "collate_encoded", "handoff_encoded", "copy_prep_encoded")
COLLATE_UINT8 = getattr(transforms, "collate_uint8", None)  # None at ff197da


def code_path() -> str:
    """"uint8" (loaders deliver uint8, the device normalises and mixes) or "float32" (the
    ff197da path: normalised float32 from the workers, mixup on the host)."""
    if COLLATE_UINT8 is not None and normalize is not None:
        return "uint8"
    if hasattr(transforms, "to_tensor_batch"):
        return "float32"
    raise SystemExit("scaling.bench.host: error: this scaling package has neither "
                     "collate_uint8 nor to_tensor_batch")


def write_shards(folder: Path, images: list[bytes]) -> list[str]:
    """The JPEGs as webdataset shards of SHARD_SIZE samples (labels cycle over the classes)."""
    urls = []
    for start in range(0, len(images), SHARD_SIZE):
        path = folder / f"train-{start // SHARD_SIZE:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i, data in enumerate(images[start:start + SHARD_SIZE], start):
                sink.write({"__key__": f"{i:08d}", "jpg": data,
                            "cls": str(i % NUM_CLASSES).encode()})
        urls.append(str(path))
    return urls


class Stages:
    """The stage functions of one path over a round's data; each returns what the next uses."""

    def __init__(self, decode: Decode, batch_size: int, path: str):
        self.decode, self.batch_size, self.path = decode, batch_size, path
        self.aug, self.size = decode.augment, decode.image_size
        self.resample = transforms.RESAMPLE[self.aug.interpolation]
        self.pinned = torch.cuda.is_available()  # torch pins only where it has CUDA
        self._staging: dict[tuple, torch.Tensor] = {}

    def tar_read(self, urls: list[str]) -> list[tuple[bytes, int]]:
        """Every sample of the shards, parsed from the tar, with its label."""
        return [(s["jpg"], self.decode.label(s)) for url in urls for s in raw_samples(url)]

    def draw(self, size: tuple[int, int], rng: random.Random) -> tuple[tuple, bool]:
        """The train crop box and flip of an image of `size` (the loaders' draws, in order)."""
        box = transforms.random_resized_crop_box(*size, rng, self.aug.scale, self.aug.ratio)
        return box, bool(self.aug.hflip and rng.random() < 0.5)

    def decode_one(self, data: bytes, rng: random.Random) -> tuple:
        """(loaded image, box in its pixels, flip): as far as the crop needs (jpeg.py)."""
        img = Image.open(io.BytesIO(data))
        box, flip = self.draw(img.size, rng)
        img, box = reduce_for_box(img, data, box, self.size, self.resample,
                                  draft=self.decode.jpeg_draft, rows=not self.decode.strict)
        img.load()
        return (img if img.mode == "RGB" else img.convert("RGB")), box, flip

    def crop_one(self, img: Image.Image, box: tuple, flip: bool) -> np.ndarray:
        """The decoded image's box resized to size x size, mirrored when `flip`."""
        out = img.resize((self.size, self.size), self.resample, box=box)
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(out)

    def batches(self, items: list) -> list[list]:
        """`items` in consecutive batches of batch_size (the last may be short)."""
        return [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]

    def collate(self, crops: list[np.ndarray], labels: list[int]) -> tuple:
        """The loader's image batch (uint8, or ff197da's normalised float32) and labels."""
        images = (COLLATE_UINT8(crops) if self.path == "uint8"
                  else transforms.to_tensor_batch(crops, self.aug))
        return images, torch.tensor(labels, dtype=torch.int64)

    def copy_prep(self, t: torch.Tensor) -> torch.Tensor:
        """`t` in page-locked memory (the DataLoader's pin thread). Without CUDA: a copy into
        a staging buffer kept between batches, as torch's caching host allocator keeps its
        pinned blocks (a fresh buffer would add page faults the pinned path does not pay)."""
        if self.pinned:
            return t.pin_memory()
        key = (t.shape, t.dtype)
        if key not in self._staging:
            self._staging[key] = torch.empty_like(t)
        return self._staging[key].copy_(t)

    def mix(self, images: torch.Tensor, labels: torch.Tensor, index: int) -> None:
        """DeiT's mixing of batch `index`: mixup on even batches, cutmix on odd ones (DeiT
        draws each with probability 0.5), soft targets smoothed; uint8 input is normalised
        first (scaling.data.device), ff197da's float32 already was."""
        x = normalize(images, self.aug) if images.dtype == torch.uint8 else images
        off = {"cutmix_alpha": 0.0} if index % 2 == 0 else {"mixup_alpha": 0.0}
        transforms.mixup_cutmix(x, labels, NUM_CLASSES, **{**DEIT_MIX, **off},
                                generator=torch.Generator().manual_seed(index))


def timed(fn, items: list, star: bool = True) -> tuple[float, float, list]:
    """(CPU seconds, wall seconds, outputs) of fn over items."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = [fn(*x) if star else fn(x) for x in items]
    return time.process_time() - c0, time.perf_counter() - w0, out


def run_round(st: Stages, urls: list[str], seed: int) -> dict[str, tuple[float, float]]:
    """(CPU s, wall s) of every stage over all images, once."""
    t: dict[str, tuple[float, float]] = {}
    *t["tar_read"], samples = timed(st.tar_read, [urls], star=False)
    samples = samples[0]
    rng = random.Random(seed)
    *t["decode"], opened = timed(st.decode_one, [(d, rng) for d, _ in samples])
    *t["crop_resize"], crops = timed(st.crop_one, opened)
    labels = st.batches([y for _, y in samples])
    *t["collate"], batches = timed(st.collate, list(zip(st.batches(crops), labels)))
    keys = [[f"{i:08d}" for i in range(len(b))] for b in labels]
    *t["handoff"], _ = timed(lambda k: pickle.loads(pickle.dumps({"key": k, "skipped": 0})),
                             keys, star=False)
    *t["copy_prep"], _ = timed(st.copy_prep, [b[0] for b in batches], star=False)
    mix_key = "device_ops_cpu" if st.path == "uint8" else "host_mix"
    *t[mix_key], _ = timed(st.mix, [(x, y, i) for i, (x, y) in enumerate(batches)])
    if st.path == "uint8":
        t.update(device_round(st, samples, keys, seed))
    rng = random.Random(seed)
    *t["decode_crop_check"], _ = timed(
        lambda d: st.decode.image({"jpg": d, "cls": b"0"}, rng), [d for d, _ in samples],
        star=False)
    return t


def device_round(st: Stages, samples: list, keys: list, seed: int) -> dict:
    """The host stages of --decode-on device: header and draws, the bytes handed over."""
    t: dict[str, tuple[float, float]] = {}
    rng = random.Random(seed)
    *t["header"], planned = timed(
        lambda d: (d, *st.draw(Image.open(io.BytesIO(d)).size, rng)),
        [d for d, _ in samples], star=False)

    def collate(items: list) -> dict:
        return {"jpeg": [d for d, _, _ in items],
                "crop_box": torch.tensor([b for _, b, _ in items], dtype=torch.float64),
                "flip": torch.tensor([f for _, _, f in items], dtype=torch.bool)}

    *t["collate_encoded"], batches = timed(collate, st.batches(planned), star=False)
    *t["handoff_encoded"], _ = timed(
        lambda b, k: pickle.loads(pickle.dumps({"jpeg": b["jpeg"], "key": k})),
        list(zip(batches, keys)))
    *t["copy_prep_encoded"], _ = timed(
        lambda b: [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in b["jpeg"]],
        batches, star=False)
    return t


def measure(urls: list[str], n: int, st: Stages, rounds: int) -> dict[str, dict]:
    """Per stage: the best round's CPU and wall milliseconds per image."""
    best: dict[str, list[float]] = {}
    for r in range(rounds):
        for stage, (cpu, wall) in run_round(st, urls, r).items():
            old = best.setdefault(stage, [cpu, wall])
            best[stage] = [min(old[0], cpu), min(old[1], wall)]
    return {k: {"cpu_ms": 1e3 * c / n, "wall_ms": 1e3 * w / n} for k, (c, w) in best.items()}


def totals(stages: dict[str, dict], path: str) -> dict[str, float]:
    """Host CPU ms per trained image of each way of decoding (GPU training)."""
    out = {"workers": sum(stages[s]["cpu_ms"] for s in WORKERS)}
    if path == "float32":
        out["workers"] += stages["host_mix"]["cpu_ms"]
    else:
        out["device"] = sum(stages[s]["cpu_ms"] for s in DEVICE)
    return out


def cores_rows(models: list[str], image_size: int, peak: float, mfu: float,
               total: dict[str, float], cores: float) -> list[dict]:
    """Per model: images/s one GPU trains at `mfu` of `peak`, and the host cores each way of
    decoding needs for that (CPU ms per image x images/s)."""
    rows = []
    for name in models:
        rate = mfu * peak * 1e12 / training_flops(vit_config(name, image_size=image_size), 1)
        row = {"kind": "host_cores", "model": name, "image_size": image_size,
               "peak_tflops": peak, "mfu": mfu, "images_per_s_per_gpu": round(rate, 1),
               "cores_per_gpu_available": cores}
        for way, ms in total.items():
            row[f"host_ms_per_image_{way}"] = round(ms, 4)
            row[f"cores_per_gpu_{way}"] = round(rate * ms / 1e3, 2)
        rows.append(row)
    return rows


STAGE_NOTES = {
    "tar_read": "tar read + label", "decode": "JPEG decode (as far as the crop needs)",
    "crop_resize": "crop, resize, flip", "collate": "collate", "handoff": "worker hand-off",
    "copy_prep": "copy preparation", "host_mix": "mixup/cutmix + smoothing on the host",
    "device_ops_cpu": "float, normalise, mixup/cutmix, smoothing (device = this CPU)",
    "header": "header + crop draw", "collate_encoded": "collate (bytes, boxes, flips)",
    "handoff_encoded": "worker hand-off (bytes)", "copy_prep_encoded": "JPEGs into tensors",
    "decode_crop_check": "check: Decode.image in one call (= decode + crop)",
}


def stage_table(stages: dict[str, dict], total: dict[str, float]) -> str:
    """Markdown: CPU and wall ms per image of each stage, which path counts it, the totals."""
    lines = ["| stage | CPU ms/image | wall ms/image | workers decode | device decode |",
             "|---|---|---|---|---|"]
    for name, t in stages.items():
        marks = ["x" if name in WORKERS or (name == "host_mix") else "",
                 "x" if name in DEVICE and "device" in total else ""]
        lines.append(f"| {STAGE_NOTES[name]} | {t['cpu_ms']:.3f} | {t['wall_ms']:.3f} | "
                     f"{marks[0]} | {marks[1]} |")
    for way, ms in total.items():
        lines.append(f"| **host total, {way} decode** | **{ms:.3f}** | | | |")
    return "\n".join(lines)


def cores_table(rows: list[dict]) -> str:
    """Markdown: per model, images/s per GPU and the cores each way of decoding needs."""
    ways = [k.removeprefix("cores_per_gpu_") for k in rows[0]
            if k.startswith("cores_per_gpu_") and k != "cores_per_gpu_available"]
    cores = rows[0]["cores_per_gpu_available"]
    lines = ["| model | img/s per GPU | " + " | ".join(f"cores/GPU, {w} decode" for w in ways)
             + f" | of {cores:g} cores |", "|---|---|" + "---|" * (len(ways) + 1)]
    for r in rows:
        need = [r[f"cores_per_gpu_{w}"] for w in ways]
        lines.append(f"| {r['model']} | {r['images_per_s_per_gpu']:,.0f} | "
                     + " | ".join(f"{c:.1f}" for c in need) + " | "
                     + ", ".join(f"{w} {c / cores:.0%}" for w, c in zip(ways, need)) + " |")
    return "\n".join(lines)


def _parse(argv: list[str] | None):
    """Command-line flags (module doc); every bad value exits 2 with one line, before work."""
    p = OneLineErrorParser(prog="python -m scaling.bench.host", description=__doc__)
    p.add_argument("--images", type=int, default=256, help="test JPEGs in the shards")
    p.add_argument("--width", type=int, default=500, help="stored JPEG width")
    p.add_argument("--height", type=int, default=375, help="stored JPEG height")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--image-size", type=int, default=224, help="output px of the train crop")
    p.add_argument("--batch-size", type=int, default=64, help="images per collated batch")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all stages (best)")
    p.add_argument("--models", default="Ti/16,S/16,B/16,L/16", help="sizes of the cores table")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 peak per GPU (H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.5, help="model FLOPs utilisation assumed")
    p.add_argument("--cores-per-gpu", type=float, default=14.0, help="host cores a GPU has")
    p.add_argument("--out", default=None, help=f"JSON-lines file to append the rows to "
                   f"(default: {DEFAULT_OUT}, git-ignored)")
    a = p.parse_args(argv)
    if min(a.images, a.width, a.height, a.image_size, a.batch_size, a.rounds) < 1:
        p.error("--images, --width, --height, --image-size, --batch-size and --rounds must "
                "be >= 1")
    if not 1 <= a.quality <= 100:
        p.error(f"--quality {a.quality}: expected 1..100")
    if not (a.peak_tflops > 0 and 0 < a.mfu <= 1 and a.cores_per_gpu > 0):
        p.error(f"--peak-tflops {a.peak_tflops}, --mfu {a.mfu}, --cores-per-gpu "
                f"{a.cores_per_gpu}: expected > 0, in (0, 1], > 0")
    a.models = a.models.split(",")
    try:
        for name in a.models:
            vit_config(name, image_size=a.image_size)
    except ValueError as e:
        p.error(f"--models {','.join(a.models)}: {e}")
    try:
        bench_env.check_out(a.out or DEFAULT_OUT, "--out" if a.out else "the default --out")
    except ValueError as e:
        p.error(str(e))
    return a


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: the stage table, the cores table, rows appended to --out."""
    a = _parse(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-core figures
    try:
        path = code_path()
        images = make_jpegs(a.images, a.width, a.height, a.quality)
        kib = sum(map(len, images)) / len(images) / 1024
        decode = Decode(a.image_size, NUM_CLASSES, transforms.Augment(), strict=False)
        st = Stages(decode, a.batch_size, path)
        with tempfile.TemporaryDirectory(prefix="vit-host-bench-") as tmp:
            stages = measure(write_shards(Path(tmp), images), len(images), st, a.rounds)
    finally:
        torch.set_num_threads(threads)
    total = totals(stages, path)
    print(f"{a.images} JPEGs {a.width}x{a.height} q{a.quality} ({kib:.1f} KiB mean) in "
          f"webdataset shards -> {a.image_size} px train crops, batch {a.batch_size}; code path "
          f"{path}; {'pinned' if st.pinned else 'no CUDA: a plain copy stands in for pinning'};"
          f" one thread, best of {a.rounds} rounds")
    print(stage_table(stages, total))
    cores = cores_rows(a.models, a.image_size, a.peak_tflops, a.mfu, total, a.cores_per_gpu)
    print(f"\nhost cores per GPU at {a.mfu:.0%} MFU of {a.peak_tflops:g} TFLOP/s")
    print(cores_table(cores))
    common = {"path": path, "images": a.images, "width": a.width, "height": a.height,
              "quality": a.quality, "mean_kib": round(kib, 1), "image_size": a.image_size,
              "batch_size": a.batch_size, "rounds": a.rounds, "pinned": st.pinned,
              "device": bench_env.cpu_model(), "versions": bench_env.versions(),
              "time": bench_env.now()}
    rows = [{"kind": "host_stage", "stage": k, "cpu_ms_per_image": round(v["cpu_ms"], 4),
             "wall_ms_per_image": round(v["wall_ms"], 4), **common} for k, v in stages.items()]
    rows += [{**r, **common} for r in cores]
    out = bench_env.append_rows(a.out or DEFAULT_OUT, rows)
    print(f"{len(rows)} rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

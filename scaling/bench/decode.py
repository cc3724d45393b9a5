"""JPEG decode + augment speed per core, against Pillow's full decode of the same files.

    python -m scaling.bench.decode                       # 500x375 q90, outputs 224,112,64,32
    python -m scaling.bench.decode --sizes 224 --mode eval --images 100

Variants `pillow`, `full`, `draft`, `draft+rows` (scaling.data.jpeg) on JPEGs made in memory;
how they are timed, and the results: docs/data.md ("JPEG decoding speed").
"""

from __future__ import annotations

import io
import json
import random
import sys
import time

import numpy as np
import torch
from PIL import Image

from scaling.clihelp import OneLineErrorParser
from scaling.data.shapes import render
from scaling.data.transforms import Augment, decode_crop

VARIANTS = {"full": (False, False), "draft": (True, False), "draft+rows": (True, True)}


def make_jpegs(count: int, width: int, height: int, quality: int) -> list[bytes]:
    """`count` shapes images (all ten classes) as JPEG bytes of width x height."""
    out = []
    for i in range(count):
        pixels = render(i % 10, max(width, height), np.random.default_rng([7, i]))
        buf = io.BytesIO()
        Image.fromarray(pixels[:height, :width]).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def pillow_decode(data: bytes) -> Image.Image:
    """The reference: the whole image decoded at full size, as RGB."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def variant_fn(size: int, mode: str, draft: bool, rows: bool, aug: Augment):
    """A one-image function of decode_crop; train draws crops from one seeded stream."""
    rng = random.Random(0) if mode == "train" else None
    return lambda data: decode_crop(data, size, rng=rng, aug=aug, draft=draft, rows=rows)


def time_round(fn, images: list[bytes]) -> float:
    """Images per CPU-second of this process for one pass of `fn` over `images`."""
    start = time.process_time()
    for data in images:
        fn(data)
    return len(images) / max(time.process_time() - start, 1e-9)


def bench(images: list[bytes], sizes: list[int], mode: str, rounds: int,
          aug: Augment) -> list[dict]:
    """One row per (output size, variant) plus the `pillow` reference: the best images/s per
    core of `rounds` interleaved rounds."""
    fns = {("-", "pillow"): pillow_decode}
    for size in sizes:
        for name, (draft, rows) in VARIANTS.items():
            fns[(size, name)] = variant_fn(size, mode, draft, rows, aug)
    rates: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            rates[key].append(time_round(fn, images))
    return [{"size": size, "variant": name, "mode": mode if size != "-" else "decode",
             "images_per_s": round(max(r), 1), "ms_per_image": round(1e3 / max(r), 3)}
            for (size, name), r in rates.items()]


def table(rows: list[dict]) -> str:
    """Markdown table with the ratio of each variant to `full` at its size and to Pillow."""
    ref = next(r["images_per_s"] for r in rows if r["variant"] == "pillow")
    full = {r["size"]: r["images_per_s"] for r in rows if r["variant"] == "full"}
    lines = ["| output | variant | images/s per core | ms/image | vs full | vs Pillow decode |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        base = full.get(r["size"], r["images_per_s"])
        lines.append(f"| {r['size']} | {r['variant']} | {r['images_per_s']:,.0f} | "
                     f"{r['ms_per_image']:.2f} | {r['images_per_s'] / base:.2f}x | "
                     f"{r['images_per_s'] / ref:.2f}x |")
    return "\n".join(lines)


def _parse(argv: list[str] | None):
    """Command-line flags (see the module docstring); one-line errors, exit 2."""
    p = OneLineErrorParser(prog="python -m scaling.bench.decode", description=__doc__)
    p.add_argument("--images", type=int, default=200, help="test JPEGs")
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--sizes", default="224,112,64,32", help="comma-separated output px")
    p.add_argument("--mode", choices=("train", "eval"), default="train")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (best)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    a = p.parse_args(argv)
    try:
        a.sizes = [int(s) for s in a.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes {a.sizes!r}: expected comma-separated integers")
    if min([a.images, a.width, a.height, a.rounds, *a.sizes]) < 1:
        p.error("--images, --width, --height, --rounds and --sizes must be >= 1")
    if not 1 <= a.quality <= 100:
        p.error(f"--quality {a.quality}: expected 1..100")
    return a


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: prints the table (and writes --json when given)."""
    a = _parse(argv)
    torch.set_num_threads(1)
    images = make_jpegs(a.images, a.width, a.height, a.quality)
    kib = sum(map(len, images)) / len(images) / 1024
    print(f"{a.images} JPEGs {a.width}x{a.height} q{a.quality} ({kib:.1f} KiB mean), {a.mode}, "
          f"{a.rounds} rounds, one process, one thread")
    rows = bench(images, a.sizes, a.mode, a.rounds, Augment())
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(a).items() if k != "json"},
                       "mean_kib": round(kib, 1), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

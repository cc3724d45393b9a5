"""Loader throughput: images/s of decode + augment + batching, total and per worker.

    python -m scaling.bench.loader --generate-jpeg 2000 --workers 0,1,2 --batches 20
    python -m scaling.bench.loader --data DIR --image-size 224 --workers 0,2,4,8

`--generate-jpeg N` writes N shapes images at 224 px as JPEG shards (cached in --gen-dir); the
first batch of each run is not timed. Results: docs/data.md ("Throughput").
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from scaling.clihelp import DefaultsHelpFormatter
from scaling.data.info import DataError, load_dataset_info
from scaling.data.loader import make_eval_loader, make_train_loader
from scaling.data.make_shards import make_builtin_shards


def bench(data: str | os.PathLike, *, workers: int, batches: int, batch_size: int,
          image_size: int, mode: str = "train") -> dict:
    """Time `batches` batches after one warm-up batch; return a result row. `cpu_per_image` is
    the CPU time of the producing processes (workers, or the main process with 0 workers) per
    image, warm-up included, which stays meaningful on a machine shared with other jobs."""
    info = load_dataset_info(data, verify="size")
    kw = {"image_size": image_size, "batch_size": batch_size, "rank": 0, "world_size": 1,
          "num_workers": workers, "pin_memory": False}
    cpu0 = os.times()
    if mode == "train":
        loader = make_train_loader(info, seed=0, samples_per_epoch=(batches + 1) * batch_size,
                                   **kw)
        it = loader.epoch(0)
    else:  # evaluate the val split, or the train split of data made without one
        split = "val" if "val" in info.splits else "train"
        it = iter(make_eval_loader(info, split=split, **kw))
    total = next(it)["image"].shape[0]
    images, start = 0, time.perf_counter()
    for _, batch in zip(range(batches), it):
        images += batch["image"].shape[0]
    seconds = time.perf_counter() - start
    for _ in it:  # let the DataLoader join its workers, so their CPU time is counted
        pass
    cpu1 = os.times()
    cpu = (cpu1.children_user + cpu1.children_system - cpu0.children_user - cpu0.children_system
           if workers else cpu1.user + cpu1.system - cpu0.user - cpu0.system)
    rate = images / seconds
    return {"mode": mode, "workers": workers, "images": images, "seconds": round(seconds, 3),
            "images_per_s": round(rate, 1), "per_worker": round(rate / max(workers, 1), 1),
            "images_per_cpu_s": round((total + images) / cpu, 1), "source": info.source,
            "stored_size": info.image_size, "format": info.image_format,
            "image_size": image_size}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m scaling.bench.loader", description=__doc__,
                                formatter_class=DefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="a shard directory (dataset.json)")
    src.add_argument("--generate-jpeg", type=int, metavar="N",
                     help="generate N 224 px shapes JPEGs and benchmark those")
    p.add_argument("--gen-dir", default=None, help="where generated shards go (reused)")
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--batches", type=int, default=20, help="timed batches per worker count")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=None, help="output px (default: stored)")
    p.add_argument("--mode", choices=("train", "eval"), default="train")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: one line per worker count."""
    a = _parse(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the in-process (workers=0) row then measures one core
    try:
        data = a.data
        if a.generate_jpeg:
            name = f"vit-scaling-jpeg224-{a.generate_jpeg}"
            data = a.gen_dir or Path(tempfile.gettempdir()) / name
            make_builtin_shards("shapes", data, image_size=224, num_samples=a.generate_jpeg,
                                val_fraction=0.0, image_format="jpg", shard_size=500,
                                workers=os.cpu_count() or 1)
        info = load_dataset_info(data, verify="size")
        size = a.image_size or info.image_size
        tars = [s.path for sp in info.splits.values() for s in sp.shards]
        mean_kb = sum(p.stat().st_size for p in tars) / 1024 / sum(
            sp.num_samples for sp in info.splits.values())
        print(f"data {info.root} ({info.source}, {info.image_format}, stored {info.image_size} "
              f"px, {mean_kb:.1f} KiB/sample in tar) -> {size} px, batch {a.batch_size}, "
              f"{a.mode}, {os.cpu_count()} CPUs")
        for w in (int(x) for x in a.workers.split(",")):
            r = bench(data, workers=w, batches=a.batches, batch_size=a.batch_size,
                      image_size=size, mode=a.mode)
            print(f"workers={w}: {r['images_per_s']:7.1f} images/s total, {r['per_worker']:7.1f} "
                  f"per worker, {r['images_per_cpu_s']:7.1f} per CPU-second of the "
                  f"{'workers' if w else 'main process'} ({r['images']} images in "
                  f"{r['seconds']} s)")
    except (DataError, ValueError) as e:
        print(f"python -m scaling.bench.loader: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())

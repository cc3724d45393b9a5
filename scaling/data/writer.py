"""Atomic webdataset shard writing and the final `dataset.json`.

A source gives, per split, a list of picklable items and one module-level `load` function that
turns an item into a PIL image (or already-encoded bytes) and a label. The writer cuts the item
list into shards, encodes them (in a process pool when asked) and writes each shard to a temporary
name, fsyncs it and renames it; `dataset.json` is written last, the same way. A killed writer
therefore leaves no complete-looking shard and no `dataset.json` pointing at missing shards.

Tar members get fixed metadata (mtime 0, uid 0, mode 0o444), so a shard's sha256 depends only on
its samples: the same arguments and seed give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from scaling.data.info import FORMAT, HASH_CACHE_FILE, INFO_FILE, DataError
from scaling.results import atomic_write_text

SPLITS = ("train", "val")
SHARD_RE = re.compile(r"^(train|val)-\d{6}\.tar$")


@dataclass(frozen=True)
class Source:
    """What a writer needs: class names, items per split and a picklable item loader."""

    name: str
    classes: tuple[str, ...]
    items: dict[str, Sequence[Any]]  # split -> items, already in their final (shuffled) order
    load: Callable[[Any], tuple[Any, int]]  # item -> (PIL image | (ext, bytes, size), label)
    image_size: int  # stored shorter side (cap); 0: keep originals, record the largest seen


@dataclass(frozen=True)
class Encoding:
    """How images are stored: format, JPEG quality, and the shorter-side cap (0: keep)."""

    image_format: str = "png"
    quality: int = 95
    max_size: int = 0


def encode_image(image: Any, enc: Encoding) -> tuple[str, bytes, tuple[int, int]]:
    """Encode a PIL image (or pass through (ext, bytes, size)) as (ext, bytes, (w, h))."""
    if isinstance(image, tuple):  # already encoded in the right format and size: keep the bytes
        return image
    image = image.convert("RGB") if image.mode != "RGB" else image
    if enc.max_size and min(image.size) > enc.max_size:
        w, h = image.size
        s = enc.max_size / min(w, h)
        image = image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    buf = io.BytesIO()
    if enc.image_format == "jpg":
        image.save(buf, format="JPEG", quality=enc.quality)
    else:
        image.save(buf, format="PNG", compress_level=1)  # level 1: 5x faster, ~10% larger
    return enc.image_format, buf.getvalue(), image.size


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append one file with fixed metadata (reproducible bytes)."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid = len(data), 0, 0o444, 0, 0
    tar.addfile(ti, io.BytesIO(data))


def write_shard(path: Path, samples: Any) -> tuple[int, str, int]:
    """Atomically write (key, ext, bytes, label) samples to a tar; return (count, sha256, bytes)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    n = 0
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, ext, data, label in samples:
                    _add_member(tar, f"{key}.{ext}", data)
                    _add_member(tar, f"{key}.cls", str(int(label)).encode())
                    n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n, _sha256(path), path.stat().st_size


def _sha256(path: Path) -> str:
    """sha256 of a freshly written file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _shard_job(job: tuple) -> dict:
    """Encode and write one shard (runs in a pool worker); return its dataset.json entry."""
    out, name, split, start, items, load, enc, num_classes = job
    short_sides = [0]

    def samples():
        for i, item in enumerate(items):
            image, label = load(item)
            if not 0 <= int(label) < num_classes:
                raise DataError(f"{name}: label {label} of item {str(item)[:80]} is outside "
                                f"[0, {num_classes})")
            ext, data, size = encode_image(image, enc)
            short_sides.append(min(size))
            yield f"{split}_{start + i:08d}", ext, data, label

    n, digest, size = write_shard(Path(out) / name, samples())
    return {"name": name, "num_samples": n, "sha256": digest, "bytes": size,
            "_short_side": max(short_sides)}


def clear_outputs(out: Path) -> None:
    """Remove dataset.json first (so nothing points at shards being replaced), then old shards
    and their hash cache."""
    (out / INFO_FILE).unlink(missing_ok=True)
    (out / HASH_CACHE_FILE).unlink(missing_ok=True)
    for p in out.iterdir():
        if SHARD_RE.match(p.name) or (p.name.startswith(".") and ".tmp" in p.name):
            p.unlink(missing_ok=True)
    _fsync_dir(out)


def _fsync_dir(path: Path) -> None:
    """Persist renames/unlinks in `path` (POSIX needs the directory fsynced too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seed_hash_cache(out: Path, entries: list[dict]) -> None:
    """Record the hashes just computed, so the first verify=True load need not re-hash."""
    cache = {}
    for e in entries:
        st = (out / e["name"]).stat()
        cache[e["name"]] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": e["sha256"]}
    atomic_write_text(out / HASH_CACHE_FILE, json.dumps(cache, indent=1, sort_keys=True))


def _jobs(source: Source, out: Path, enc: Encoding, shard_size: int) -> list[tuple]:
    """One job per shard: a contiguous slice of a split's items."""
    jobs = []
    for split in SPLITS:
        items = source.items.get(split, ())
        for k, start in enumerate(range(0, len(items), shard_size)):
            jobs.append((str(out), f"{split}-{k:06d}.tar", split, start,
                         list(items[start:start + shard_size]), source.load, enc,
                         len(source.classes)))
    return jobs


def write_dataset(source: Source, out: str | os.PathLike, *, enc: Encoding, shard_size: int,
                  args: dict, workers: int = 1) -> dict:
    """Write all shards of a source, then dataset.json; return the dataset.json payload."""
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}; expected >= 1")
    if not source.items.get("train"):
        raise DataError(f"source {source.name!r} ({args.get('src')}) has no training samples")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clear_outputs(out)
    jobs = _jobs(source, out, enc, shard_size)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            entries = list(pool.map(_shard_job, jobs))
    else:
        entries = [_shard_job(j) for j in jobs]
    image_size = source.image_size or max(e["_short_side"] for e in entries)
    for e in entries:
        del e["_short_side"]
    splits = {}
    for split in SPLITS:
        shards = [e for e, j in zip(entries, jobs) if j[2] == split]
        if shards:
            splits[split] = {"num_samples": sum(e["num_samples"] for e in shards),
                             "shards": shards}
    payload = {
        "format": FORMAT, "source": source.name, "image_size": image_size,
        "image_format": enc.image_format, "classes": list(source.classes),
        "num_classes": len(source.classes), "splits": splits,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "args": args,
    }
    _seed_hash_cache(out, entries)
    _fsync_dir(out)  # the shard renames must be durable before dataset.json names them
    atomic_write_text(out / INFO_FILE, json.dumps(payload, indent=1) + "\n")
    _fsync_dir(out)
    return payload

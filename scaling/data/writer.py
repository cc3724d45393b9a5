"""Atomic webdataset shard writing and the final `dataset.json`.

A source gives, per split, picklable items and a module-level `load` (item -> image, label); the
writer cuts them into shards with fixed tar metadata (same arguments and seed, same bytes) and
builds the dataset in a hidden sibling of OUT that replaces OUT only when complete, so a failed
or killed build leaves the previous dataset usable. docs/data.md, "Making shards".
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from scaling.data.errors import DataError, UnreadableImage
from scaling.data.info import FORMAT, HASH_CACHE_FILE, INFO_FILE, cache_entry
from scaling.data.modes import to_rgb
from scaling.results import atomic_write_text

SPLITS = ("train", "val")
SHARD_RE = re.compile(r"^(train|val)-\d{6}\.tar$")
OLD_LOCK_FILE = ".make_shards.lock"  # lived inside OUT before builds were swapped in
LOCK_SUFFIX = ".make_shards.lock"  # the lock of OUT is PARENT/.OUT.make_shards.lock
STAGING = (".build-", ".old-")  # sibling name parts: .OUT.build-TOKEN, .OUT.old-TOKEN
MAX_SKIPS_LISTED = 1000  # dataset.json lists the first ones; "count" has them all


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
    image = to_rgb(image)  # 16-bit grey scaled, transparency flattened (modes.py)
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


def _item_name(item: Any, index: int) -> str:
    """A short name of a source item for errors: its index, and its leading string (an
    imagefolder path) if it has one; never an array (CIFAR items hold the pixels)."""
    if isinstance(item, tuple) and item and isinstance(item[0], str):
        return f"item {index} ({item[0][:200]})"
    return f"item {index}"


def _shard_job(job: tuple) -> dict:
    """Encode and write one shard (runs in a pool worker); return its dataset.json entry.
    An UnreadableImage is skipped and listed in the entry's "_skipped" (strict: raised)."""
    out, name, split, start, items, load, enc, num_classes, strict = job
    short_sides, labels, skipped = [0], [], []

    def samples():
        for i, item in enumerate(items):
            try:
                image, label = load(item)
            except UnreadableImage as e:
                if strict:
                    raise
                skipped.append({"split": split, "item": _item_name(item, start + i),
                                "reason": str(e)})
                continue
            label = int(label)
            if not 0 <= label < num_classes:
                raise DataError(f"{name}: label {label} of {_item_name(item, start + i)} of "
                                f"split {split!r} is outside [0, {num_classes})")
            ext, data, size = encode_image(image, enc)
            short_sides.append(min(size))
            labels.append(label)
            yield f"{split}_{start + i:08d}", ext, data, label

    n, digest, size = write_shard(Path(out) / name, samples())
    # the checked range goes into dataset.json, so verification can reject a dataset.json whose
    # classes no longer cover its labels without reading a shard
    return {"name": name, "num_samples": n, "sha256": digest, "bytes": size,
            "label_min": min(labels, default=None), "label_max": max(labels, default=None),
            "_short_side": max(short_sides), "_skipped": skipped}


def _is_dataset_file(name: str) -> bool:
    """Whether a file name is one a build writes (and a rebuild may therefore replace)."""
    return (name in (INFO_FILE, HASH_CACHE_FILE, OLD_LOCK_FILE) or bool(SHARD_RE.match(name))
            or (name.startswith(".") and ".tmp" in name))


def check_out_dir(out: Path) -> None:
    """OUT must be absent, or a directory holding only dataset files: a rebuild replaces the
    whole directory, and must not take anything else with it."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if not _is_dataset_file(p.name))
    if foreign:
        raise DataError(f"--out {out} holds {len(foreign)} entries that are not part of a "
                        f"dataset (e.g. {foreign[:3]}); a rebuild replaces the whole "
                        f"directory: use a new or empty one")


def remove_stale_builds(out: Path) -> list[Path]:
    """Delete the staging siblings of OUT that killed builds left; only call it holding the
    build lock of OUT (make_shards), so that no live build's directory is removed."""
    if not out.parent.is_dir():
        return []
    stale = [p for p in out.parent.iterdir()
             if any(p.name.startswith(f".{out.name}{tag}") for tag in STAGING)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


@contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """Hold the exclusive build lock of OUT (PARENT/.OUT.make_shards.lock: OUT itself is
    replaced) while writing, so concurrent ranks build it only once; the holder is the only
    builder of OUT, so it may delete the staging dirs killed builds left. A waiter says so."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.with_name(f".{out.name}{LOCK_SUFFIX}")
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # say why nothing happens (the other may take hours)
            print(f"make_shards: waiting for another build of {out} to finish (it holds the "
                  f"lock {lock})", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            remove_stale_builds(out)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _staging(out: Path, tag: str) -> Path:
    """A fresh sibling name for OUT (unique across hosts sharing a file system)."""
    return out.with_name(f".{out.name}{tag}{uuid.uuid4().hex[:12]}")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the
    C library or file system lacks it (e.g. NFS), so the caller falls back to renames."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_by_renames(new: Path, out: Path) -> None:
    """Move OUT aside, NEW into place, delete the old one: the fallback swap, with a window of
    two renames in which OUT is absent."""
    old = _staging(out, STAGING[1])
    os.rename(out, old)
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


def _swap_in(new: Path, out: Path) -> None:
    """Make the complete build NEW the directory OUT; the old OUT (if any) is deleted."""
    if not out.exists():
        os.rename(new, out)
    elif _exchange(new, out):
        shutil.rmtree(new, ignore_errors=True)  # NEW now holds the previous dataset
    else:
        replace_by_renames(new, out)
    _fsync_dir(out.parent)


def _fsync_dir(path: Path) -> None:
    """Persist renames/unlinks in `path` (POSIX needs the directory fsynced too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seed_hash_cache(out: Path, entries: list[dict]) -> None:
    """Record the hashes just computed, so the first verify=True load need not re-hash."""
    # the files keep inode and ctime when their directory is renamed into place
    cache = {e["name"]: cache_entry((out / e["name"]).stat(), e["sha256"]) for e in entries}
    atomic_write_text(out / HASH_CACHE_FILE, json.dumps(cache, indent=1, sort_keys=True))


def _jobs(source: Source, out: Path, enc: Encoding, shard_size: int,
          strict: bool) -> list[tuple]:
    """One job per shard: a contiguous slice of a split's items."""
    jobs = []
    for split in SPLITS:
        items = source.items.get(split, ())
        for k, start in enumerate(range(0, len(items), shard_size)):
            jobs.append((str(out), f"{split}-{k:06d}.tar", split, start,
                         list(items[start:start + shard_size]), source.load, enc,
                         len(source.classes), strict))
    return jobs


def _staged(out: Path, fill: Callable[[Path], dict]) -> dict:
    """fill(BUILD) -> payload in a staging sibling of OUT, then swap it in (module doc)."""
    out = Path(out).resolve()  # a symlinked OUT: swap the directory it points to
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    build = _staging(out, STAGING[0])
    build.mkdir()
    try:
        payload = fill(build)
        if out.is_dir():  # keep the permissions of the directory being replaced
            os.chmod(build, out.stat().st_mode & 0o7777)
        _swap_in(build, out)
    finally:
        shutil.rmtree(build, ignore_errors=True)  # a failed build: its partial shards
    return payload


def write_dataset(source: Source, out: str | os.PathLike, *, enc: Encoding, shard_size: int,
                  args: dict, workers: int = 1, strict: bool = False) -> dict:
    """Write all shards of a source and dataset.json into a staging sibling of OUT, then swap
    it in (module doc); return the dataset.json payload. On failure OUT is untouched.
    Unreadable images are skipped and listed in dataset.json's "skipped" (strict: DataError)."""
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}; expected >= 1")
    if not source.items.get("train"):
        raise DataError(f"source {source.name!r} ({args.get('src')}) has no training samples")
    return _staged(Path(out), lambda build: _write_all(source, build, enc, shard_size, args,
                                                       workers, strict))


def write_info(out: str | os.PathLike, payload: dict, cache: dict) -> dict:
    """A dataset.json of shards that live elsewhere (make_shards --from webdataset), and the
    hash cache entries of those scanned, swapped in for OUT like a build."""
    def fill(build: Path) -> dict:
        if cache:
            atomic_write_text(build / HASH_CACHE_FILE, json.dumps(cache, indent=1,
                                                                  sort_keys=True))
        atomic_write_text(build / INFO_FILE, json.dumps(payload, indent=1) + "\n")
        _fsync_dir(build)
        return payload
    return _staged(Path(out), fill)


def _skips(entries: list[dict], out: Path) -> tuple[list[dict], dict]:
    """Drop the shards that skipping left empty (their files too); the "skipped" record."""
    items = [s for e in entries for s in e.pop("_skipped")]
    kept = []
    for e in entries:
        if e["num_samples"]:
            kept.append(e)
        else:
            (out / e["name"]).unlink()
    per_split = {sp: sum(s["split"] == sp for s in items) for sp in SPLITS}
    return kept, {"count": len(items), "per_split": per_split, "items": items[:MAX_SKIPS_LISTED]}


def _write_all(source: Source, out: Path, enc: Encoding, shard_size: int, args: dict,
               workers: int, strict: bool = False) -> dict:
    """Encode every shard into the (empty) directory OUT, then write dataset.json."""
    jobs = _jobs(source, out, enc, shard_size, strict)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            entries = list(pool.map(_shard_job, jobs))
    else:
        entries = [_shard_job(j) for j in jobs]
    split_of = {e["name"]: j[2] for e, j in zip(entries, jobs)}
    entries, skipped = _skips(entries, out)
    if not any(split_of[e["name"]] == "train" for e in entries):
        first = skipped["items"][0] if skipped["items"] else {}
        raise DataError(f"source {source.name!r} ({args.get('src')}): no training sample left "
                        f"after skipping {skipped['count']} unreadable images (first: "
                        f"{first.get('item')}: {first.get('reason')})")
    image_size = source.image_size or max(e["_short_side"] for e in entries)
    for e in entries:
        del e["_short_side"]
    splits = {}
    for split in SPLITS:
        shards = [e for e in entries if split_of[e["name"]] == split]
        if shards:
            splits[split] = {"num_samples": sum(e["num_samples"] for e in shards),
                             "shards": shards}
    payload = {
        "format": FORMAT, "source": source.name, "image_size": image_size,
        "image_format": enc.image_format, "classes": list(source.classes),
        "num_classes": len(source.classes), "splits": splits,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "args": args,
        "skipped": skipped,
    }
    _seed_hash_cache(out, entries)
    _fsync_dir(out)  # the shard renames must be durable before dataset.json names them
    atomic_write_text(out / INFO_FILE, json.dumps(payload, indent=1) + "\n")
    _fsync_dir(out)
    return payload

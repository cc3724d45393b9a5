"""`dataset.json`: the description of a shard directory, and its verification.

A shard directory holds ``{split}-%06d.tar`` webdataset shards and one ``dataset.json`` (schema in
docs/architecture.md, "Data contract"; each shard entry also carries ``bytes``, its file size).
`load_dataset_info` reads and checks it before training starts, so that a missing or damaged
shard is reported with its path instead of surfacing as a crash hours into a run.

Hashing a 150 GB ImageNet copy takes minutes, so sha256 results are cached in
``DIR/.sha256-cache.json`` keyed by (size, mtime_ns): a shard is hashed once per change, and
``verify="size"`` skips hashing altogether (existence and byte size only).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaling.results import atomic_write_text

INFO_FILE = "dataset.json"
FORMAT = "vit-scaling-shards/1"
HASH_CACHE_FILE = ".sha256-cache.json"
VERIFY_LEVELS = (True, False, "sha256", "size")


class DataError(ValueError):
    """Bad input data: a missing or damaged dataset, shard, image or label."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard file of a split."""

    name: str
    path: Path
    num_samples: int
    sha256: str
    bytes: int | None = None


@dataclass(frozen=True)
class SplitInfo:
    """The shards of one split and their sample count."""

    name: str
    num_samples: int
    shards: tuple[ShardInfo, ...]

    @property
    def urls(self) -> list[str]:
        """Shard paths as strings (webdataset URLs)."""
        return [str(s.path) for s in self.shards]


@dataclass(frozen=True)
class DatasetInfo:
    """A parsed `dataset.json`: classes, image size and the splits with their shards."""

    root: Path
    source: str
    image_size: int
    image_format: str
    classes: tuple[str, ...]
    splits: dict[str, SplitInfo]
    args: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are 0 .. num_classes - 1)."""
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        """The named split; DataError lists the available ones."""
        if name not in self.splits:
            raise DataError(f"{self.root / INFO_FILE}: no split {name!r}; "
                            f"has {sorted(self.splits)}")
        return self.splits[name]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _parse_split(root: Path, name: str, raw: dict) -> SplitInfo:
    """Build a SplitInfo from its JSON entry; counts must add up."""
    try:
        shards = tuple(
            ShardInfo(s["name"], root / s["name"], int(s["num_samples"]), s["sha256"],
                      s.get("bytes"))
            for s in raw["shards"]
        )
        num_samples = int(raw["num_samples"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{root / INFO_FILE}: split {name!r} is malformed ({e!r})") from e
    total = sum(s.num_samples for s in shards)
    if total != num_samples:
        raise DataError(f"{root / INFO_FILE}: split {name!r} says num_samples={num_samples} "
                        f"but its shards hold {total}")
    return SplitInfo(name, num_samples, shards)


def parse_dataset_info(root: Path, raw: dict) -> DatasetInfo:
    """Build a DatasetInfo from the JSON object of `root/dataset.json`."""
    path = root / INFO_FILE
    if raw.get("format") != FORMAT:
        raise DataError(f"{path}: format={raw.get('format')!r}; expected {FORMAT!r}")
    missing = [k for k in ("source", "image_size", "classes", "splits") if k not in raw]
    if missing:
        raise DataError(f"{path}: missing keys {missing}")
    classes = tuple(str(c) for c in raw["classes"])
    if not classes or raw.get("num_classes", len(classes)) != len(classes):
        raise DataError(f"{path}: num_classes={raw.get('num_classes')!r} does not match "
                        f"{len(classes)} classes")
    splits = {n: _parse_split(root, n, s) for n, s in raw["splits"].items()}
    return DatasetInfo(root=root, source=str(raw["source"]), image_size=int(raw["image_size"]),
                       image_format=str(raw.get("image_format", "")), classes=classes,
                       splits=splits, args=dict(raw.get("args", {})),
                       created=str(raw.get("created", "")))


def _read_cache(root: Path) -> dict:
    """The sha256 cache, or {} when absent or unreadable (it is only a cache)."""
    try:
        return json.loads((root / HASH_CACHE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(root: Path, cache: dict) -> None:
    """Save the sha256 cache atomically; a read-only data dir just goes uncached."""
    try:
        atomic_write_text(root / HASH_CACHE_FILE, json.dumps(cache, indent=1, sort_keys=True))
    except OSError:
        pass


def _cached_sha256(shard: ShardInfo, st: os.stat_result, cache: dict) -> str:
    """sha256 of a shard, reusing the cached value while (size, mtime_ns) are unchanged."""
    entry = cache.get(shard.name)
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return entry["sha256"]
    digest = sha256_file(shard.path)
    cache[shard.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return digest


def verify_shards(info: DatasetInfo, *, level: bool | str = True) -> None:
    """Check that every listed shard exists, has its size and (level True/"sha256") its hash."""
    if level not in VERIFY_LEVELS:
        raise ValueError(f"verify={level!r}; expected one of {VERIFY_LEVELS}")
    if level is False:
        return
    cache = _read_cache(info.root) if level in (True, "sha256") else None
    dirty = False
    for split in info.splits.values():
        for shard in split.shards:
            try:
                st = os.stat(shard.path)
            except FileNotFoundError:
                raise DataError(f"shard {shard.path} listed in {info.root / INFO_FILE} "
                                f"(split {split.name!r}) is missing") from None
            if shard.bytes is not None and st.st_size != shard.bytes:
                raise DataError(f"shard {shard.path} has {st.st_size} bytes; "
                                f"{INFO_FILE} says {shard.bytes}")
            if cache is None:
                continue
            before = cache.get(shard.name)
            digest = _cached_sha256(shard, st, cache)
            dirty |= cache.get(shard.name) is not before
            if digest != shard.sha256:
                raise DataError(f"shard {shard.path}: sha256 mismatch (file {digest[:16]}..., "
                                f"{INFO_FILE} says {shard.sha256[:16]}...)")
    if dirty:
        _write_cache(info.root, cache)


def load_dataset_info(data_dir: str | os.PathLike, *, verify: bool | str = True) -> DatasetInfo:
    """Read and check DIR/dataset.json; raise DataError naming the problem and the path.

    verify: True or "sha256" (existence, size and cached sha256), "size" (existence and size),
    False (parse only).
    """
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data dir {root} does not exist or is not a directory")
    path = root / INFO_FILE
    if not path.is_file():
        what = "is empty" if not any(root.iterdir()) else f"has no {INFO_FILE}"
        raise DataError(f"data dir {root} {what}; create it with "
                        f"`python -m scaling.data.make_shards --out {root} ...`")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    info = parse_dataset_info(root, raw)
    verify_shards(info, level=verify)
    return info

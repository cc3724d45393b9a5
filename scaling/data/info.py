"""`dataset.json`: the description of a shard directory, and its verification.

`load_dataset_info` reads and checks it (shards present, sizes, cached sha256, label ranges)
before training starts, so that a missing or damaged shard is reported with its path instead of
surfacing as a crash hours into a run. Formats 1 and 2 (indexed shards, by URL): docs/data.md,
"Checking a dataset" and "`dataset.json` format 2"; schema in docs/architecture.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaling.data import urls
from scaling.data.errors import DataError  # also re-exported: scaling.data.info.DataError
from scaling.results import atomic_write_text

INFO_FILE = "dataset.json"
FORMAT = "vit-scaling-shards/1"
FORMAT_INDEXED = "vit-scaling-shards/2"  # shards referenced by URL, sample keys (module doc)
FORMATS = (FORMAT, FORMAT_INDEXED)
DEFAULT_IMAGE_KEYS = ("jpg", "jpeg", "png")
DEFAULT_LABEL_KEY = "cls"
HASH_CACHE_FILE = ".sha256-cache.json"
VERIFY_LEVELS = (True, False, "sha256", "size")


@dataclass(frozen=True)
class ShardInfo:
    """One shard file of a split."""

    name: str
    path: Path | str  # a local file, or the URL string of a remote one (format 2)
    num_samples: int
    sha256: str | None
    bytes: int | None = None
    label_min: int | None = None  # the writer's checked label range (absent in older data)
    label_max: int | None = None
    url: str | None = None  # format 2: where the shard is (dataset.json "url")

    @property
    def remote(self) -> bool:
        """Whether the shard is not a local file (pipe:, http(s), fsspec)."""
        return isinstance(self.path, str)

    @property
    def cache_key(self) -> str:
        """Its key in the hash cache: the name of a shard in DIR, else its URL."""
        return self.name if self.url is None else self.url


@dataclass(frozen=True)
class SplitInfo:
    """The shards of one split and their sample count."""

    name: str
    num_samples: int
    shards: tuple[ShardInfo, ...]

    @property
    def urls(self) -> list[str]:
        """Shard paths as strings (webdataset URLs); the loaders key sample counts by them."""
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
    image_keys: tuple[str, ...] = DEFAULT_IMAGE_KEYS  # extensions tried in order
    label_key: str = DEFAULT_LABEL_KEY  # an extension holding an ASCII int, or "json:FIELD"

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are 0 .. num_classes - 1)."""
        return len(self.classes)

    def has_split(self, name: str) -> bool:
        """Whether the split exists and holds samples (e.g. no "val" after --val-fraction 0)."""
        return name in self.splits and self.splits[name].num_samples > 0

    def split(self, name: str) -> SplitInfo:
        """The named split; DataError (a ValueError) lists the available ones."""
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


def _shard_path(root: Path, entry: dict) -> Path | str:
    """Where a shard is: DIR/name, or its "url" (a local path, or the URL string)."""
    url = entry.get("url")
    if url is None:
        return root / entry["name"]
    return Path(urls.local_path(url)) if urls.is_local(url) else str(url)


def _parse_split(root: Path, name: str, raw: dict) -> SplitInfo:
    """Build a SplitInfo from its JSON entry; counts must add up."""
    try:
        shards = tuple(
            ShardInfo(s["name"], _shard_path(root, s), int(s["num_samples"]), s.get("sha256"),
                      s.get("bytes"), _opt_int(s.get("label_min")), _opt_int(s.get("label_max")),
                      s.get("url"))
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


def _opt_int(value: Any) -> int | None:
    """An optional integer field of dataset.json."""
    return None if value is None else int(value)


def _check_labels(path: Path, splits: dict[str, SplitInfo], num_classes: int) -> None:
    """Recorded per-shard label ranges must lie in [0, num_classes): a dataset.json edited to
    fewer classes (or shards from another dataset) fails here, not hours into a run."""
    for split in splits.values():
        for s in split.shards:
            lo, hi = s.label_min, s.label_max
            if (lo is not None and lo < 0) or (hi is not None and hi >= num_classes):
                raise DataError(f"{path}: shard {s.name} (split {split.name!r}) records labels "
                                f"{lo}..{hi}, outside [0, {num_classes}) for {num_classes} "
                                f"classes")


def parse_dataset_info(root: Path, raw: dict) -> DatasetInfo:
    """Build a DatasetInfo from the JSON object of `root/dataset.json`."""
    path = root / INFO_FILE
    if raw.get("format") not in FORMATS:
        raise DataError(f"{path}: format={raw.get('format')!r}; expected one of {FORMATS}")
    missing = [k for k in ("source", "image_size", "classes", "splits") if k not in raw]
    if missing:
        raise DataError(f"{path}: missing keys {missing}")
    classes = tuple(str(c) for c in raw["classes"])
    if not classes or raw.get("num_classes", len(classes)) != len(classes):
        raise DataError(f"{path}: num_classes={raw.get('num_classes')!r} does not match "
                        f"{len(classes)} classes")
    splits = {n: _parse_split(root, n, s) for n, s in raw["splits"].items()}
    _check_labels(path, splits, len(classes))
    keys = raw.get("keys", {})
    image_keys = tuple(str(k) for k in keys.get("image", DEFAULT_IMAGE_KEYS))
    label_key = str(keys.get("label", DEFAULT_LABEL_KEY))
    if not image_keys or not label_key:
        raise DataError(f"{path}: keys={keys!r}; expected image extensions and a label key")
    return DatasetInfo(root=root, source=str(raw["source"]), image_size=int(raw["image_size"]),
                       image_format=str(raw.get("image_format", "")), classes=classes,
                       splits=splits, args=dict(raw.get("args", {})),
                       created=str(raw.get("created", "")), image_keys=image_keys,
                       label_key=label_key)


def read_cache(root: Path) -> dict:
    """The sha256 cache, or {} when absent or unreadable (it is only a cache)."""
    try:
        return json.loads((root / HASH_CACHE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_cache(root: Path, cache: dict) -> None:
    """Save the sha256 cache atomically; a read-only data dir just goes uncached."""
    try:
        atomic_write_text(root / HASH_CACHE_FILE, json.dumps(cache, indent=1, sort_keys=True))
    except OSError:
        pass


def cache_entry(st: os.stat_result, digest: str) -> dict:
    """A hash cache entry: the digest and the stat fields it is valid for (module doc). The
    writer seeds the cache with these, so the two must agree."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
            "ctime_ns": st.st_ctime_ns, "sha256": digest}


def _cached_sha256(shard: ShardInfo, st: os.stat_result, cache: dict) -> str:
    """sha256 of a shard, reusing the cached value while its stat key is unchanged (an entry
    of an older format, without inode and ctime, never matches: one re-hash)."""
    entry = cache.get(shard.cache_key)
    key = {k: v for k, v in cache_entry(st, "").items() if k != "sha256"}
    if entry and "sha256" in entry and all(entry.get(k) == v for k, v in key.items()):
        return entry["sha256"]
    digest = sha256_file(shard.path)
    cache[shard.cache_key] = cache_entry(st, digest)
    return digest


def _missing(info: DatasetInfo, split: SplitInfo, shard: ShardInfo, why: str = "") -> DataError:
    return DataError(f"shard {shard.path} listed in {info.root / INFO_FILE} (split "
                     f"{split.name!r}) is missing{why}")


def _check_size(shard: ShardInfo, size: int | None) -> None:
    if shard.bytes is not None and size is not None and size != shard.bytes:
        raise DataError(f"shard {shard.path} has {size} bytes; {INFO_FILE} says {shard.bytes}")


def _check_digest(shard: ShardInfo, digest: str) -> None:
    if digest != shard.sha256:
        raise DataError(f"shard {shard.path}: sha256 mismatch (file {digest[:16]}..., "
                        f"{INFO_FILE} says {shard.sha256[:16]}...)")


def _verify_remote(info: DatasetInfo, level: bool | str) -> None:
    """Remote shards: size (HEAD, fsspec stat; pipe: has none), and the sha256 of their bytes
    only when level == "sha256" (it downloads them). Queried 16 at a time."""
    from concurrent.futures import ThreadPoolExecutor

    def check(pair: tuple[SplitInfo, ShardInfo]) -> None:
        split, shard = pair
        try:
            _check_size(shard, urls.url_size(shard.path))
        except FileNotFoundError as e:
            raise _missing(info, split, shard, f" ({e})" if str(e) else "") from None
        except OSError as e:
            raise DataError(f"shard {shard.path} (split {split.name!r}): cannot query its size "
                            f"({type(e).__name__}: {e})") from e
        if level == "sha256" and shard.sha256:
            h = hashlib.sha256()
            with urls.open_url(shard.path) as f:
                while block := f.read(1 << 20):
                    h.update(block)
            _check_digest(shard, h.hexdigest())

    remote = [(sp, s) for sp in info.splits.values() for s in sp.shards if s.remote]
    if remote:
        with ThreadPoolExecutor(min(16, len(remote))) as pool:
            list(pool.map(check, remote))


def verify_shards(info: DatasetInfo, *, level: bool | str = True) -> None:
    """Check that every listed shard exists, has its size and (level True/"sha256") its hash:
    local shards with a recorded sha256 are hashed (cached), remote ones by size unless
    level == "sha256" (module doc)."""
    if level not in VERIFY_LEVELS:
        raise ValueError(f"verify={level!r}; expected one of {VERIFY_LEVELS}")
    if level is False:
        return
    cache = read_cache(info.root) if level in (True, "sha256") else None
    dirty = False
    for split in info.splits.values():
        for shard in (s for s in split.shards if not s.remote):
            try:
                st = os.stat(shard.path)
            except FileNotFoundError:
                raise _missing(info, split, shard) from None
            _check_size(shard, st.st_size)
            if cache is None or shard.sha256 is None:
                continue
            before = cache.get(shard.cache_key)
            _check_digest(shard, _cached_sha256(shard, st, cache))
            dirty |= cache.get(shard.cache_key) is not before
    if dirty:
        write_cache(info.root, cache)
    _verify_remote(info, level)


def load_dataset_info(data_dir: str | os.PathLike, *, verify: bool | str = True) -> DatasetInfo:
    """Read and check DIR/dataset.json; raise DataError naming the problem and the path.

    verify: True (existence, size and cached sha256 of local shards; remote ones by size),
    "sha256" (remote shards hashed too: a download), "size" (existence and size), False
    (parse only).
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

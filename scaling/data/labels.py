"""Every label in range before training starts, for data whose dataset.json records no ranges.

Shards written before `label_min` / `label_max` existed were never checked; `check_labels` reads
such shards' labels up front (caching each shard's range beside the sha256 entries) instead of
letting an out-of-range label stop a run minutes in. docs/data.md, "Making shards".
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor

from scaling.data.errors import DataError
from scaling.data.info import (
    INFO_FILE,
    DatasetInfo,
    ShardInfo,
    cache_entry,
    read_cache,
    write_cache,
)
from scaling.data.samples import parse_label, raw_label
from scaling.data.shardread import describe, raw_samples

CACHE_PREFIX = "labels:"  # hash-cache key of a shard's scanned label range


def shard_label_range(path: str, label_key: str) -> tuple[int | None, int | None]:
    """(smallest, largest) class index among a shard's samples; samples whose label is missing
    or not an integer are ignored here (the loaders skip and count them)."""
    lo = hi = None
    try:
        for sample in raw_samples(path):
            try:
                label = parse_label(raw_label(sample, label_key))
            except (TypeError, ValueError):
                continue
            lo, hi = (label, label) if lo is None else (min(lo, label), max(hi, label))
    except Exception as e:  # a tar error: name the shard
        raise DataError(f"unreadable shard: {path}: {describe(e)}") from e
    return lo, hi


def _unrecorded(info: DatasetInfo) -> list[tuple[str, ShardInfo]]:
    """(split, shard) of the shards in DIR that record no label range (format 1, older)."""
    return [(split.name, s) for split in info.splits.values() for s in split.shards
            if s.url is None and (s.label_min is None or s.label_max is None)]


def check_labels(info: DatasetInfo) -> None:
    """DataError naming the shard and the label when any label of the dataset lies outside
    [0, num_classes): recorded ranges were checked when dataset.json was parsed; shards that
    record none are scanned here (cached per shard; module doc). Training's up-front check."""
    todo = _unrecorded(info)
    if not todo:
        return
    cache, found, scan = read_cache(info.root), {}, []
    for _, shard in todo:
        st = os.stat(shard.path)
        key = {k: v for k, v in cache_entry(st, "").items() if k != "sha256"}
        entry = cache.get(CACHE_PREFIX + shard.name) or {}
        if all(entry.get(k) == v for k, v in key.items()) and "label_max" in entry:
            found[shard.name] = (entry["label_min"], entry["label_max"])
        else:
            scan.append((shard, key))
    if scan:
        print(f"{info.root / INFO_FILE} records no label ranges (written by an older "
              f"make_shards): reading the labels of {len(scan)} shards once", file=sys.stderr,
              flush=True)
        with ProcessPoolExecutor(max(1, min(8, os.cpu_count() or 1, len(scan)))) as pool:
            ranges = pool.map(shard_label_range, [str(s.path) for s, _ in scan],
                              [info.label_key] * len(scan))
            for (shard, key), (lo, hi) in zip(scan, ranges):
                found[shard.name] = (lo, hi)
                cache[CACHE_PREFIX + shard.name] = {**key, "label_min": lo, "label_max": hi}
        write_cache(info.root, cache)
    for split, shard in todo:
        lo, hi = found[shard.name]
        bad = lo if lo is not None and lo < 0 else hi
        if bad is not None and not 0 <= bad < info.num_classes:
            raise DataError(f"{info.root / INFO_FILE}: shard {shard.name} (split {split!r}) "
                            f"holds label {bad}, outside [0, {info.num_classes}) for "
                            f"{info.num_classes} classes (labels {lo}..{hi})")

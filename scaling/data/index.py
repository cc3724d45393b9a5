"""Index existing webdataset shards where they are: `make_shards --from webdataset`.

Nothing is copied: dataset.json (format 2, info.py) lists each shard by URL (urls.py) with its
sample count and the members that hold image and label. Counts come from a scan of every shard or
an index file (indexfiles.py); the first samples are read first, so a wrong key is said at once.
docs/data.md, "Bringing existing datasets".
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from PIL import Image

from scaling.data import urls as urlmod
from scaling.data.indexfiles import basename, index_counts
from scaling.data.info import FORMAT_INDEXED, DataError, cache_entry
from scaling.data.samples import JSON_PREFIX, image_bytes, parse_label, raw_label
from scaling.data.shardread import describe, raw_samples

SIDES_PER_SHARD = 2  # images per shard whose size is read (header only) for image_size
PROBE_SAMPLES = 16  # samples read from the first shard when there is no scan
PROGRESS_EVERY_S = 2.0


@dataclass(frozen=True)
class SampleKeys:
    """Which members of a sample hold the image (first present wins) and the label."""

    image: tuple[str, ...]
    label: str


def parse_keys(image_key: str, label_key: str) -> SampleKeys:
    """--image-key "jpg;png" and --label-key "cls" | "json:FIELD", checked."""
    image = tuple(k.strip().lower().lstrip(".") for k in image_key.replace(",", ";").split(";")
                  if k.strip())
    label = label_key.strip()
    if not image or not label.removeprefix(JSON_PREFIX) or any(c.isspace() for c in label):
        raise ValueError(f"--image-key {image_key!r} --label-key {label_key!r}; expected e.g. "
                         "'jpg;png' and 'cls' or 'json:FIELD'")
    return SampleKeys(image, label)


def read_classes(path: str) -> tuple[str, ...]:
    """Class names from a file: a JSON list, or one name per line (label = line number)."""
    try:
        text = Path(path).expanduser().read_text()
    except OSError as e:
        raise DataError(f"--classes {path}: {e.strerror or e}") from e
    try:
        names = json.loads(text)
    except ValueError:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(names, list) or not names:
        raise DataError(f"--classes {path}: expected a JSON list or one class name per line")
    return tuple(str(n) for n in names)


# ---- scanning ----------------------------------------------------------------------------------

class _Hashing:
    """A read stream that hashes and counts what passes, and reads to the end on close (a tar
    reader stops at the end-of-archive blocks; the hash covers the whole file)."""

    def __init__(self, inner: IO[bytes]):
        self.inner, self.sha, self.bytes = inner, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def close(self) -> None:
        while self.read(1 << 20):
            pass
        self.inner.close()


def _short_side(data: bytes | None) -> int | None:
    """The shorter side of an encoded image (header only); None when it does not open."""
    try:
        return min(Image.open(io.BytesIO(data)).size) if data else None
    except (OSError, ValueError, SyntaxError):
        return None


def _new_summary(url: str) -> dict:
    return {"url": url, "num_samples": 0, "labels": set(), "formats": Counter(), "sides": [],
            "missing_image": 0, "missing_label": 0, "keys_seen": set()}


def _add_sample(out: dict, sample: dict, keys: SampleKeys, sides: int) -> None:
    """Account one raw sample in a shard summary."""
    out["num_samples"] += 1
    if len(out["keys_seen"]) < 32:
        out["keys_seen"].update(k for k in sample if not k.startswith("__"))
    fmt = next((k for k in keys.image if k in sample), None)
    if fmt is None:
        out["missing_image"] += 1
    else:
        out["formats"][fmt] += 1
        if len(out["sides"]) < sides and (side := _short_side(image_bytes(sample, (fmt,)))):
            out["sides"].append(side)
    try:
        out["labels"].add(parse_label(raw_label(sample, keys.label)))
    except (TypeError, ValueError):
        out["missing_label"] += 1


def _scan_once(url: str, keys: SampleKeys) -> dict:
    out, holder = _new_summary(url), []

    def wrap(stream):
        holder.append(_Hashing(stream))
        return holder[0]

    for sample in raw_samples(url, wrap):
        _add_sample(out, sample, keys, SIDES_PER_SHARD)
    out.update(bytes=holder[0].bytes, sha256=holder[0].sha.hexdigest())
    return out


def _reading(what: str, fn, url: str):
    """fn() reading shard URL, retried where that can help (urls.with_retries); its errors a
    DataError naming the shard and saying what failed."""
    try:
        return urlmod.with_retries(what, fn, url)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"unreadable shard: {url}: {describe(e)}") from e


def scan_shard(url: str, keys: SampleKeys) -> dict:
    """Read one shard to its end: count, labels, image formats, a few image sizes, sha256 and
    byte count (runs in a pool worker); retried for remote URLs (urls.with_retries)."""
    return _reading("scan", lambda: _scan_once(url, keys), url)


def _probe_once(url: str, keys: SampleKeys) -> dict:
    out = _new_summary(url)
    samples = raw_samples(url)
    try:
        for sample, _ in zip(samples, range(PROBE_SAMPLES)):
            _add_sample(out, sample, keys, PROBE_SAMPLES)
    finally:
        samples.close()
    return out


def probe_shard(url: str, keys: SampleKeys) -> dict:
    """The first PROBE_SAMPLES samples of a shard (formats, image sizes, members seen)."""
    return _reading("probe", lambda: _probe_once(url, keys), url)


def check_keys(summary: dict, keys: SampleKeys, *, probed: bool = False) -> None:
    """DataError when no sample of a shard summary has the label, or an image: the keys are
    wrong (a probe: said before a scan of the whole split)."""
    n = summary["num_samples"]
    some = f"none of the first {n} samples has" if probed else "no sample has"
    seen = f"(members seen: {sorted(summary['keys_seen'])})"
    if n and summary["missing_label"] == n:
        raise DataError(f"shard {summary['url']}: {some} a label {keys.label!r} {seen}; pass "
                        "--label-key")
    if n and summary["missing_image"] == n:
        raise DataError(f"shard {summary['url']}: {some} an image among {keys.image} {seen}; "
                        "pass --image-key")


def scan_all(urls: list[str], keys: SampleKeys, workers: int, what: str) -> list[dict]:
    """scan_shard over all URLs in a process pool, in order, with progress on stderr."""
    results: dict[str, dict] = {}
    start = last = time.monotonic()
    with ProcessPoolExecutor(max(1, min(workers, len(urls)))) as pool:
        futures = {pool.submit(scan_shard, u, keys): u for u in urls}
        for fut in as_completed(futures):
            try:
                results[futures[fut]] = fut.result()
            except BaseException:
                pool.shutdown(cancel_futures=True)  # report the first bad shard now
                raise
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_S or len(results) == len(urls):
                last = now
                done = list(results.values())
                mb = sum(r["bytes"] for r in done) / 1e6
                print(f"make_shards: scanned {what} {len(done)}/{len(urls)} shards, "
                      f"{sum(r['num_samples'] for r in done)} samples, {mb:.0f} MB, "
                      f"{mb / max(now - start, 1e-9):.0f} MB/s", file=sys.stderr, flush=True)
    return [results[u] for u in urls]


# ---- the index ---------------------------------------------------------------------------------

def _split_urls(src: str, val_src: str | None, val_fraction: float,
                seed: int) -> dict[str, list[str]]:
    """URLs per split; without val_src whole shards are held out (seeded), at least one."""
    import numpy as np

    train = urlmod.expand(src)
    if val_src:
        val = urlmod.expand(val_src)
        if set(val) & set(train):
            raise DataError("--src and --val-src share shards")
        return {"train": train, "val": val}
    if val_fraction == 0:
        return {"train": train}
    if len(train) < 2:
        raise DataError(f"--src {src!r} is one shard: it cannot be split into train and val "
                        "shards; give --val-src, or --val-fraction 0 (no val split: training "
                        "refuses that)")
    n_val = min(len(train) - 1, max(1, round(len(train) * val_fraction)))
    held = set(np.random.default_rng(seed).permutation(len(train))[:n_val].tolist())
    return {"train": [u for i, u in enumerate(train) if i not in held],
            "val": [u for i, u in enumerate(train) if i in held]}


def _check_summaries(split: str, sums: list[dict], keys: SampleKeys,
                     classes: tuple[str, ...] | None, counts: dict) -> None:
    """Labels present and in range; counts equal to those of an index file."""
    for s in sums:
        check_keys(s, keys)
        bad = [x for x in s["labels"] if x < 0 or (classes and x >= len(classes))]
        if bad:
            raise DataError(f"shard {s['url']} (split {split!r}): labels {sorted(bad)[:5]} "
                            f"outside [0, {len(classes) if classes else 'inf'})")
        if s["url"] in counts and counts[s["url"]][0] != s["num_samples"]:
            n, name = counts[s["url"]]
            raise DataError(f"shard {s['url']}: {name} says {n} samples, the scan counted "
                            f"{s['num_samples']} (a stale index file?)")


def _entry(s: dict) -> dict:
    labels = s.get("labels") or None
    return {"name": basename(s["url"]), "url": s["url"], "num_samples": s["num_samples"],
            "bytes": s.get("bytes"), "sha256": s.get("sha256"),
            "label_min": min(labels) if labels else None,
            "label_max": max(labels) if labels else None}


def _summaries(urls: list[str], keys: SampleKeys, counts: dict, scan: bool, workers: int,
               split: str) -> list[dict]:
    """Per-shard summaries: scanned, or counted by the index (the first shard probed)."""
    if scan:
        return scan_all(urls, keys, workers, split)
    sums = [{**_new_summary(u), "num_samples": counts[u][0], "labels": set()} for u in urls]
    probe = probe_shard(urls[0], keys)
    sums[0].update({k: probe[k] for k in ("formats", "sides", "keys_seen")})
    for what in ("missing_image", "missing_label"):  # the checks of _check_summaries
        if probe[what] == probe["num_samples"] > 0:
            sums[0][what] = sums[0]["num_samples"]
    with ThreadPoolExecutor(16) as pool:  # sizes for verification (None for pipe:)
        for s, size in zip(sums, pool.map(_size_or_none, urls)):
            s["bytes"] = size
    return sums


def _size_or_none(url: str) -> int | None:
    try:
        return urlmod.url_size(url)
    except OSError as e:
        raise DataError(f"shard {url}: {type(e).__name__}: {e}") from e


def build_index(args: dict, keys: SampleKeys, workers: int) -> tuple[dict, dict]:
    """(dataset.json payload, hash cache entries of scanned local shards) for validated args."""
    split_urls = _split_urls(args["src"], args["val_src"], args["val_fraction"], args["seed"])
    classes = read_classes(args["classes_file"]) if args["classes_file"] else None
    check_keys(probe_shard(split_urls["train"][0], keys), keys, probed=True)  # before a scan
    all_urls = [u for us in split_urls.values() for u in us]
    counts = {} if args["scan"] else index_counts(all_urls)
    scan = args["scan"] or classes is None or any(u not in counts for u in all_urls)
    per_split = {}
    for split, us in split_urls.items():
        sums = _summaries(us, keys, counts, scan, workers, split)
        _check_summaries(split, sums, keys, classes, counts)
        per_split[split] = sums
    return _payload(args, keys, per_split, classes, scan, counts), _cache(per_split, scan)


def _payload(args: dict, keys: SampleKeys, per_split: dict, classes, scan: bool,
             counts: dict) -> dict:
    sums = [s for ss in per_split.values() for s in ss]
    seen = set().union(*(s["labels"] for s in sums))
    classes = classes or tuple(str(i) for i in range(max(seen) + 1))
    formats = sum((s["formats"] for s in sums), Counter())
    sides = [x for s in sums for x in s["sides"]]
    if not sides:
        raise DataError(f"no readable image among the sampled shards ({args['src']})")
    size = args["image_size"] or int(statistics.median(sides))
    splits = {name: {"num_samples": sum(s["num_samples"] for s in ss),
                     "shards": [_entry(s) for s in ss if s["num_samples"]]}
              for name, ss in per_split.items()}
    by = Counter("scan" if scan else counts[s["url"]][1] for s in sums)
    index = {"counts_from": dict(by), "image_formats": dict(formats),
             "image_size_sample": {"n": len(sides), "min": min(sides),
                                   "median": statistics.median(sides), "max": max(sides)},
             "missing_image": sum(s["missing_image"] for s in sums),
             "missing_label": sum(s["missing_label"] for s in sums),
             "classes_seen": len(seen) if scan else None,
             "empty_shards": [s["url"] for s in sums if not s["num_samples"]]}
    return {"format": FORMAT_INDEXED, "source": "webdataset", "image_size": size,
            "image_format": formats.most_common(1)[0][0] if formats else "",
            "classes": list(classes), "num_classes": len(classes),
            "keys": {"image": list(keys.image), "label": keys.label}, "splits": splits,
            "index": index, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "args": args}


def _cache(per_split: dict, scan: bool) -> dict[str, Any]:
    """Hash cache entries for scanned local shards (their first verification is then free)."""
    if not scan:
        return {}
    out = {}
    for s in (s for ss in per_split.values() for s in ss):
        if urlmod.is_local(s["url"]):
            out[s["url"]] = cache_entry(os.stat(urlmod.local_path(s["url"])), s["sha256"])
    return out

"""Sample counts of existing webdataset shards from the index files beside them, when there
are any (`make_shards --from webdataset` then need not read every shard to count it).

Conventions read: webdataset's wids `shardindex.json`, timm's `_info.json`, open_clip's /
LAION's `sizes.json`, img2dataset's `NAME_stats.json`. Formats: docs/data.md, "Counts: scan or
index file".
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from scaling.data import urls as urlmod

INDEX_FILES = ("shardindex.json", "_info.json", "sizes.json")


def basename(url: str) -> str:
    """The file name a URL ends with (for pipe:, the last word of the command)."""
    return url.rstrip().split()[-1].rsplit("/", 1)[-1]


def _parse_index(name: str, raw: bytes) -> dict[str, int]:
    """basename -> count from one index file (module doc); {} when it is not one."""
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    if name == "shardindex.json" and isinstance(data.get("shardlist"), list):
        return {basename(s["url"]): int(s["nsamples"]) for s in data["shardlist"]
                if isinstance(s, dict) and "url" in s and "nsamples" in s}
    if name == "_info.json" and isinstance(data.get("splits"), dict):
        out = {}
        for split in data["splits"].values():
            if isinstance(split, dict):
                out.update({basename(f): int(n) for f, n in
                            zip(split.get("filenames", ()), split.get("shard_lengths", ()))})
        return out
    if name == "sizes.json":
        return {str(k): int(v) for k, v in data.items() if isinstance(v, (int, str))
                and str(v).isdigit()}
    return {}


def _stats_count(url: str) -> int | None:
    """img2dataset's NAME_stats.json `successes` next to a shard, if there."""
    stem = basename(url).rsplit(".", 1)[0]
    where = urlmod.sibling(url, f"{stem}_stats.json")
    raw = urlmod.read_optional(where) if where else None
    try:
        return int(json.loads(raw)["successes"]) if raw else None
    except (ValueError, KeyError, TypeError):
        return None


def index_counts(urls: list[str]) -> dict[str, tuple[int, str]]:
    """url -> (count, index file name) for the shards that an index file covers."""
    found: dict[str, tuple[int, str]] = {}
    dirs: dict[str, list[str]] = {}
    for url in urls:
        if urlmod.sibling(url, "") is not None:
            dirs.setdefault(urlmod.sibling(url, ""), []).append(url)
    for base, members in dirs.items():
        for name in INDEX_FILES:
            raw = urlmod.read_optional(base + name)
            counts = _parse_index(name, raw) if raw else {}
            for url in members:
                if url not in found and basename(url) in counts:
                    found[url] = (counts[basename(url)], name)
    rest = [u for u in urls if u not in found and urlmod.sibling(u, "") is not None]
    with ThreadPoolExecutor(16) as pool:
        for url, n in zip(rest, pool.map(_stats_count, rest)):
            if n is not None:
                found[url] = (n, "_stats.json")
    return found

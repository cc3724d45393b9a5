"""The parsed-metrics cache: what analysis.load.metrics_file made of each metrics.jsonl (eval
rows, skipped lines, largest flops_seen), one Parquet file per results dir, so that a re-plot
parses only the files that changed. Never stale, written atomically, rebuilt when unreadable:
the rules are in analysis/README.md ("Speed: the cache").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.load import checks, metrics_file
from scaling import results

log = logging.getLogger("analysis")

CACHE_DIR = ".analysis-cache"  # under --out, by default (analysis/plot_scaling.py)
GITIGNORE = "*\n"
META_KEY = b"analysis_metrics_cache"
RACY_S = 2.0
STALE_TMP_S = 3600.0
FORMAT = 2  # of an entry; 2: max_flops added. A cache of another format is not used.


def _rules_version() -> str:
    """A hash of the sources of the rules a cached entry was made by."""
    h = hashlib.sha256(b"format %d" % FORMAT)
    for module in (checks, metrics_file):
        h.update(Path(module.__file__).read_bytes())
    h.update(repr((results.TRAIN_KEYS, results.TRAIN_OPTIONAL, results.EVAL_KEYS,
                   results.EVAL_OPTIONAL)).encode())
    return h.hexdigest()[:16]


RULES_VERSION = _rules_version()


def _well_formed(entry, n_rows: int) -> bool:
    """Whether a stored entry has the shape _table writes (one that does not is a miss)."""
    try:
        return (isinstance(entry["path"], str) and len(entry["key"]) == 5
                and all(type(k) is int for k in entry["key"])
                and all(type(i) is int and type(r) is str for i, r in entry["skips"])
                and type(entry["max_flops"]) in (int, float)
                and type(entry["start"]) is int and type(entry["n"]) is int
                and 0 <= entry["start"] and entry["start"] + entry["n"] <= n_rows)
    except (TypeError, KeyError, ValueError):
        return False


def file_key(st: os.stat_result) -> list[int]:
    """What identifies one version of a file: size, mtime_ns, ctime_ns, inode, device."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def cache_path(cache_dir, results_dir) -> Path:
    """CACHE_DIR/metrics-<hash>.parquet for this results dir."""
    root = str(Path(results_dir).resolve())
    return Path(cache_dir) / f"metrics-{hashlib.sha256(root.encode()).hexdigest()[:12]}.parquet"


class MetricsCache:
    """The entries of one results dir: get() a file's rows if its key is unchanged, put() new
    ones, save() when anything changed (only the files seen since opening are kept)."""

    def __init__(self, cache_dir, results_dir):
        self.path = cache_path(cache_dir, results_dir)
        self.root = str(Path(results_dir).resolve())
        self.old: dict[str, dict] = {}
        self.new: dict[str, dict] = {}
        self.rows: dict[str, np.ndarray] = {}
        self.values = np.empty((0, len(metrics_file.EVAL_FIELDS)))
        self.hits = self.parsed = 0
        self.changed = False
        if self.path.exists():
            try:
                self._read()
            except Exception as e:  # noqa: BLE001 (a cache that cannot be read is rebuilt)
                log.info("ignoring the metrics cache %s (%s); it is rebuilt", self.path, e)
                self.old = {}

    def _read(self) -> None:
        table = pq.read_table(self.path)
        meta = json.loads(table.schema.metadata[META_KEY])
        if meta["version"] != RULES_VERSION or meta["root"] != self.root:
            raise ValueError("written by other rules or for another results dir")
        if table.column_names != ["file", *metrics_file.EVAL_FIELDS]:
            raise ValueError(f"unexpected columns {table.column_names}")
        entries = {e["path"]: e for e in meta["files"] if _well_formed(e, table.num_rows)}
        self.values = np.column_stack([table[c].to_numpy() for c in metrics_file.EVAL_FIELDS]
                                      ).astype(float).reshape(table.num_rows, -1)
        self.old = entries

    def has(self, rel: str, st: os.stat_result) -> bool:
        """Whether get() would serve `rel` (nothing is counted or kept)."""
        entry = self.old.get(rel)
        return entry is not None and entry["key"] == file_key(st)

    def get(self, rel: str, st: os.stat_result) -> metrics_file.Parsed | None:
        """What parsing `rel` gave, if it was stored with the key `st` gives, else None."""
        entry = self.old.get(rel)
        if entry is None or entry["key"] != file_key(st):
            return None
        rows = self.values[entry["start"]:entry["start"] + entry["n"]]
        self.new[rel], self.rows[rel] = entry, rows
        self.hits += 1
        return metrics_file.Parsed(rows, [tuple(s) for s in entry["skips"]], entry["max_flops"])

    def put(self, rel: str, before: os.stat_result, after: os.stat_result, read_ns: int,
            parsed: metrics_file.Parsed) -> None:
        """Store a freshly parsed file, unless it changed while it was read or changed so
        recently (mtime or ctime within RACY_S of the read) that it may change unseen."""
        self.parsed += 1
        self.changed = True
        recent = max(after.st_mtime_ns, after.st_ctime_ns) > read_ns - RACY_S * 1e9
        if file_key(before) != file_key(after) or recent:
            return
        self.new[rel] = {"path": rel, "key": file_key(after),
                         "skips": [list(s) for s in parsed.skips], "max_flops": parsed.max_flops}
        self.rows[rel] = parsed.rows

    def save(self) -> None:
        """Write the entries seen since opening (atomically) when anything changed."""
        if not self.changed and set(self.new) == set(self.old):
            return
        try:
            self._write()
        except OSError as e:
            log.warning("could not write the metrics cache %s: %s", self.path, e)

    def _table(self) -> pa.Table:
        """The rows of every entry, and the entries in the metadata."""
        names = sorted(self.new)
        counts = [len(self.rows[rel]) for rel in names]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int) if names else []
        files = [{**self.new[rel], "start": int(s), "n": n}
                 for rel, s, n in zip(names, starts, counts)]
        width = len(metrics_file.EVAL_FIELDS)
        values = np.vstack([self.rows[rel] for rel in names] or [np.empty((0, width))])
        columns = {"file": np.repeat(np.arange(len(names), dtype=np.int32), counts)}
        columns.update({c: values[:, j] for j, c in enumerate(metrics_file.EVAL_FIELDS)})
        meta = {"version": RULES_VERSION, "root": self.root, "files": files}
        return pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(meta)})

    def _write(self) -> None:
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / ".gitignore").exists():
            (folder / ".gitignore").write_text(GITIGNORE)
        table = self._table()
        with results.atomic_open(self.path, "wb") as f:
            pq.write_table(table, f, compression="zstd")
        for old in folder.glob(f".{self.path.name}.tmp*"):  # of killed writes
            try:
                if old.stat().st_mtime < time.time() - STALE_TMP_S:
                    old.unlink()
            except OSError:
                pass

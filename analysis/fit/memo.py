"""Remembered results of the deterministic fits (analysis.fit.law), so that a re-plot whose
frontier did not change, and the ViT paper's fixed table, skip their bootstrap refits.

Keys, file format, misses and expiry (MAX_AGE_DAYS): analysis/README.md ("Speed: the cache,
worker processes, remembered fits").
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import scipy

from analysis.fit import law as F
from scaling.results import atomic_write_text

log = logging.getLogger("analysis")
MAX_AGE_DAYS = 30
_VERSION = hashlib.sha256(Path(F.__file__).read_bytes() + np.__version__.encode()
                          + scipy.__version__.encode()).hexdigest()[:16]


def _encode(v):
    """JSON form of a fit result: arrays and tuples tagged, so they come back as they were."""
    if isinstance(v, np.ndarray):
        return {"__array__": v.tolist(), "dtype": str(v.dtype)}
    if isinstance(v, tuple):
        return {"__tuple__": [_encode(x) for x in v]}
    if isinstance(v, dict):
        return {k: _encode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_encode(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _decode(v):
    if isinstance(v, dict):
        if "__array__" in v:
            return np.array(v["__array__"], dtype=v["dtype"])
        if "__tuple__" in v:
            return tuple(_decode(x) for x in v["__tuple__"])
        return {k: _decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


def _digest(value) -> str:
    """A hash of a stored value's JSON text (what makes a hand-edited or foreign file a miss)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _load(path: Path, key: str):
    """The result stored in `path` under `key`; ValueError if the file is not such a record."""
    record = json.loads(path.read_text())
    if (not isinstance(record, dict) or set(record) != {"key", "digest", "value"}
            or record["key"] != key or record["digest"] != _digest(record["value"])):
        raise ValueError("not a stored fit of this key")
    return _decode(record["value"])


@functools.cache
def _source(module: str) -> str:
    """A digest of the source file of the module a memoised function lives in: editing it
    (e.g. analysis.fit.parametric) makes every stored fit of its functions a miss."""
    return hashlib.sha256(Path(sys.modules[module].__file__).read_bytes()).hexdigest()[:16]


def _key(fn, args, kwargs) -> str:
    h = hashlib.sha256(f"{_VERSION}:{_source(fn.__module__)}:{fn.__module__}."
                       f"{fn.__qualname__}".encode())
    for a in args:
        h.update(np.asarray(a, dtype=float).tobytes() + b"|")
    h.update(json.dumps(kwargs, sort_keys=True).encode())
    return h.hexdigest()[:24]


class FitMemo:
    """memo(fn, *arrays, **options): fn's result, from CACHE_DIR/fits when stored."""

    def __init__(self, cache_dir):
        self.folder = Path(cache_dir) / "fits"
        self.hits = self.computed = 0

    def __call__(self, fn, *args, **kwargs):
        key = _key(fn, args, kwargs)
        path = self.folder / f"{key}.json"
        if path.exists():
            try:
                out = _load(path, key)
                os.utime(path)  # used: not pruned
                self.hits += 1
                return out
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.info("recomputing the fit stored in %s (%s)", path, e)
        out = fn(*args, **kwargs)
        self.computed += 1
        self._store(path, key, out)
        return out

    def _store(self, path: Path, key: str, out) -> None:
        value = _encode(out)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"key": key, "digest": _digest(value),
                                                "value": value}))
            cutoff = time.time() - MAX_AGE_DAYS * 86400
            for old in self.folder.iterdir():
                if old.stat().st_mtime < cutoff:
                    old.unlink()
        except OSError as e:
            log.warning("could not store a fit in %s: %s", self.folder, e)


def plain(fn, *args, **kwargs):
    """No memo: call fn."""
    return fn(*args, **kwargs)

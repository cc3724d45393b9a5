"""Parquet image datasets (the Hugging Face hub's layout) as a `make_shards` source.

Rows are converted to shards (bytes kept when they need no re-encoding), so training reuses the
shard loaders. Reading a row costs reading its row group, so training rows are shuffled within
windows of row groups and each worker caches its last few row groups.
Layout, flags and measurements: docs/data.md, "Parquet (Hugging Face hub layout)".
"""

from __future__ import annotations

import json
from collections import OrderedDict
from functools import partial
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from scaling.data import urls
from scaling.data.errors import DataError, UnreadableImage
from scaling.data.sources import load_bytes
from scaling.data.writer import Source

_CACHE: OrderedDict = OrderedDict()  # (path, row group) -> image bytes, per process


def _labels(path: str, label_col: str) -> tuple[list[int], list[int]]:
    """(rows per row group, labels) of one file, the label column only."""
    try:
        pf = pq.ParquetFile(path)
        if label_col not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column {label_col!r} (has {pf.schema_arrow.names}); "
                            "pass --label-key")
        labels = pf.read(columns=[label_col]).column(0).to_pylist()
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    groups = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
    bad = [x for x in labels if not isinstance(x, int) or x < 0]
    if bad:
        raise DataError(f"{path}: {len(bad)} labels in {label_col!r} are not class indices "
                        f"(e.g. {bad[0]!r}; -1 marks an unlabelled split)")
    return groups, labels


def hub_class_names(path: str, label_col: str) -> tuple[str, ...] | None:
    """ClassLabel names from the `huggingface` schema metadata of a hub parquet file."""
    meta = pq.ParquetFile(path).schema_arrow.metadata or {}
    try:
        info = json.loads(meta[b"huggingface"])
        names = info["info"]["features"][label_col]["names"]
    except (KeyError, ValueError, TypeError):
        return None
    return tuple(str(n) for n in names) if names else None


def _rows(files: list[str], label_col: str) -> list[list[tuple]]:
    """Per row group: its items (path, group, row in group, label)."""
    groups = []
    for path in files:
        sizes, labels = _labels(path, label_col)
        start = 0
        for g, n in enumerate(sizes):
            groups.append([(path, g, r, labels[start + r]) for r in range(n)])
            start += n
    return groups


def _window_shuffle(groups: list[list[tuple]], window: int, seed: int) -> list[tuple]:
    """Row groups in seeded order, rows shuffled inside windows of >= `window` rows."""
    rng = np.random.default_rng(seed)
    out, pending = [], []
    for g in rng.permutation(len(groups)):
        pending += groups[g]
        if len(pending) >= window:
            out += [pending[i] for i in rng.permutation(len(pending))]
            pending = []
    return out + [pending[i] for i in rng.permutation(len(pending))]


def _group_images(path: str, group: int, image_col: str, cache_size: int) -> list:
    """The image column of one row group (cached per process, least recently used out)."""
    key = (path, group)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    table = pq.ParquetFile(path).read_row_group(group, columns=[image_col])
    values = table.column(0).to_pylist()
    _CACHE[key] = values
    while len(_CACHE) > cache_size:
        _CACHE.popitem(last=False)
    return values


def load_row(item: tuple, *, image_col: str, image_format: str, max_size: int,
             cache_size: int) -> tuple[Any, int]:
    """(path, group, row, label) -> (image, label), as `sources.load_file` for a file."""
    path, group, row, label = item
    value = _group_images(path, group, image_col, cache_size)[row]
    data = value.get("bytes") if isinstance(value, dict) else value
    where = f"{path} row group {group} row {row}"
    if not data:
        raise UnreadableImage(f"{where}: no image bytes in column {image_col!r}")
    return load_bytes(data, where, image_format=image_format, max_size=max_size), int(label)


def _first_format(groups: list[list[tuple]], image_col: str) -> str:
    """"png" when the first stored image is a PNG, else "jpg" (the default --format)."""
    path, group, row, _ = groups[0][0]
    value = pq.ParquetFile(path).read_row_group(group, columns=[image_col]).column(0)[row]
    value = value.as_py()
    data = (value.get("bytes") if isinstance(value, dict) else value) or b""
    return "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpg"


def _check_columns(path: str, image_col: str) -> None:
    names = pq.ParquetFile(path).schema_arrow.names
    if image_col not in names:
        raise DataError(f"{path}: no column {image_col!r} (has {names}); pass --image-key")


def parquet_source(src: str, *, val_src: str | None, val_fraction: float, seed: int,
                   image_col: str, label_col: str, classes: tuple[str, ...] | None,
                   image_format: str | None, image_size: int,
                   shard_size: int) -> tuple[Source, str]:
    """(the Source of parquet files (module doc), the stored format: --format, else that of
    the first image); val from `val_src` or a seeded split of rows."""
    train_files = [urls.local_path(u) for u in urls.expand(src)]
    val_files = [urls.local_path(u) for u in urls.expand(val_src)] if val_src else []
    for path in train_files + val_files:
        _check_columns(path, image_col)
    train_groups, val_groups = _rows(train_files, label_col), _rows(val_files, label_col)
    if not any(train_groups):
        raise DataError(f"--src {src!r}: no rows")
    classes = classes or hub_class_names(train_files[0], label_col) or tuple(
        str(i) for i in range(max(x[3] for g in train_groups for x in g) + 1))
    unknown = sorted({x[3] for g in val_groups for x in g if x[3] >= len(classes)})
    if unknown:  # as an ImageFolder val folder that is no training class
        raise DataError(f"--val-src {val_src!r}: labels {unknown[:5]} in {label_col!r} are not "
                        f"training classes (0..{len(classes) - 1}); pass --classes naming all "
                        "classes")
    if not val_src and val_fraction > 0:  # a seeded split of rows; val read in file order
        rows = [x for g in train_groups for x in g]
        order = np.random.default_rng(seed).permutation(len(rows))
        held = {rows[i] for i in order[:round(len(rows) * val_fraction)].tolist()}
        val_groups = [[x for g in train_groups for x in g if x in held]]
        train_groups = [[x for x in g if x not in held] for g in train_groups]
    train = _window_shuffle(train_groups, shard_size, seed)
    window_groups = max(1, -(-shard_size // min(len(g) for g in train_groups if g)))
    fmt = image_format or _first_format(train_groups, image_col)
    load = partial(load_row, image_col=image_col, image_format=fmt, max_size=image_size,
                   cache_size=2 * window_groups + 2)
    return Source("parquet", classes, {"train": train, "val": [x for g in val_groups for x in g]},
                  load, image_size), fmt

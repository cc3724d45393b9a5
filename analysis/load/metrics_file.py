"""One metrics.jsonl -> its usable eval rows (a float array), the lines it skips and its largest
`flops_seen`, by the rules of analysis/README.md ("What the loader skips", "Train lines"). Pure:
no logging, no file access. Train lines in the writer's byte form are recognised by TRAIN_LINE
without being parsed, since they are most of a file and most of the cost.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from typing import NamedTuple

import numpy as np

from analysis.load.checks import eval_row_problem
from scaling.results import (
    EVAL_OPTIONAL,
    TRAIN_KEYS,
    TRAIN_OPTIONAL,
    SchemaError,
    validate_row,
)

# The eval fields the tables keep, in this order (the columns of the arrays returned below).
EVAL_FIELDS = ("step", "epoch", "images_seen", "flops_seen", "wall_s", "top1", "top5", "loss",
               "num_samples", "loss_sd")
# Optional eval fields (scaling.results.EVAL_OPTIONAL) are NaN when absent, null, or not a
# finite number >= 0, without skipping the row (only --metric loss's interval needs them).
# A JSON number (RFC 8259: no leading zeros, no NaN/Infinity) or null.
_VALUE = rb"(?:-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|null)"


def _train_line() -> re.Pattern:
    """TRAIN_LINE: each key and value followed by ', ' (an optional key's pair may be absent),
    the last key's closing the object; group 1 is the flops_seen value."""
    keys = sorted(TRAIN_KEYS + TRAIN_OPTIONAL)
    assert keys[-1] not in TRAIN_OPTIONAL  # the last pair carries no ', '

    def pair(k: str) -> bytes:
        value = {"kind": b'"train"', "flops_seen": b"(%s)" % _VALUE}.get(k, _VALUE)
        return b'"%s": %s' % (k.encode(), value)

    body = b"".join(b"(?:%s, )?" % pair(k) if k in TRAIN_OPTIONAL else pair(k) + b", "
                    for k in keys[:-1]) + pair(keys[-1])
    return re.compile(rb"^\{" + body + rb"\}(?=\n|\Z)", re.MULTILINE)


TRAIN_LINE = _train_line()
_NON_EMPTY = re.compile(rb"[^\n]+")
TORN = " (torn last line: an interrupted append)"


def flops_value(value) -> float:
    """A row's flops_seen as a number for the largest-FLOPs count: null, a non-number, a
    negative or a non-finite number counts as 0."""
    if isinstance(value, bytes):  # a TRAIN_LINE group: a JSON number or null
        value = None if value == b"null" else float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        return 0.0
    return max(0.0, float(value))


def _optional(value) -> float:
    """An optional eval field as a float: NaN unless a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return np.nan
    return float(value) if math.isfinite(value) and value >= 0 else np.nan


def _max_train_flops(values: list[bytes]) -> float:
    """max(map(flops_value, values), default=0), fast: float() of each JSON number."""
    numbers = [v for v in values if v != b"null"]
    top = max(map(float, numbers), default=0.0)
    return top if np.isfinite(top) else max(map(flops_value, values), default=0.0)


def _candidate_lines(data: bytes, flops: list):
    """(line number, bytes) of the lines that are not in TRAIN_LINE's form, numbered as
    bytes.splitlines numbers them, and the number of lines; the flops_seen of each line in
    TRAIN_LINE's form is added to `flops`."""
    if b"\r" in data:  # splitlines breaks at \r too: number the lines its way, one by one
        lines = data.splitlines()
        return list(enumerate(lines, 1)), len(lines)
    n_lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)

    def drop(m: re.Match) -> bytes:  # a train line becomes empty; its newline stays
        flops.append(m[1])
        return b""

    rest = TRAIN_LINE.sub(drop, data)
    out, line, pos = [], 1, 0
    for m in _NON_EMPTY.finditer(rest):
        line += rest.count(b"\n", pos, m.start())
        pos = m.start()
        out.append((line, m.group()))
    return out, n_lines


def _parse(data: bytes, skips: list, flops: list) -> list[tuple[int, dict]]:
    """(line number, row) of every schema-valid row other than TRAIN_LINE's; each other line
    is added to `skips` as (line, reason), the flops_seen of TRAIN_LINE's to `flops`."""
    candidates, n_lines = _candidate_lines(data, flops)
    rows = []
    for i, raw in candidates:
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict):
                raise SchemaError(f"expected a JSON object, got {type(row).__name__}")
            rows.append((i, validate_row(row)))
        except UnicodeDecodeError as e:
            skips.append((i, f"not UTF-8 text ({e})"))
        except json.JSONDecodeError as e:
            skips.append((i, f"not valid JSON{TORN if i == n_lines else ''}: {e}"))
        except SchemaError as e:
            skips.append((i, str(e)))
    return rows


def _keep_once(by_step: dict, skips: list) -> list[dict]:
    """One row per step: exact copies kept once, rows of one step that differ all dropped."""
    kept = []
    for step, group in sorted(by_step.items()):
        texts = [json.dumps(row, sort_keys=True) for _, row in group]
        if len(set(texts)) > 1:  # one step, different numbers: none of them can be trusted
            where = ", ".join(str(i) for i, _ in group)
            for i, row in group:
                skips.append((i, eval_row_problem(row) or (
                    f"eval step {step} is logged {len(group)} times with different values "
                    f"(lines {where}): none of them is kept")))
            continue
        first, row = group[0]
        problem = eval_row_problem(row)
        for i, _ in group:
            if problem:
                skips.append((i, problem))
            elif i != first:
                copy = f"exact copy of the eval row of step {step} on line {first} (kept once)"
                skips.append((i, copy))
        if not problem:
            kept.append(row)
    return kept


class Parsed(NamedTuple):
    """What one metrics.jsonl holds for the analysis."""

    rows: np.ndarray  # the usable eval rows, one per step in step order, EVAL_FIELDS columns
    skips: list  # the skipped lines as (line, reason), in the order they are reported
    max_flops: float  # the largest flops_seen of any schema-valid row, train rows included
    #                   (0 without one): the run's FLOPs so far (analysis.fit.compute)


def parse_metrics(data: bytes) -> Parsed:
    """A metrics.jsonl's bytes -> Parsed (null eval values -> NaN)."""
    skips: list[tuple[int, str]] = []
    train_flops: list[bytes] = []
    by_step: dict[int, list[tuple[int, dict]]] = defaultdict(list)
    rows = _parse(data, skips, train_flops)
    max_flops = max(_max_train_flops(train_flops),
                    *(flops_value(row["flops_seen"]) for _, row in rows), 0.0)
    for i, row in rows:
        if row["kind"] != "eval":
            continue
        problem = eval_row_problem(row)
        if problem and problem.startswith("step="):
            skips.append((i, problem))
        else:
            by_step[int(row["step"])].append((i, row))
    kept = _keep_once(by_step, skips)
    values = [[_optional(row.get(k)) if k in EVAL_OPTIONAL else np.nan if row[k] is None
               else float(row[k]) for k in EVAL_FIELDS] for row in kept]
    return Parsed(np.array(values, dtype=float).reshape(len(kept), len(EVAL_FIELDS)), skips,
                  max_flops)

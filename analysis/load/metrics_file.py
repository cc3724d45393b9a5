"""One metrics.jsonl -> its usable eval rows (a float array) and the lines it skips, by the rules
of analysis/README.md ("What the loader skips"). Pure: no logging, no file access.

Every line is checked, train rows included: a line that is not JSON, not an object or breaks the
row schema is a skipped line whatever its kind. Most lines are train rows, which the analysis
does not use, so parsing them is most of the cost; instead, a line in the exact byte form that
scaling.results.append_metrics writes for a train row (``json.dumps(row, sort_keys=True)``:
``{"epoch": 0.5, "flops_seen": 1e+16, ..., "kind": "train", ..., "wall_s": 12.5}``) is recognised
by one regular expression, TRAIN_LINE, over the whole file. It accepts only an object with
exactly the keys of scaling.results.TRAIN_KEYS, and any of TRAIN_OPTIONAL, in sorted order,
``"kind": "train"``, and every other value a JSON number or null: such a line is valid UTF-8
and JSON, a schema-valid train row, and unused, so dropping it unparsed gives what parsing it
would. Every other line (eval rows,
train rows in another byte form, anything broken) is parsed with json.loads and checked as
before. A file holding a carriage return is read line by line throughout (bytes.splitlines also
breaks lines there).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

import numpy as np

from analysis.load.checks import eval_row_problem
from scaling.results import TRAIN_KEYS, TRAIN_OPTIONAL, SchemaError, validate_row

# The eval fields the tables keep, in this order (the columns of the arrays returned below).
EVAL_FIELDS = ("step", "epoch", "images_seen", "flops_seen", "wall_s", "top1", "top5", "loss",
               "num_samples")
# A JSON number (RFC 8259: no leading zeros, no NaN/Infinity) or null.
_VALUE = rb"(?:-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|null)"


def _train_line() -> re.Pattern:
    """TRAIN_LINE: each key and value followed by ', ' (an optional key's pair may be absent),
    the last key's closing the object."""
    keys = sorted(TRAIN_KEYS + TRAIN_OPTIONAL)
    assert keys[-1] not in TRAIN_OPTIONAL  # the last pair carries no ', '

    def pair(k: str) -> bytes:
        return b'"%s": %s' % (k.encode(), b'"train"' if k == "kind" else _VALUE)

    body = b"".join(b"(?:%s, )?" % pair(k) if k in TRAIN_OPTIONAL else pair(k) + b", "
                    for k in keys[:-1]) + pair(keys[-1])
    return re.compile(rb"^\{" + body + rb"\}(?=\n|\Z)", re.MULTILINE)


TRAIN_LINE = _train_line()
_NON_EMPTY = re.compile(rb"[^\n]+")
TORN = " (torn last line: an interrupted append)"


def _candidate_lines(data: bytes):
    """(line number, bytes) of the lines that are not in TRAIN_LINE's form, numbered as
    bytes.splitlines numbers them, and the number of lines."""
    if b"\r" in data:  # splitlines breaks at \r too: number the lines its way, one by one
        lines = data.splitlines()
        return list(enumerate(lines, 1)), len(lines)
    n_lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    rest = TRAIN_LINE.sub(b"", data)  # a train line becomes empty; its newline stays
    out, line, pos = [], 1, 0
    for m in _NON_EMPTY.finditer(rest):
        line += rest.count(b"\n", pos, m.start())
        pos = m.start()
        out.append((line, m.group()))
    return out, n_lines


def _parse(data: bytes, skips: list) -> list[tuple[int, dict]]:
    """(line number, row) of every schema-valid row other than TRAIN_LINE's; each other line
    is added to `skips` as (line, reason)."""
    candidates, n_lines = _candidate_lines(data)
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


def eval_rows(data: bytes) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """The usable eval rows of a metrics.jsonl's bytes, one per step in step order, as a float
    array with the EVAL_FIELDS columns (null -> NaN), and the skipped lines as (line, reason),
    in the order the reference loader reports them."""
    skips: list[tuple[int, str]] = []
    by_step: dict[int, list[tuple[int, dict]]] = defaultdict(list)
    for i, row in _parse(data, skips):
        if row["kind"] != "eval":
            continue
        problem = eval_row_problem(row)
        if problem and problem.startswith("step="):
            skips.append((i, problem))
        else:
            by_step[int(row["step"])].append((i, row))
    kept = _keep_once(by_step, skips)
    values = [[np.nan if row[k] is None else float(row[k]) for k in EVAL_FIELDS] for row in kept]
    return np.array(values, dtype=float).reshape(len(kept), len(EVAL_FIELDS)), skips

"""Value checks of the loader: which schema-valid eval rows and final.json payloads can be used
(analysis/README.md, "What the loader skips")."""

from __future__ import annotations

import math


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fraction_problem(name: str, v, *, allow_null: bool) -> str | None:
    """Why `v` is not a fraction in [0, 1] (None if it is)."""
    if v is None:
        return None if allow_null else f"{name} is null (a NaN or inf is written as null)"
    if not _is_number(v):
        return f"{name}={v!r} is not a number"
    if math.isnan(v):
        return f"{name} is NaN"
    if not 0.0 <= v <= 1.0:
        return f"{name}={v!r} is outside [0, 1]"
    return None


# A top-5 hit includes the top-1 hit, so top5 >= top1; this allows for rounding only.
TOP_TOL = 1e-9


# Eval fields the checks below do not bound: each must be a number or null (null: NaN in the
# tables), so that every kept row converts to floats (analysis.load.metrics_file.EVAL_FIELDS).
FREE_NUMBERS = ("epoch", "images_seen", "flops_seen", "wall_s", "loss")


def eval_row_problem(row: dict, *, numbers: bool = True) -> str | None:
    """Why a schema-valid eval row cannot be used (None when it can): see
    analysis.load.runs's module docstring. `numbers=False` leaves FREE_NUMBERS unchecked (the rules
    of analysis.bench.load_reference, which raised on such a row instead)."""
    step = row["step"]
    if not _is_number(step) or not math.isfinite(step) or step < 0 or step != int(step):
        return f"step={step!r} is not a whole number >= 0"
    for name in ("top1", "top5"):
        problem = _fraction_problem(name, row[name], allow_null=False)
        if problem:
            return problem
    if row["top5"] < row["top1"] - TOP_TOL:
        return f"top5={row['top5']!r} is below top1={row['top1']!r}"
    n = row["num_samples"]
    if n is None:
        return "num_samples is null"
    if not _is_number(n) or not math.isfinite(n) or n != int(n) or n <= 0:
        return f"num_samples={n!r} is not a positive count of images"
    for name in FREE_NUMBERS if numbers else ():
        v = row[name]
        if v is not None and not _is_number(v):
            return f"{name}={v!r} is not a number (nor null)"
    return None


def final_problem(final: dict) -> str | None:
    """Why a schema-valid final.json cannot be trusted (None when it can). Null top-1/top-5 are
    allowed: a run that failed before its first eval has none."""
    for name in ("final_top1", "best_top1", "final_top5"):
        problem = _fraction_problem(name, final[name], allow_null=True)
        if problem:
            return problem
    best, last = final["best_top1"], final["final_top1"]
    if best is not None and last is not None and best < last - TOP_TOL:
        return f"best_top1={best!r} is below final_top1={last!r}"
    return None

"""Backtests: would a law fitted without the largest runs have predicted them?

Two leave-out splits (`largest_size`, `largest_budget`) for each `Method` (fit, predict, which
left-out final points it is asked about): the frontier law (`frontier_method`, analysis.fit.law)
and Chinchilla's approach 3 (`parametric_method`, analysis.fit.parametric). `backtest` returns
one entry per (method, kind). Splits, targets and entries: analysis/README.md ("Backtest").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits  # installed with scikit-learn (pyproject.toml)

from analysis.fit import law as F
from analysis.fit.frontier import FRONTIER_RTOL, frontier_points, x_column
from analysis.fit.memo import plain
from analysis.fit.parametric import fit_parametric, predict_parametric

KINDS = ("largest_size", "largest_budget")


@dataclass(frozen=True)
class Method:
    """A law to backtest. `fit(train)` -> dict with `ok`, `n_points` (points the fit used) and
    `reason` when not ok; `predict(fitted, targets)` -> predicted errors of the target rows;
    `targets(held, points)` -> the rows of `held` (left-out final points, a slice of `points`)
    the law predicts."""

    name: str
    fit: Callable[[pd.DataFrame], dict]
    predict: Callable[[dict, pd.DataFrame], np.ndarray]
    targets: Callable[[pd.DataFrame, pd.DataFrame], pd.DataFrame]
    used: str  # what its `n_points` counts, for the summary ("frontier points", ...)


def frontier_method(x: str = "flops", *, loss: str = "huber", memo=plain) -> Method:
    """The frontier law E = a (C + d)^(-b) + c (analysis.fit.law), C the `x` column."""
    col = x_column(x)
    F.check_loss(loss)
    n_min = len(F.PARAMS) + 1  # as analysis.fit.frontier.fit_frontier

    def fit(train: pd.DataFrame) -> dict:
        idx = F.pareto_frontier(train[col].to_numpy(float), train["error"].to_numpy(float),
                                rtol=FRONTIER_RTOL)
        pts = train.iloc[idx]
        pts = pts[pts["error"] > 0]
        if len(pts) < n_min:
            return {"ok": False, "n_points": len(pts), "reason": (
                f"the other runs' frontier has {len(pts)} point(s) with error > 0; the "
                f"4-parameter law needs at least {n_min}")}
        law = memo(F.fit_saturating_power_law, pts[col].to_numpy(float),
                   pts["error"].to_numpy(float), loss=loss)
        return {"ok": True, "n_points": len(pts), "fit": law}

    def predict(fitted: dict, targets: pd.DataFrame) -> np.ndarray:
        return F.predict(fitted["fit"], targets[col].to_numpy(float))

    def targets(held: pd.DataFrame, points: pd.DataFrame) -> pd.DataFrame:
        idx = F.pareto_frontier(points[col].to_numpy(float), points["error"].to_numpy(float),
                                rtol=FRONTIER_RTOL)
        return held[held.index.isin(points.index[idx])]

    return Method(name="frontier", fit=fit, predict=predict, targets=targets,
                  used="frontier points")


def _final_points(points: pd.DataFrame) -> pd.DataFrame:
    """Final evals of finished runs (seeds averaged) that E(N, D) can take: error, params and
    images seen all > 0."""
    ok = (points["is_final"].astype(bool) & (points["status"] == "ok") & (points["error"] > 0)
          & (pd.to_numeric(points["params"], errors="coerce") > 0)
          & (pd.to_numeric(points["images_seen"], errors="coerce") > 0))
    return points[ok]


def parametric_method(*, seed: int = 0) -> Method:
    """Approach 3, E(N, D) = E0 + A N^-alpha + B D^-beta (analysis.fit.parametric), fitted to
    the training runs' final points (no bootstrap: only the point fit predicts)."""

    def fit(train: pd.DataFrame) -> dict:
        res = fit_parametric(_final_points(train), n_boot=0, seed=seed)
        return {**res, "reason": res.get("reason")}

    def predict(fitted: dict, targets: pd.DataFrame) -> np.ndarray:
        return predict_parametric(fitted["params"], targets["params"].to_numpy(float),
                                  targets["images_seen"].to_numpy(float))

    return Method(name="parametric", fit=fit, predict=predict,
                  targets=lambda held, points: _final_points(held), used="runs' final points")


def split(points: pd.DataFrame, kind: str) -> tuple[pd.DataFrame, pd.DataFrame, str] | str:
    """(training points, left-out final points, what was left out) for `kind`, or why the split
    is not possible."""
    if kind == "largest_size":
        params = pd.to_numeric(points["params"], errors="coerce")
        sizes = np.unique(params[np.isfinite(params)])
        if sizes.size < 2:
            return f"{sizes.size} model size(s) with a known parameter count; need 2 to leave one out"
        out = params == sizes[-1]
        label = ", ".join(sorted(set(points.loc[out, "model"].astype(str))))
        keep = np.isfinite(params) & ~out
    elif kind == "largest_budget":
        budget = pd.to_numeric(points.get("budget", pd.Series(np.nan, index=points.index)),
                               errors="coerce")
        budgets = np.unique(budget[np.isfinite(budget)])
        if budgets.size < 2:
            return (f"{budgets.size} FLOPs budget(s) (config `flops`) among the runs; need 2 to "
                    "leave the largest out")
        out = budget == budgets[-1]
        label = f"{budgets[-1]:.3g} FLOPs"
        keep = np.isfinite(budget) & ~out
    else:
        raise ValueError(f"kind={kind!r}; expected one of {KINDS}")
    held = points[out & points["is_final"].astype(bool)]
    if held.empty:
        return f"the left-out runs ({label}) have no final eval (none finished)"
    return points[keep], held, label


def _entry(method: Method, kind: str, points: pd.DataFrame, x: str) -> dict:
    """One backtest (see the module docstring)."""
    out = {"method": method.name, "left_out": kind, "held_out": None, "n_points_used": None,
           "points_used": method.used, "predictions": [], "rel_errors": None,
           "mean_rel_error": None, "mean_abs_rel_error": None, "max_abs_rel_error": None,
           "n_within_interval": None, "n_with_interval": None, "reason": None}
    parts = split(points, kind)
    if isinstance(parts, str):
        return {**out, "reason": parts}
    train, held, label = parts
    out["held_out"] = label
    targets = method.targets(held, points)
    if targets.empty:
        return {**out, "reason": (
            f"none of the {len(held)} final point(s) of {label} is one the {method.name} law "
            "predicts (for the frontier law: none lies on the frontier of all the runs)")}
    fitted = method.fit(train)
    out["n_points_used"] = fitted.get("n_points")
    if not fitted["ok"]:
        return {**out, "reason": f"no fit without {label}: {fitted['reason']}"}
    pred = np.asarray(method.predict(fitted, targets), dtype=float)
    err = targets["error"].to_numpy(float)
    rel = (pred - err) / err
    col = x_column(x)
    lo, hi = _measured_interval(targets)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_iv = np.column_stack([(pred - hi) / hi, (pred - lo) / lo])
    inside = (lo <= pred) & (pred <= hi)
    out["predictions"] = [
        {"model": m, "params": n, "images": d, "compute": c, "error": e,
         "error_interval": [float(a), float(b)], "predicted": p, "rel_error": r,
         "rel_error_interval": [float(v) for v in ri], "within_interval": bool(w)}
        for m, n, d, c, e, a, b, p, r, ri, w in zip(
            targets["model"], targets["params"], targets["images_seen"], targets[col], err,
            lo, hi, pred, rel, rel_iv, inside)]
    known = np.isfinite(lo) & np.isfinite(hi)
    return {**out, "rel_errors": rel.tolist(), "mean_rel_error": float(np.mean(rel)),
            "mean_abs_rel_error": float(np.mean(np.abs(rel))),
            "max_abs_rel_error": float(np.max(np.abs(rel))),
            "n_within_interval": int(inside[known].sum()), "n_with_interval": int(known.sum())}


def _measured_interval(targets: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The left-out points' measured 95 % intervals (err_lo, err_hi of
    analysis.fit.noise.aggregate_seeds; NaN where a point has none)."""
    nan = np.full(len(targets), np.nan)
    lo = targets["err_lo"].to_numpy(float) if "err_lo" in targets else nan
    hi = targets["err_hi"].to_numpy(float) if "err_hi" in targets else nan
    return lo, hi


def backtest(points: pd.DataFrame, methods: list[Method], x: str = "flops",
             kinds=KINDS) -> dict[str, dict]:
    """{"METHOD:KIND": entry} for every method and kind; `points`: seed-averaged eval points of
    every step (analysis.fit.frontier.frontier_points), with is_final, status, params,
    images_seen, budget and the `x` column. BLAS runs on one thread: the fits are many small
    L-BFGS-B / trust-region solves, which threads slow down (30x on 2 busy cores)."""
    with threadpool_limits(1):
        return {f"{m.name}:{k}": _entry(m, k, points.reset_index(drop=True), x)
                for m in methods for k in kinds}


def run_backtests(evals: pd.DataFrame, x: str = "flops", *, loss: str = "huber", memo=plain,
                  seed: int = 0) -> dict[str, dict]:
    """The report's backtests: the frontier law (fitted with `loss`) and approach 3, each with
    the largest size and the largest budget left out, on `evals` (analysis.load.runs tidy
    table) seed-averaged as the frontier is (analysis.fit.frontier.frontier_points)."""
    points = frontier_points(evals, x)
    methods = [frontier_method(x, loss=loss, memo=memo), parametric_method(seed=seed)]
    return backtest(points, methods, x)

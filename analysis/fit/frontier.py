"""DataFrame-level analysis: usable points, the compute-optimal frontier, its power-law fit and
the extrapolation check, and the per-size table of summary.md."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.fit import law as F
from analysis.fit.determined import assess
from analysis.fit.memo import plain
from analysis.fit.noise import aggregate_seeds
from analysis.load.tables import X_COLUMNS

# Points from these runs define the frontier. Failed/diverged runs are plotted but left out:
# their last evals may precede a blow-up and say nothing about what the compute can buy.
FRONTIER_STATUSES = ("ok", "running")


def x_column(x: str) -> str:
    """The eval-table column behind an --x choice (flops, images, device_hours)."""
    if x not in X_COLUMNS:
        raise ValueError(f"x={x!r}; expected one of {sorted(X_COLUMNS)}")
    return X_COLUMNS[x]


def usable_points(evals: pd.DataFrame, x: str) -> pd.DataFrame:
    """Eval rows that can go on a log-x plot: a finite top-1 and a positive x value."""
    col = x_column(x)
    xs = pd.to_numeric(evals[col], errors="coerce")
    return evals[np.isfinite(xs) & (xs > 0) & evals["top1"].notna()].copy()


# Compute within 5% counts as equal on the frontier: a budget turns into whole steps, so runs of
# one nominal budget spend slightly different FLOPs (see analysis.fit.law.pareto_frontier).
FRONTIER_RTOL = 0.05


def frontier_points(evals: pd.DataFrame, x: str,
                    statuses: tuple[str, ...] = FRONTIER_STATUSES) -> pd.DataFrame:
    """Usable eval points of runs with `statuses`, seeds averaged: one row per (recipe, step)
    with n_seeds and its interval (analysis.fit.noise.aggregate_seeds)."""
    pts = usable_points(evals, x)
    return aggregate_seeds(pts[pts["status"].isin(statuses)])


def frontier_table(evals: pd.DataFrame, x: str,
                   statuses: tuple[str, ...] = FRONTIER_STATUSES,
                   rtol: float = FRONTIER_RTOL) -> pd.DataFrame:
    """The seed-averaged points on the compute-optimal (Pareto) frontier of error vs x, sorted
    by x; each keeps n_seeds, num_samples and err_lo/err_hi."""
    return frontier_of(frontier_points(evals, x, statuses), x, rtol)


def frontier_of(points: pd.DataFrame, x: str, rtol: float = FRONTIER_RTOL) -> pd.DataFrame:
    """The Pareto-frontier rows of seed-averaged points (frontier_points), sorted by x."""
    idx = F.pareto_frontier(points[x_column(x)].to_numpy(), points["error"].to_numpy(),
                            rtol=rtol)
    return points.iloc[idx].reset_index(drop=True)


# Why the robust fit is the default, for summary.md.
WHY = {"huber": ("the default: the frontier is a handful of points picked as minima, so one "
                 "lucky or mis-logged eval lands on it, and a least-squares fit of 4 constants "
                 "follows that point by the square of its residual; the Huber loss (delta 1e-3 "
                 "on log-error, Hoffmann et al. 2022, Sec. 3.3) bounds each point's pull"),
       "lsq": "chosen with --fit lsq (least squares on log-error)"}


def fit_frontier(frontier: pd.DataFrame, x: str, *, n_boot: int = 200, seed: int = 0,
                 loss: str = "huber", memo=plain) -> dict:
    """Bootstrap fit of the law to the frontier with `loss` ("huber" or "lsq"), the other loss's
    point fit for comparison (`alt`), the top-20 % hold-out check of the chosen fit and the
    verdict on the law (`determination`, analysis.fit.determined.assess); or
    {"ok": False, "message"} with too few points. Points at zero error are dropped: the law is
    fitted on log-error. `memo` (analysis.fit.memo.FitMemo) remembers the fits."""
    F.check_loss(loss)
    pts = frontier[frontier["error"] > 0]
    n_min = len(F.PARAMS) + 1  # one more than the parameters, so the fit is not an interpolation
    if len(pts) < n_min:
        return {"ok": False, "n": len(pts), "loss": loss, "message": (
            f"only {len(pts)} frontier points with error > 0; need at least {n_min} to fit "
            f"the 4-parameter law (no fit drawn)")}
    compute, error = pts[x_column(x)].to_numpy(), pts["error"].to_numpy()
    boot = memo(F.bootstrap_fit, compute, error, n_boot=n_boot, seed=seed, loss=loss)
    other = "lsq" if loss == "huber" else "huber"
    alt = memo(F.fit_saturating_power_law, compute, error, loss=other)
    extrap = memo(F.extrapolation_check, compute, error, loss=loss)
    grid = np.logspace(np.log10(compute.min()), np.log10(compute.max()), 50)
    diff = float(np.max(np.abs(F.predict(alt, grid) / F.predict(boot["fit"], grid) - 1)))
    return {"ok": True, "n": len(pts), "boot": boot, "fit": boot["fit"], "loss": loss,
            "why": WHY[loss], "alt": alt, "alt_max_rel_diff": diff, "extrapolation": extrap,
            "determination": assess(boot, compute),
            "outliers": F.outliers(boot["fit"], compute, error)}


def size_table(runs: pd.DataFrame, evals: pd.DataFrame, order: list[str], x: str) -> pd.DataFrame:
    """Per model: runs, params, GMACs/image, best top-1 and the compute at which it was reached."""
    col = x_column(x)
    rows = []
    for model in order:
        r = runs[runs["model"] == model]
        e = evals[(evals["model"] == model) & evals["top1"].notna()]
        best = e.loc[e["top1"].idxmax()] if len(e) else None
        rows.append({
            "model": model, "runs": len(r), "ok": int((r["status"] == "ok").sum()),
            "params": r["params"].median(), "gmacs": r["macs_per_image"].median() / 1e9,
            "best_top1": best["top1"] if best is not None else math.nan,
            "compute_at_best": best[col] if best is not None else math.nan,
            "best_run": best["run"] if best is not None else "",
        })
    return pd.DataFrame(rows)

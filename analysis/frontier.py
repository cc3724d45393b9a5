"""DataFrame-level analysis: usable points, the compute-optimal frontier, its power-law fit and
the extrapolation check, and the per-size table of summary.md."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis import fit as F
from analysis.style import X_COLUMNS

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
# one nominal budget spend slightly different FLOPs (see analysis.fit.pareto_frontier).
FRONTIER_RTOL = 0.05


def frontier_table(evals: pd.DataFrame, x: str,
                   statuses: tuple[str, ...] = FRONTIER_STATUSES,
                   rtol: float = FRONTIER_RTOL) -> pd.DataFrame:
    """The eval rows on the compute-optimal (Pareto) frontier of error vs x, sorted by x."""
    pts = usable_points(evals, x)
    pts = pts[pts["status"].isin(statuses)]
    idx = F.pareto_frontier(pts[x_column(x)].to_numpy(), pts["error"].to_numpy(), rtol=rtol)
    return pts.iloc[idx].reset_index(drop=True)


def fit_frontier(frontier: pd.DataFrame, x: str, *, n_boot: int = 200, seed: int = 0) -> dict:
    """Bootstrap fit of the law to the frontier, or {"ok": False, "message"} with too few points.
    Points at zero error are dropped: the law is fitted on log-error."""
    pts = frontier[frontier["error"] > 0]
    n_min = len(F.PARAMS) + 1  # one more than the parameters, so the fit is not an interpolation
    if len(pts) < n_min:
        return {"ok": False, "n": len(pts), "message": (
            f"only {len(pts)} frontier points with error > 0; need at least {n_min} to fit "
            f"the 4-parameter law (no fit drawn)")}
    compute, error = pts[x_column(x)].to_numpy(), pts["error"].to_numpy()
    boot = F.bootstrap_fit(compute, error, n_boot=n_boot, seed=seed)
    extrap = F.extrapolation_check(compute, error)
    return {"ok": True, "n": len(pts), "boot": boot, "fit": boot["fit"], "extrapolation": extrap}


# Per-size points closer than half a decade of compute leave the slope to noise.
MIN_SIZE_DECADES = 0.5


def size_points(frontier: pd.DataFrame, x: str) -> pd.DataFrame:
    """One row per model size on the frontier: params, the compute range [lo, hi] of its frontier
    points, their number, and `compute`, the log-midpoint sqrt(lo * hi) of that range.

    The log-midpoint is the centre, on the log axis the line is fitted in, of the range where the
    size is compute-optimal, however many evals fall in it; its lowest-error point would always
    be the range's right end, where the next size takes over."""
    col = x_column(x)
    pts = frontier.dropna(subset=["params"])
    out = (pts.groupby("model", sort=False)
           .agg(params=("params", "median"), compute_lo=(col, "min"), compute_hi=(col, "max"),
                n_points=(col, "size"))
           .reset_index())
    out["compute"] = np.sqrt(out["compute_lo"].astype(float) * out["compute_hi"].astype(float))
    return out.sort_values("compute", ignore_index=True)


def optimal_size_fit(frontier: pd.DataFrame, x: str) -> dict:
    """Log-log fit params_opt ∝ C^k over one point per frontier size (size_points), so a size
    with many frontier evals weighs no more than one with a single eval. Returns the points and
    {"ok": False, "message"} unless two sizes at least MIN_SIZE_DECADES apart are there."""
    pts = size_points(frontier, x)
    out = {"points": pts, "n_sizes": len(pts), "n_frontier": int(pts["n_points"].sum())}
    if len(pts) < 2:
        names = ", ".join(pts["model"]) or "none"
        return {**out, "ok": False, "message": (
            f"only {len(pts)} model size(s) on the frontier ({names}); need at least 2 sizes "
            "to fit params_opt vs compute (no line drawn)")}
    span = float(np.log10(pts["compute"].max() / pts["compute"].min()))
    if span < MIN_SIZE_DECADES:
        return {**out, "ok": False, "message": (
            f"the {len(pts)} frontier sizes' points span {span:.2f} decades of compute; need "
            f"at least {MIN_SIZE_DECADES} to fit params_opt vs compute (no line drawn)")}
    return {**out, "ok": True, **F.fit_loglinear(pts["compute"], pts["params"])}


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

"""Compute-optimal model size from IsoFLOP profiles (Hoffmann et al. 2022, "Training
Compute-Optimal Large Language Models", Sec. 3.2, approach 2).

Owns the per-budget parabolas and their vertices N_opt(C) (beyond the sizes tried: a bound),
their bootstrap intervals, the N_opt ~ C^a line, and `diagnose` (off-centre or narrow budgets
left out of the exponent, arXiv 2603.22339). Details: analysis/README.md ("Compute-optimal
size: IsoFLOP profiles").
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from analysis.fit.noise import LEVEL, aggregate_seeds

MIN_SIZES = 3
MIN_BUDGETS = 3
METHOD = "isoflop"
OFF_CENTRE = 0.2  # a vertex within this fraction of the log-size range from either end
MIN_SPAN = 4.0  # largest / smallest size of a budget, at least
BIAS_REF = "arXiv 2603.22339"


def budget_points(evals: pd.DataFrame) -> pd.DataFrame:
    """Final evals of finished runs with a FLOPs budget, averaged over seeds, the best recipe
    per (budget, model); `n_recipes` says how many were tried."""
    ok = (evals["status"] == "ok") & evals["is_final"].astype(bool) & (evals["error"] > 0)
    ev = evals[ok & np.isfinite(evals["budget"].astype(float))
               & np.isfinite(evals["params"].astype(float))]
    pts = aggregate_seeds(ev)
    if pts.empty:
        return pts.assign(n_recipes=pd.Series(dtype=int))
    n_rec = pts.groupby(["budget", "model"])["recipe"].transform("nunique")
    pts = pts.assign(n_recipes=n_rec).sort_values("error", kind="stable")
    pts = pts.groupby(["budget", "model"], sort=False).head(1)
    return pts.sort_values(["budget", "params"], ignore_index=True)


def _point_sd(pts: pd.DataFrame) -> np.ndarray:
    """Measurement sd of each point's log-error (see the module docstring)."""
    z = stats.norm.ppf(0.5 + LEVEL / 2)
    wilson = (pts["wilson_hi"] - pts["wilson_lo"]).to_numpy(float) / (2 * z)
    sd = wilson / pts["error"].to_numpy(float)
    seeds = (pts["log_err_sd"] / np.sqrt(pts["n_seeds"])).to_numpy(float)
    return np.nan_to_num(np.fmax(sd, seeds), nan=0.0)


def _vertex(coef: np.ndarray) -> float:
    """log-params of the parabola's minimum (relative to its centre), NaN when it has none."""
    p2, p1, _ = coef
    return -p1 / (2 * p2) if p2 > 0 else math.nan


def _bound(coef, u, u0) -> tuple[float, str | None]:
    """(log N_opt, bound): the vertex inside the sizes tried, or the edge size it lies beyond
    ("lower": N_opt is at least the largest size; "upper": at most the smallest)."""
    v = _vertex(coef)
    lo, hi = u.min(), u.max()
    if math.isfinite(v) and lo <= u0 + v <= hi:
        return u0 + v, None
    if math.isfinite(v):
        return (hi, "lower") if u0 + v > hi else (lo, "upper")
    at_hi = np.polyval(coef, hi - u0) <= np.polyval(coef, lo - u0)
    return (hi, "lower") if at_hi else (lo, "upper")


def diagnose(log_opt: float, bound: str | None, u: np.ndarray) -> dict:
    """Where the vertex sits among the sizes (`vertex_position`: 0 at the smallest, 1 at the
    largest, in log-params; NaN for a bound), `size_span` (largest / smallest), `flags`
    ("off-centre", "narrow") and `left_out`: why the exponent fit leaves the budget out, or None."""
    lo, hi = float(u.min()), float(u.max())
    span = math.exp(hi - lo)
    pos = (log_opt - lo) / (hi - lo) if bound is None and hi > lo else math.nan
    flags = []
    if math.isfinite(pos) and not OFF_CENTRE <= pos <= 1 - OFF_CENTRE:
        flags.append("off-centre")
    if span < MIN_SPAN:
        flags.append("narrow")
    reasons = []
    if "off-centre" in flags:
        reasons.append(f"the vertex sits in the outer fifth of the sizes tried (at {pos:.2f} of "
                       "their log-params range)")
    if "narrow" in flags:
        reasons.append(f"the sizes span {span:.2f}x, under {MIN_SPAN:g}x")
    left_out = ("; ".join(reasons) + f": approach 2 is biased when the sizes are off-centre "
                f"around the optimum or span a narrow range ({BIAS_REF})") if reasons else None
    return {"vertex_position": pos, "size_span": span, "flags": flags, "left_out": left_out}


def fit_profile(pts: pd.DataFrame, rng, n_boot: int = 200, level: float = LEVEL) -> dict:
    """The parabola of one budget's points, its vertex (or bound) and bootstrap samples of
    the vertex (log-params; NaN where a replicate has no minimum)."""
    u = np.log(pts["params"].to_numpy(float))
    y = np.log(pts["error"].to_numpy(float))
    u0 = float(u.mean())
    coef = np.polyfit(u - u0, y, 2)
    fitted = np.polyval(coef, u - u0)
    resid_sd = (math.sqrt(np.sum((y - fitted) ** 2) / (u.size - 3)) if u.size > 3 else 0.0)
    sd = np.maximum(_point_sd(pts), resid_sd)
    draws = fitted + rng.normal(size=(n_boot, u.size)) * sd
    samples = np.array([u0 + _vertex(np.polyfit(u - u0, d, 2)) for d in draws])
    log_opt, bound = _bound(coef, u, u0)
    q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    ok = samples[np.isfinite(samples)]
    interval = ([float(np.exp(np.percentile(ok, q[0]))), float(np.exp(np.percentile(ok, q[1])))]
                if bound is None and ok.size >= n_boot / 2 else None)
    best = pts.loc[pts["error"].idxmin()]
    tied = pts[(pts["model"] != best["model"]) & (pts["err_lo"] <= best["err_hi"])
               & (pts["err_hi"] >= best["err_lo"])]["model"].tolist()
    sizes = pts["params"].astype(float)
    params_opt = {None: float(np.exp(log_opt)), "lower": float(sizes.max()),
                  "upper": float(sizes.min())}[bound]  # a bound is the edge size itself
    return {"compute": float(pts["budget"].iloc[0]), "n_sizes": int(u.size),
            "params_opt": params_opt, "bound": bound, "interval": interval,
            "coef": coef, "u0": u0, "samples": samples, "resid_sd": resid_sd,
            "error_opt": float(np.exp(np.polyval(coef, log_opt - u0))),
            "best_model": best["model"], "tied": tied,
            "models": pts["model"].tolist(), "seeds": pts["n_seeds"].astype(int).tolist(),
            **diagnose(log_opt, bound, u)}


def _line(lc: np.ndarray, ln: np.ndarray) -> tuple[float, float, float]:
    """Least squares ln = b0 + a (lc - mean lc): (a, b0, residual sum of squares)."""
    a, b0 = np.polyfit(lc - lc.mean(), ln, 1)
    rss = float(np.sum((ln - (b0 + a * (lc - lc.mean()))) ** 2))
    return float(a), float(b0), rss


def fit_exponent(profiles: list[dict], level: float = LEVEL) -> dict:
    """N_opt ∝ C^a over the budgets with a vertex inside their sizes and not left out by
    `diagnose` (`n_left_out` of them were); {"ok": False, "reason"} with fewer than MIN_BUDGETS
    of them."""
    inside = [p for p in profiles if p["bound"] is None and not p.get("left_out")]
    n_out = sum(1 for p in profiles if p["bound"] is None and p.get("left_out"))
    if len(inside) < MIN_BUDGETS:
        dropped = (f", {n_out} more left out as off-centre or narrow ({BIAS_REF})"
                   if n_out else "")
        return {"ok": False, "n": len(inside), "n_left_out": n_out, "reason": (
            f"{len(inside)} budget(s) with a vertex inside the sizes tried{dropped} "
            f"({len(profiles)} with at least {MIN_SIZES} sizes); need at least {MIN_BUDGETS} "
            "to fit N_opt ∝ C^a (no line drawn)")}
    lc = np.log([p["compute"] for p in inside])
    ln = np.log([p["params_opt"] for p in inside])
    a, b0, rss = _line(lc, ln)
    n = lc.size
    sxx = float(np.sum((lc - lc.mean()) ** 2))
    t = float(stats.t.ppf(0.5 + level / 2, n - 2))
    half = t * math.sqrt(rss / (n - 2) / sxx)
    reps = np.array([p["samples"] for p in inside]).T  # (n_boot, budgets)
    reps = reps[np.isfinite(reps).all(axis=1)]
    boot = np.array([_line(lc, r)[:2] for r in reps]) if len(reps) else np.empty((0, 2))
    q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    b_lo, b_hi = (np.percentile(boot[:, 0], q) if len(boot) else (math.nan, math.nan))
    order = np.argsort(lc)
    return {"ok": True, "n": n, "n_left_out": n_out, "exponent": a,
            "log_c_mean": float(lc.mean()), "intercept": b0,
            "interval": [float(np.fmin(a - half, b_lo)), float(np.fmax(a + half, b_hi))],
            "interval_t": [a - half, a + half], "interval_boot": [float(b_lo), float(b_hi)],
            "boot_lines": boot, "t": t, "rss": rss, "sxx": sxx,
            "monotone": bool(np.all(np.diff(ln[order]) > 0)), "level": level}


def predict_line(res: dict, compute) -> np.ndarray:
    """N_opt at `compute` from a fit_exponent result."""
    lc = np.log(np.asarray(compute, dtype=float)) - res["log_c_mean"]
    return np.exp(res["intercept"] + res["exponent"] * lc)


def line_band(res: dict, compute) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise band of N_opt: the wider of the bootstrap lines' percentiles and the t band."""
    lc = np.log(np.asarray(compute, dtype=float)) - res["log_c_mean"]
    mid = res["intercept"] + res["exponent"] * lc
    n = res["n"]
    se = math.sqrt(res["rss"] / (n - 2)) * np.sqrt(1.0 / n + lc ** 2 / res["sxx"])
    lo, hi = mid - res["t"] * se, mid + res["t"] * se
    boot = res["boot_lines"]
    if len(boot):
        curves = boot[:, 1:2] + boot[:, 0:1] * lc[None, :]
        q = (100 * (1 - res["level"]) / 2, 100 * (1 + res["level"]) / 2)
        lo = np.fmin(lo, np.percentile(curves, q[0], axis=0))
        hi = np.fmax(hi, np.percentile(curves, q[1], axis=0))
    return np.exp(lo), np.exp(hi)


def optimal_size(evals: pd.DataFrame, *, n_boot: int = 200, seed: int = 0) -> dict:
    """IsoFLOP profiles of every budget with MIN_SIZES sizes and the exponent a; "reason" says
    why there is none. Keys: points, profiles, fit (fit_exponent), reason, n_budgets."""
    pts = budget_points(evals)
    rng = np.random.default_rng(seed)
    groups = [g for _, g in pts.groupby("budget", sort=True)] if len(pts) else []
    profiles = [fit_profile(g, rng, n_boot) for g in groups if len(g) >= MIN_SIZES]
    out = {"method": METHOD, "points": pts, "profiles": profiles, "n_budgets": len(groups)}
    if not groups:
        return {**out, "fit": None, "reason": (
            "no finished run with a FLOPs budget (config `flops`): IsoFLOP profiles need "
            "every size trained at each budget (no line drawn)")}
    if not profiles:
        return {**out, "fit": None, "reason": (
            f"no budget of the {len(groups)} has final evals of at least {MIN_SIZES} sizes "
            "(no parabola fitted, no line drawn)")}
    fit = fit_exponent(profiles)
    return {**out, "fit": fit if fit["ok"] else None, "reason": fit.get("reason")}

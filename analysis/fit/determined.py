"""Is the frontier law determined? A verdict that means the same in any unit of compute.

The law E = a (C + d)^(-b) + c is judged by what it predicts and by unit-free quantities (enough
data, nothing at a bound, no loose constant, a narrow band), never by raw a (its unit is C^b).
The rules and their thresholds (MIN_POINTS, MIN_DECADES, BAND_AT_MAX, BAND_AT_10X):
analysis/README.md ("Is the frontier law determined?").
"""

from __future__ import annotations

import math

import numpy as np

from analysis.fit import law as F

# Four constants: an exact fit needs 4 points, and 3 per constant leaves the residual bootstrap
# 8 degrees of freedom, so its residuals are not mostly the fit's own (sqrt(n / (n - p)) < 1.25).
MIN_POINTS = 3 * len(F.PARAMS)
# Under one decade of compute, a, b and d trade off freely: a curve bent by d, or a steep b, fit
# one decade alike (issue 26: a 13-point, one-decade curve drove b to its cap of 5).
MIN_DECADES = 1.0
EXTRAPOLATE = 10.0  # judge the band at 10x the largest compute in the data
# Full widths of the 95 % band relative to the prediction: +-5 % inside the data (the "good"
# guide of the extrapolation check), +-10 % at 10x beyond it (inside its "rough" 15 % guide).
BAND_AT_MAX = 0.10
BAND_AT_10X = 0.20


def band_widths(boot: dict, c_max: float) -> dict[str, float]:
    """Full width of the bootstrap band over the prediction, at c_max and EXTRAPOLATE x c_max."""
    at = np.array([c_max, EXTRAPOLATE * c_max])
    lo, hi = F.prediction_band(boot, at) if boot["n_ok"] else (at * math.nan, at * math.nan)
    rel = (hi - lo) / F.predict(boot["fit"], at)
    return {"at_max": float(rel[0]), "at_10x": float(rel[1])}


def data_shortfall(n: int, decades: float) -> str | None:
    """Why `n` frontier points over `decades` of compute are too few for 4 constants, or None."""
    why = []
    if n < MIN_POINTS:
        why.append(f"{n} frontier points, fewer than {MIN_POINTS} (3 per constant of the "
                   f"{len(F.PARAMS)}-constant law)")
    if decades < MIN_DECADES:
        why.append(f"{decades:.2f} decades of compute, under {MIN_DECADES:g}")
    return "; ".join(why) or None


def assess(boot: dict, compute) -> dict:
    """The verdict on a bootstrap_fit of the law to `compute`: determined (bool), reasons (one
    line each), at_bound, poorly_determined, band (band_widths), n_points, decades, too_little
    (data_shortfall's text or None)."""
    c = np.asarray(compute, dtype=float)
    decades = float(math.log10(c.max() / c.min()))
    at_bound, loose = F.at_bound(boot), F.poorly_determined(boot)
    band = band_widths(boot, float(c.max()))
    too_little = data_shortfall(int(c.size), decades)
    reasons = []
    if too_little:
        reasons.append(f"too little data: {too_little}")
    if at_bound:
        reasons.append("at bound (a limit of the search): " + ", ".join(
            f"{k} ({_bound_share(boot, k)})" for k in at_bound))
    if loose:
        reasons.append("loose: " + ", ".join(loose))
    for key, limit, where in (("at_max", BAND_AT_MAX, "the largest compute"),
                              ("at_10x", BAND_AT_10X, f"{EXTRAPOLATE:g}x beyond it")):
        if not band[key] <= limit:  # NaN (no refits) fails too
            reasons.append(f"{round(100 * boot['level'])}% band {100 * band[key]:.0f}% of the "
                           f"prediction wide at {where} "
                           f"(limit {100 * limit:.0f}%)")
    return {"determined": not reasons, "reasons": reasons, "at_bound": at_bound,
            "poorly_determined": loose, "band": band, "n_points": int(c.size),
            "decades": decades, "too_little": too_little}


def _bound_share(boot: dict, name: str) -> str:
    """Where `name` sits at its bound: in the fit, and in what share of the refits."""
    where = ["in the fit"] if name in boot["fit"]["at_bound"] else []
    frac = boot.get("at_bound_frac", {}).get(name, 0.0)
    if frac:
        where.append(f"in {100 * frac:.0f}% of {boot['n_ok']} refits")
    return " and ".join(where)

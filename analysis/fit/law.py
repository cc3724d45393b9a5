"""Compute-optimal frontier and the saturating power law E = a (C + d)^(-b) + c of Zhai et al.
2022 ("Scaling Vision Transformers", Sec. 2.2), fitted by least squares or by the Huber loss
(Hoffmann et al. 2022, App. D.2; Besiroglu et al. 2024).

Every function here is pure (arrays in, numbers out) so it can be used from a notebook. Units,
residuals and losses: analysis/README.md ("Scaling-law fit: Huber by default").
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.optimize import least_squares

PARAMS = ("a", "b", "c", "d")
_B_BOUNDS = (1e-4, 5.0)  # exponents seen in practice are 0.1..1 (Zhai et al. Fig. 2)
_C_MARGIN = 1e-6  # keep c strictly below min(error): log(E - c) must stay finite
LOSSES = ("huber", "lsq")
HUBER_DELTA = 1e-3  # on log-error residuals (Hoffmann et al. 2022, Sec. 3.3)
BOUND_RTOL = 0.01  # a value within 1 % of a search limit counts as "at bound" (issue 26)
BOUND_FRACTION = 0.05  # ... and so does one that 5 % of the bootstrap refits put there


def check_loss(loss: str) -> str:
    """Return `loss` if it is one of LOSSES, else raise ValueError naming them."""
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}; expected one of {LOSSES}")
    return loss


def _check_points(compute, error) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert (compute, error) to float arrays; raise ValueError naming the bad
    value."""
    c = np.asarray(compute, dtype=float).ravel()
    e = np.asarray(error, dtype=float).ravel()
    if c.shape != e.shape:
        raise ValueError(f"compute has {c.size} values but error has {e.size}")
    for name, arr in (("compute", c), ("error", e)):
        bad = ~np.isfinite(arr)
        if bad.any():
            raise ValueError(f"{name} must be finite; got {float(arr[bad][0])} at index "
                             f"{int(np.flatnonzero(bad)[0])}")
    if (c <= 0).any():
        i = int(np.flatnonzero(c <= 0)[0])
        raise ValueError(f"compute must be > 0 (log scale); got compute[{i}]={float(c[i])}")
    if (e <= 0).any():
        i = int(np.flatnonzero(e <= 0)[0])
        raise ValueError(f"error must be > 0 (the fit is on log-error); "
                         f"got error[{i}]={float(e[i])}")
    if c.size < len(PARAMS):
        raise ValueError(f"need at least {len(PARAMS)} points to fit {len(PARAMS)} parameters "
                         f"{PARAMS}; got {c.size}")
    return c, e


def predict(params: dict, compute) -> np.ndarray:
    """Evaluate E = a (C + d)^(-b) + c at `compute` for a fit dict (uses its C_ref if present)."""
    c_ref = params.get("c_ref", 1.0)
    x = np.asarray(compute, dtype=float) / c_ref
    a_norm = params.get("a_norm", params["a"] * c_ref ** (-params["b"]))
    d_norm = params.get("d_norm", params["d"] / c_ref)
    return a_norm * (x + d_norm) ** (-params["b"]) + params["c"]


def _model(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The law in normalised units; theta = (log a_norm, b, c, log1p d_norm)."""
    log_a, b, c, u = theta
    return np.exp(log_a - b * np.log(x + np.expm1(u))) + c


def _inits(x: np.ndarray, e: np.ndarray) -> list[np.ndarray]:
    """Starting points on a small grid; a_norm is solved so the curve passes the first point."""
    e0, e_min = e[np.argmin(x)], e.min()
    starts = []
    for b, c_frac, d_norm in itertools.product(
            (0.1, 0.3, 0.7, 1.5), (0.0, 0.5, 0.9), (0.0, 1.0, math.sqrt(x.max()))):
        c = c_frac * e_min
        a_norm = max(e0 - c, 1e-3 * e0) * (x.min() + d_norm) ** b
        starts.append(np.array([math.log(a_norm), b, c, math.log1p(d_norm)]))
    return starts


def _bounds(x: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The search box of theta = (log a_norm, b, c, log1p d_norm): log a_norm within +-200, b in
    _B_BOUNDS, c in [0, min(E)) (log(E - c) finite), d in [0, 10 max(C)]."""
    lower = np.array([-200.0, _B_BOUNDS[0], 0.0, 0.0])
    upper = np.array([200.0, _B_BOUNDS[1], e.min() * (1.0 - _C_MARGIN),
                      math.log1p(10.0 * x.max())])
    return lower, upper


def near_limits(theta, lower, upper, free_lower=()) -> np.ndarray:
    """Per constant: within BOUND_RTOL of its search range (upper - lower, in the fitted
    coordinates) of a limit of the search: the one rule of "at bound" for every fit here (this
    law, approach 3, the transfer links). Indices in `free_lower` have a lower limit that is the
    law's own nested form (a zero floor or shift): a fit may rightly reach it, so it is not a
    limit there."""
    theta, lower, upper = (np.asarray(v, dtype=float) for v in (theta, lower, upper))
    tol = BOUND_RTOL * (upper - lower)
    low = theta - lower <= tol
    low[list(free_lower)] = False
    return low | (upper - theta <= tol)


def _at_bound(theta: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> list[str]:
    """Names at a limit of _bounds (near_limits): log a_norm at +-200, b at its floor or cap, c
    at its ceiling min(E), d at its cap (c = 0 and d = 0 are the law without floor or shift).
    In normalised units, so the same for any unit of C."""
    return [k for k, hit in zip(PARAMS, near_limits(theta, lower, upper, free_lower=(2, 3)))
            if hit]


def _solve(x: np.ndarray, e: np.ndarray, starts: list[np.ndarray], loss: str = "lsq"):
    """Minimise the loss of the log-residuals (bounded, trust region) from every start; return
    the best result. scipy's "huber" with f_scale = delta is delta^2 rho(r^2 / delta^2): r^2
    inside delta, 2 delta |r| - delta^2 outside, i.e. twice the Huber loss."""
    log_e = np.log(e)
    lower, upper = _bounds(x, e)
    best = None
    for start in starts:
        start = np.clip(start, lower + 1e-12, upper - 1e-12)
        res = least_squares(lambda t: np.log(_model(t, x)) - log_e, start,
                            bounds=(lower, upper), x_scale="jac", max_nfev=400,
                            loss="huber" if loss == "huber" else "linear", f_scale=HUBER_DELTA)
        if np.isfinite(res.cost) and (best is None or res.cost < best.cost):
            best = res
    if best is None:
        raise RuntimeError(f"power-law fit failed from all {len(starts)} starting points")
    return best


def _to_dict(theta: np.ndarray, c_ref: float, x: np.ndarray, e: np.ndarray, loss: str) -> dict:
    """Convert normalised parameters back to compute units and attach fit diagnostics."""
    log_a, b, c, u = (float(v) for v in theta)
    a_norm, d_norm = math.exp(log_a), math.expm1(u)
    d_norm = 0.0 if d_norm < 1e-9 else d_norm  # at its bound: report an exact 0, not 1e-18
    pred = _model(theta, x)
    return {
        "a": a_norm * c_ref ** b, "b": b, "c": c, "d": d_norm * c_ref,
        "a_norm": a_norm, "d_norm": d_norm, "c_ref": c_ref, "n": int(x.size),
        "x_max": float(x.max()), "e_min": float(e.min()),
        "rmse": float(np.sqrt(np.mean((pred - e) ** 2))),
        "rmse_log": float(np.sqrt(np.mean((np.log(pred) - np.log(e)) ** 2))),
        "loss": loss, "at_bound": _at_bound(theta, *_bounds(x, e)),
    }


def fit_saturating_power_law(compute, error, *, starts: list[np.ndarray] | None = None,
                             loss: str = "lsq") -> dict:
    """Fit E = a (C + d)^(-b) + c (Zhai et al. 2022, Sec. 2.2) with `loss` ("lsq" or "huber",
    see the module docstring); returns a, b, c, d, rmse, rmse_log, n, loss and at_bound (the
    names at a limit of the search, see _at_bound)."""
    check_loss(loss)
    c, e = _check_points(compute, error)
    c_ref = float(c.min())
    x = c / c_ref
    res = _solve(x, e, starts if starts is not None else _inits(x, e), loss)
    return _to_dict(res.x, c_ref, x, e, loss)


def _theta(params: dict) -> np.ndarray:
    """The normalised parameter vector of a fit dict (a warm start for refits)."""
    return np.array([math.log(params["a_norm"]), params["b"], params["c"],
                     math.log1p(params["d_norm"])])


def bootstrap_fit(compute, error, *, n_boot: int = 200, level: float = 0.95, seed: int = 0,
                  method: str = "residuals", loss: str = "lsq") -> dict:
    """Bootstrap the law's parameters (fitted with `loss`); returns the point fit, samples and
    percentile intervals."""
    check_loss(loss)
    if method not in ("residuals", "cases"):
        raise ValueError(f"method={method!r}; expected 'residuals' or 'cases'")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level!r}")
    c, e = _check_points(compute, error)
    fit = fit_saturating_power_law(c, e, loss=loss)
    rng = np.random.default_rng(seed)
    pred = predict(fit, c)
    # Residual bootstrap keeps the compute design fixed (the frontier points are not i.i.d.
    # draws); log-residuals are centred and inflated by sqrt(n / (n - p)) for the p fitted
    # parameters, the usual small-sample correction.
    resid = np.log(e) - np.log(pred)
    resid = (resid - resid.mean()) * math.sqrt(c.size / max(c.size - len(PARAMS), 1))
    warm = [_theta(fit)]  # refits start at the point estimate: data differ only by noise
    samples, failed = [], 0
    for _ in range(n_boot):
        if method == "residuals":
            cb, eb = c, pred * np.exp(rng.choice(resid, size=c.size, replace=True))
        else:
            idx = rng.integers(0, c.size, size=c.size)
            cb, eb = c[idx], e[idx]
        if np.unique(cb).size < len(PARAMS):
            failed += 1  # a case resample with too few distinct computes cannot be fitted
            continue
        try:
            samples.append(fit_saturating_power_law(cb, eb, starts=warm, loss=loss))
        except (ValueError, RuntimeError):
            failed += 1
    return _summarise_bootstrap(fit, samples, failed, level, n_boot, method)


def _summarise_bootstrap(fit, samples, failed, level, n_boot, method) -> dict:
    """Percentile intervals of each parameter over the bootstrap refits."""
    keys = PARAMS + ("a_norm", "d_norm")
    arrays = {k: np.array([s[k] for s in samples]) for k in keys}
    q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    intervals = {k: ((float(np.percentile(arrays[k], q[0])), float(np.percentile(arrays[k], q[1])))
                     if samples else (math.nan, math.nan)) for k in PARAMS}
    at_bound_frac = {k: (float(np.mean([k in s["at_bound"] for s in samples])) if samples
                         else 0.0) for k in PARAMS}
    return {"fit": fit, "samples": arrays, "c_ref": fit["c_ref"], "intervals": intervals,
            "at_bound_frac": at_bound_frac,
            "level": level, "n_boot": n_boot, "n_ok": len(samples), "n_failed": failed,
            "method": method}


def at_bound(boot: dict) -> list[str]:
    """Names at a limit of the search (_at_bound) in the point fit or in at least
    BOUND_FRACTION of the bootstrap refits: the fit wanted to go further than the law allows."""
    frac = boot.get("at_bound_frac", {})
    return [k for k in PARAMS
            if k in boot["fit"]["at_bound"] or frac.get(k, 0.0) >= BOUND_FRACTION]


# Judged by quantities without C's unit, so the same for C in FLOPs, exaFLOPs or images: never
# raw a, whose unit is C^b (its spread grows as C_ref^(b_hi - b_lo)); what a adds is judged
# through the prediction band (analysis.fit.determined).
D_LOOSE = 1.0  # d loose when its interval is wider than the data's compute range (C_max - C_min)
C_LOOSE = 0.25  # c loose when its interval is wider than c and a quarter of the lowest error


def poorly_determined(boot: dict) -> list[str]:
    """Constants the bootstrap cannot pin down, judged unit-free: b with an interval wider than
    b, c with one wider than c and than C_LOOSE x the lowest error fitted, d with one wider
    than D_LOOSE x the compute range; any with no finite interval. Never a (unit C^b)."""
    fit, iv = boot["fit"], boot["intervals"]
    span = fit["c_ref"] * (fit["x_max"] - 1.0)  # C_max - C_min
    limit = {"b": abs(fit["b"]), "c": max(abs(fit["c"]), C_LOOSE * fit["e_min"]),
             "d": D_LOOSE * span}
    out = []
    for k in ("b", "c", "d"):
        lo, hi = iv[k]
        if not (math.isfinite(lo) and math.isfinite(hi)) or hi - lo > limit[k]:
            out.append(k)
    return out


def prediction_band(boot: dict, compute) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise percentile band of the law's prediction over bootstrap samples."""
    s = boot["samples"]
    x = np.asarray(compute, dtype=float)[None, :] / boot["c_ref"]
    curves = (s["a_norm"][:, None] * (x + s["d_norm"][:, None]) ** (-s["b"][:, None])
              + s["c"][:, None])
    q = (100 * (1 - boot["level"]) / 2, 100 * (1 + boot["level"]) / 2)
    return np.percentile(curves, q[0], axis=0), np.percentile(curves, q[1], axis=0)


def pareto_frontier(compute, error, *, rtol: float = 0.0) -> np.ndarray:
    """Indices of the compute-optimal points (lower error than every point with <= compute),
    sorted by compute; NaN points are ignored.

    With rtol > 0, compute values within a factor (1 + rtol) count as equal: a point is also
    dominated by a slightly costlier one with lower error. Runs of one nominal budget differ by a
    few percent in real FLOPs (whole steps), and none of them should win by being 2% cheaper.
    """
    c = np.asarray(compute, dtype=float).ravel()
    e = np.asarray(error, dtype=float).ravel()
    if c.shape != e.shape:
        raise ValueError(f"compute has {c.size} values but error has {e.size}")
    if not rtol >= 0:
        raise ValueError(f"rtol must be >= 0; got {rtol!r}")
    valid = np.flatnonzero(np.isfinite(c) & np.isfinite(e))
    order = valid[np.lexsort((e[valid], c[valid]))]  # by compute, ties by error
    cs, es = c[order], e[order]
    # lowest error among points costing at most c_i (1 + rtol), for every i
    reach = np.searchsorted(cs, cs * (1 + rtol), side="right") - 1
    within = np.minimum.accumulate(es)[reach] if es.size else es
    keep, best = [], math.inf
    for i, e_i, floor in zip(order, es, within):
        if e_i < best and e_i <= floor:
            keep.append(i)
            best = e_i
    return np.array(keep, dtype=int)


def extrapolation_check(compute, error, *, holdout_fraction: float = 0.2,
                        min_train: int = 5, loss: str = "lsq") -> dict:
    """Fit (with `loss`) on all but the top `holdout_fraction` of points by compute and predict
    those."""
    check_loss(loss)
    c = np.asarray(compute, dtype=float).ravel()
    e = np.asarray(error, dtype=float).ravel()
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1); got {holdout_fraction!r}")
    order = np.argsort(c)
    n_hold = max(1, math.ceil(holdout_fraction * c.size))
    n_train = c.size - n_hold
    out = {"n": int(c.size), "n_train": n_train, "n_holdout": n_hold,
           "holdout_fraction": holdout_fraction, "loss": loss}
    if n_train < max(min_train, len(PARAMS)):
        out.update(ok=False, message=(
            f"too few frontier points to check extrapolation: {c.size} points leave {n_train} "
            f"for fitting after holding out {n_hold}; need at least {max(min_train, 4)}"))
        return out
    train, hold = order[:n_train], order[n_train:]
    fit = fit_saturating_power_law(c[train], e[train], loss=loss)
    pred = predict(fit, c[hold])
    rel = (pred - e[hold]) / e[hold]
    out.update(ok=True, fit=fit, holdout_compute=c[hold], holdout_error=e[hold],
               holdout_pred=pred, rel_error=rel,
               mean_abs_rel_error=float(np.mean(np.abs(rel))),
               max_abs_rel_error=float(np.max(np.abs(rel))),
               message=f"fit on {n_train} points, predicted the {n_hold} largest-compute ones")
    return out


def outliers(params: dict, compute, error, *, k: float = 3.0) -> list[int]:
    """Indices of points whose log-residual from the fit exceeds k robust sds (1.4826 x the
    median absolute deviation of the residuals), and at least HUBER_DELTA: the points a robust
    fit has set aside."""
    r = np.log(predict(params, compute)) - np.log(np.asarray(error, dtype=float))
    scale = 1.4826 * float(np.median(np.abs(r - np.median(r))))
    return [int(i) for i in np.flatnonzero(np.abs(r) > max(k * scale, HUBER_DELTA))]


def fit_loglinear(x, y) -> dict:
    """Least-squares fit of y = y_ref * (x / x_ref)^k in log-log space, x_ref = geometric mean
    of x (e.g. optimal params vs compute); returns k, y_ref, x_ref, n."""
    lx = np.log(np.asarray(x, dtype=float))
    ly = np.log(np.asarray(y, dtype=float))
    if lx.size < 2 or np.unique(lx).size < 2:
        raise ValueError(f"need at least 2 distinct x values for a log-log fit; got {lx.size}")
    # Centred x: the intercept is y at the mean x, finite however steep the slope.
    k, log_y_ref = np.polyfit(lx - lx.mean(), ly, 1)
    return {"k": float(k), "y_ref": float(math.exp(log_y_ref)),
            "x_ref": float(math.exp(lx.mean())), "n": int(lx.size)}


def predict_loglinear(params: dict, x) -> np.ndarray:
    """Evaluate a fit_loglinear result at x."""
    return params["y_ref"] * (np.asarray(x, dtype=float) / params["x_ref"]) ** params["k"]

"""Compute-optimal model size from a parametric fit of every run: Chinchilla's approach 3,
E(N, D) = E0 + A N^-alpha + B D^-beta and N_opt(C) by their Eq. 4 (Hoffmann et al. 2022,
Sec. 3.3), with the Huber fit of Besiroglu et al. 2024.

Owns the fit, its run-clustered bootstrap intervals and the N_opt(C) line drawn beside approach
2's. Loss, bounds, clusters and the derivation of N_opt: analysis/README.md ("Compute-optimal
size: parametric fit").
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from analysis.fit.law import BOUND_FRACTION, near_limits
from analysis.fit.memo import plain
from analysis.fit.noise import LEVEL, aggregate_seeds
from analysis.load.runs import Results
from scaling.branch import trunk_dir
from scaling.flops import FLOPS_PER_MAC_TRAINING

PARAMS = ("E0", "A", "B", "alpha", "beta")
METHOD = "parametric"
LAW = "E = E0 + A N^-alpha + B D^-beta"
HUBER_DELTA = 1e-3  # on log-error residuals (Hoffmann et al. 2022, Sec. 3.3)
MIN_POINTS = 5  # one per constant; fewer cannot be fitted
MIN_SIZES = 2  # alpha needs two sizes, beta two amounts of data
EXP_BOUNDS = (0.0, 3.0)  # alpha, beta: Hoffmann et al.'s start grid spans 0..2
LOG_TERM_SPAN = (-20.0, 5.0)  # log A, log B (normalised) relative to log of the mean error


def parametric_points(res: Results) -> pd.DataFrame:
    """Final evals of finished runs (seeds averaged, one row per recipe) with params,
    images_seen, error, macs_per_image and `cluster` (the bootstrap's resampling unit)."""
    ev = res.evals
    ok = ((ev["status"] == "ok") & ev["is_final"].astype(bool) & (ev["error"] > 0)
          & (pd.to_numeric(ev["params"], errors="coerce") > 0) & (ev["images_seen"] > 0))
    pts = aggregate_seeds(ev[ok])
    if pts.empty:
        return pts.assign(cluster=pd.Series(dtype=str))
    trunk_of = trunk_clusters(res)
    first_run = pts["run"] if "run" in pts else pd.Series([None] * len(pts))
    pts["cluster"] = [trunk_of.get(r, rec) for r, rec in zip(first_run, pts["recipe"])]
    return pts.reset_index(drop=True)


def trunk_clusters(res: Results) -> dict:
    """{branch run: "trunk:" + its trunk's recipe}: the branches of one trunk (of any seed: a
    trunk's recipe leaves the seed out) form one cluster."""
    root = Path(res.results_dir).resolve()
    recipe = dict(zip(res.runs["run"], res.runs["recipe"]))
    out = {}
    for s in res.spend:
        if s.trunk_run and s.run in res.branches:
            path = trunk_dir(root / s.run, s.trunk_run).resolve()
            try:
                trunk = str(path.relative_to(root))
            except ValueError:  # a trunk outside the results dir: its path is its name
                trunk = str(path)
            out[s.run] = "trunk:" + str(recipe.get(trunk, trunk))
    return out


def _design(points: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(log n, log d, log E, refs): N and D over their geometric means, as logs."""
    ln_n = np.log(points["params"].to_numpy(float))
    ln_d = np.log(points["images_seen"].to_numpy(float))
    log_e = np.log(points["error"].to_numpy(float))
    refs = {"n_ref": float(np.exp(ln_n.mean())), "d_ref": float(np.exp(ln_d.mean()))}
    return ln_n - ln_n.mean(), ln_d - ln_d.mean(), log_e, refs


def _bounds(log_e: np.ndarray) -> list[tuple[float, float]]:
    """Bounds of theta = (E0, log A, log B, alpha, beta), normalised units: E0 in [0, min E]."""
    mid = float(log_e.mean())
    term = (mid + LOG_TERM_SPAN[0], mid + LOG_TERM_SPAN[1])
    return [(0.0, float(np.exp(log_e.min()))), term, term, EXP_BOUNDS, EXP_BOUNDS]


def _objective(theta, ln_n, ln_d, log_e):
    """Huber loss of the log-residuals (divided by delta, so its gradient is O(points)) and its
    gradient in theta."""
    e0, la, lb, al, be = theta
    ta, tb = np.exp(la - al * ln_n), np.exp(lb - be * ln_d)
    pred = e0 + ta + tb
    r = np.log(pred) - log_e
    small = np.abs(r) <= HUBER_DELTA
    loss = np.where(small, 0.5 * r * r / HUBER_DELTA, np.abs(r) - 0.5 * HUBER_DELTA)
    dr = np.where(small, r / HUBER_DELTA, np.sign(r)) / pred  # d loss / d pred
    grad = np.array([dr.sum(), (dr * ta).sum(), (dr * tb).sum(),
                     -(dr * ta * ln_n).sum(), -(dr * tb * ln_d).sum()])
    return float(loss.sum()), grad


def _starts(log_e: np.ndarray) -> list[np.ndarray]:
    """The start grid: exponents and E0 (a share of the smallest error) on a grid; the rest of
    the mean error split evenly between the A and B terms at the mean size and data (27
    starts; Besiroglu et al. use 4,500 over unnormalised N and D, where the scale of A and B
    must be searched too)."""
    e_min, e_mean = float(np.exp(log_e.min())), float(np.exp(log_e.mean()))
    out = []
    for al, be, e0_frac in itertools.product((0.15, 0.5, 1.2), (0.15, 0.5, 1.2),
                                             (0.0, 0.5, 0.9)):
        e0 = e0_frac * e_min
        half = max(e_mean - e0, 1e-3 * e_mean) / 2
        out.append(np.array([e0, math.log(half), math.log(half), al, be]))
    return out


def _solve(ln_n, ln_d, log_e, starts) -> np.ndarray | None:
    """The best L-BFGS-B minimum over `starts` (clipped into the bounds); None if none is
    finite."""
    bounds = _bounds(log_e)
    lo, hi = np.array(bounds).T
    best, best_f = None, math.inf
    for start in starts:
        x0 = np.clip(start, lo, hi)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            res = minimize(_objective, x0, args=(ln_n, ln_d, log_e), jac=True,
                           method="L-BFGS-B", bounds=bounds,
                           options={"maxiter": 1000, "ftol": 1e-10, "gtol": 1e-7})
        if np.isfinite(res.fun) and res.fun < best_f:
            best, best_f = res.x, float(res.fun)
    return best


def _physical(theta: np.ndarray, refs: dict) -> dict:
    """Constants in units of params and images (A = A_norm n_ref^alpha, B likewise)."""
    e0, la, lb, al, be = (float(v) for v in theta)
    return {"E0": e0, "A": math.exp(la + al * math.log(refs["n_ref"])),
            "B": math.exp(lb + be * math.log(refs["d_ref"])), "alpha": al, "beta": be}


def _at_bound(theta: np.ndarray, bounds) -> np.ndarray:
    """Per constant: at a limit of the search (analysis.fit.law.near_limits, the rule of every
    fit here); E0 = 0 is the law without a floor, as the frontier law's c = 0, not a limit."""
    lo, hi = np.array(bounds).T
    return near_limits(theta, lo, hi, free_lower=(0,))


def predict_parametric(params: dict, n, d) -> np.ndarray:
    """E0 + A N^-alpha + B D^-beta at params `n` and images `d` (arrays broadcast); `params`: a
    fit_parametric result or its "params"."""
    p = params.get("params", params) if "E0" not in params else params
    if p is None:
        raise ValueError(f"no fitted constants to predict with: {params.get('reason')}")
    n = np.asarray(n, dtype=float)
    d = np.asarray(d, dtype=float)
    return p["E0"] + p["A"] * n ** -p["alpha"] + p["B"] * d ** -p["beta"]


def exponent_of(p: dict) -> float:
    """beta / (alpha + beta): N_opt ∝ C^this (Hoffmann et al. 2022, Eq. 4); NaN when both are 0."""
    s = p["alpha"] + p["beta"]
    return p["beta"] / s if s > 0 else math.nan


def n_opt(fit: dict, compute, params: dict | None = None) -> np.ndarray:
    """N_opt at `compute` FLOPs (module docstring) from a fit_parametric result, with its
    constants or with `params` (a bootstrap draw)."""
    p = params or fit["params"]
    al, be = p["alpha"], p["beta"]
    k = np.asarray(compute, dtype=float) / (FLOPS_PER_MAC_TRAINING * fit["macs_per_param"])
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        log_g = (math.log(al * p["A"]) - math.log(be * p["B"])) / (al + be)
        return np.exp(log_g + be / (al + be) * np.log(k))


def n_opt_band(fit: dict, compute, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise percentile band of N_opt(C) over the bootstrap refits."""
    curves = np.array([n_opt(fit, compute, p) for p in fit["samples"]])
    curves = curves[np.isfinite(curves).all(axis=1)]
    q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    return np.percentile(curves, q[0], axis=0), np.percentile(curves, q[1], axis=0)


def _unfittable(points: pd.DataFrame) -> str | None:
    """Why `points` cannot be fitted, or None."""
    n = len(points)
    sizes = points["params"].nunique() if n else 0
    amounts = points["images_seen"].nunique() if n else 0
    if n < MIN_POINTS:
        return (f"{n} run(s) with a final eval (seeds averaged); the {len(PARAMS)} constants of "
                f"{LAW} need at least {MIN_POINTS}")
    if sizes < MIN_SIZES or amounts < MIN_SIZES:
        return (f"{sizes} model size(s) and {amounts} amount(s) of data among the {n} final "
                f"evals; {LAW} needs at least {MIN_SIZES} of each to separate alpha and beta")
    return None


def fit_parametric(points: pd.DataFrame, n_boot: int = 200, seed: int = 0,
                   level: float = LEVEL, memo=plain) -> dict:
    """Fit E(N, D) (module docstring) to `points` (columns params, images_seen, error; optional
    cluster: the bootstrap's resampling unit, default one per row; macs_per_image: for N_opt's
    level). Returns ok, params, intervals, at_bound, exponent, interval, n_points, n_clusters,
    n_boot, n_boot_ok, samples, macs_per_param, refs, rmse_log; or ok False with a reason.
    `memo` (analysis.fit.memo) remembers the result by the points' values. Runs on one BLAS
    thread: the many small L-BFGS solves ran ~30x slower with threaded BLAS on a busy 2-core
    machine (measured: 25 s against 0.75 s for one point fit)."""
    n = len(points)
    cols = [points[c].to_numpy(float) if c in points else np.full(n, np.nan)
            for c in ("params", "images_seen", "error", "macs_per_image")]
    cluster = points["cluster"] if "cluster" in points else pd.Series(range(n))
    codes = pd.factorize(cluster.astype(str))[0].astype(float)  # first-seen order: same draws
    return memo(fit_arrays, *cols, codes, n_boot=n_boot, seed=seed, level=level)


def fit_arrays(params, images_seen, error, macs_per_image, cluster, *, n_boot: int, seed: int,
               level: float) -> dict:
    """fit_parametric on columns as arrays (the memo keys on them); `cluster` as numbers."""
    points = pd.DataFrame({"params": params, "images_seen": images_seen, "error": error,
                           "cluster": np.asarray(cluster).astype(int)})
    if np.isfinite(np.asarray(macs_per_image, dtype=float)).any():
        points["macs_per_image"] = macs_per_image
    with threadpool_limits(1):
        return _fit(points, n_boot, seed, level)


def _fit(points: pd.DataFrame, n_boot: int, seed: int, level: float) -> dict:
    reason = _unfittable(points)
    out = {"ok": False, "method": METHOD, "law": LAW, "params": None, "intervals": None,
           "at_bound": [], "exponent": None, "interval": None, "n_points": len(points),
           "level": level, "reason": reason}
    if reason:
        return out
    ln_n, ln_d, log_e, refs = _design(points)
    theta = _solve(ln_n, ln_d, log_e, _starts(log_e))
    if theta is None:
        return {**out, "reason": "the Huber fit failed from every start of the grid"}
    fit = _physical(theta, refs)
    pred = np.log(predict_parametric(fit, points["params"], points["images_seen"]))
    macs = (points["macs_per_image"] / points["params"]).to_numpy(float) \
        if "macs_per_image" in points else np.array([math.nan])
    out.update(ok=True, params=fit, exponent=exponent_of(fit), refs=refs,
               rmse_log=float(np.sqrt(np.mean((pred - log_e) ** 2))),
               macs_per_param=float(np.nanmedian(macs)) if np.isfinite(macs).any() else None)
    boot = _bootstrap(points, theta, n_boot, seed)
    flagged = _at_bound(theta, _bounds(log_e))
    share = np.mean(boot["at_bound"], axis=0) if len(boot["at_bound"]) else 0 * flagged
    out["at_bound"] = [k for k, f, s in zip(PARAMS, flagged, share) if f or s >= BOUND_FRACTION]
    q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    draws = boot["samples"]
    if len(draws) >= 2:
        cols = {k: np.array([s[k] for s in draws]) for k in PARAMS}
        out["intervals"] = {k: [float(v) for v in np.percentile(cols[k], q)] for k in PARAMS}
        expo = np.array([exponent_of(s) for s in draws])
        expo = expo[np.isfinite(expo)]
        out["interval"] = [float(v) for v in np.percentile(expo, q)] if len(expo) else None
    return {**out, "samples": draws, "n_boot": n_boot, "n_boot_ok": len(draws),
            "n_clusters": boot["n_clusters"]}


def _bootstrap(points: pd.DataFrame, theta: np.ndarray, n_boot: int, seed: int) -> dict:
    """Refits to resamples of whole clusters, each from the point fit (as
    analysis.fit.law.bootstrap_fit does: on test data, refits from 6 grid starts found the same
    exponent to 1e-6)."""
    rng = np.random.default_rng(seed)
    cluster = (points["cluster"] if "cluster" in points else pd.Series(range(len(points))))
    codes, names = pd.factorize(cluster.astype(str))
    members = [np.flatnonzero(codes == i) for i in range(len(names))]
    samples, at_bound = [], []
    for _ in range(n_boot):
        pick = rng.integers(0, len(members), size=len(members))
        sub = points.iloc[np.concatenate([members[i] for i in pick])]
        if _unfittable(sub):
            continue  # too few distinct sizes or amounts of data in this resample
        ln_n, ln_d, log_e, refs = _design(sub)
        t = _solve(ln_n, ln_d, log_e, [_renormalised(theta, points, sub)])
        if t is not None:
            samples.append(_physical(t, refs))
            at_bound.append(_at_bound(t, _bounds(log_e)))
    return {"samples": samples, "at_bound": at_bound, "n_clusters": len(members)}


def _renormalised(theta: np.ndarray, points: pd.DataFrame, sub: pd.DataFrame) -> np.ndarray:
    """The point fit's theta in the normalised units of the resample `sub`."""
    _, _, _, r0 = _design(points)
    _, _, _, r1 = _design(sub)
    e0, la, lb, al, be = theta
    return np.array([e0, la - al * math.log(r1["n_ref"] / r0["n_ref"]),
                     lb - be * math.log(r1["d_ref"] / r0["d_ref"]), al, be])

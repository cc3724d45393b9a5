"""Upstream to downstream in two steps (the model ladder of Bhagia et al. 2024): a transfer
metric's error as a function of the upstream eval loss, fitted across the other runs, then asked
for the largest size's final transfer error from its loss alone, next to the direct fits'
backtests of the same runs (analysis.fit.backtest).

Owns the two link forms (sigmoid, shifted power law), their choice, the run-clustered bootstrap
interval of each prediction and the ladder entries. Forms, points and entries: analysis/README.md
("Upstream to downstream").
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from scipy.optimize import least_squares
from scipy.special import expit
from threadpoolctl import threadpool_limits

from analysis.fit import transfer
from analysis.fit.backtest import backtest, frontier_method, parametric_method, split
from analysis.fit.frontier import frontier_points
from analysis.fit.law import near_limits
from analysis.fit.memo import plain
from analysis.fit.noise import LEVEL, wilson_interval
from analysis.fit.parametric import trunk_clusters
from analysis.load.runs import Results

FORMS = ("sigmoid", "shifted_power")
FORM_TEXT = {"sigmoid": "E = c + a / (1 + exp(-k (L - L0)))",
             "shifted_power": "E = c + a (L - L0)^g, L0 below every loss seen"}
PARAMS = {"sigmoid": ("c", "a", "k", "L0"), "shifted_power": ("c", "a", "g", "L0")}
MIN_POINTS = 8  # two per constant of either form
MIN_RUNS = 3  # points of at least 3 runs: a curve through one or two runs' checkpoints is theirs
# Fitted coordinates: u = (L - min L) / (max L - min L), so the bounds hold in any unit of loss.
_BOUNDS = {"sigmoid": ([0.0, 1e-6, 1e-2, -3.0], [1.0, 1.0, 1e2, 4.0]),  # c, a, k, u0
           "shifted_power": ([0.0, 1e-6, 0.05, -7.0], [1.0, 10.0, 8.0, 2.3])}  # c, a, g, ln d


def _model(form: str, theta: np.ndarray, u: np.ndarray) -> np.ndarray:
    c, a, p, q = theta
    if form == "sigmoid":
        return c + a * expit(p * (u - q))
    return c + a * (u + np.exp(q)) ** p  # L0 = min L - exp(q) span


def _starts(form: str, y: np.ndarray) -> list[np.ndarray]:
    lo, hi = float(y.min()), float(y.max())
    out = []
    if form == "sigmoid":
        for c0, k, u0 in itertools.product((0.0, 0.9 * lo), (1.0, 5.0, 20.0), (0.25, 0.5, 1.0)):
            out.append(np.array([c0, max(hi - c0, 1e-3) * 2, k, u0]))
    else:
        for c0, g, d in itertools.product((0.0, 0.5 * lo, 0.9 * lo), (0.5, 1.0, 2.0),
                                          (0.01, 0.1, 1.0)):
            out.append(np.array([c0, max(hi - c0, 1e-3) / (1 + d) ** g, g, np.log(d)]))
    return out


def _solve(form: str, u: np.ndarray, y: np.ndarray, starts) -> np.ndarray | None:
    """The least-squares minimum (residuals in error units) over `starts`; None if none."""
    lo, hi = (np.array(b, dtype=float) for b in _BOUNDS[form])
    best, best_cost = None, np.inf
    for s in starts:
        x0 = np.clip(s, lo + 1e-9 * (hi - lo), hi - 1e-9 * (hi - lo))
        with np.errstate(over="ignore", invalid="ignore"):
            r = least_squares(lambda t: _model(form, t, u) - y, x0, bounds=(lo, hi),
                              method="trf", max_nfev=400)
        if np.isfinite(r.cost) and r.cost < best_cost:
            best, best_cost = r.x, float(r.cost)
    return best


def _at_bound(form: str, theta: np.ndarray) -> list[str]:
    """Constants at a limit of the search (analysis.fit.law.near_limits); c = 0, an error floor
    of zero, is a value, not a limit."""
    lo, hi = _BOUNDS[form]
    return [k for k, f in zip(PARAMS[form], near_limits(theta, lo, hi, free_lower=(0,))) if f]


def _physical(form: str, theta: np.ndarray, l_min: float, span: float) -> dict:
    """Constants in loss units (L0, k or the exponent g)."""
    c, a, p, q = (float(v) for v in theta)
    if form == "sigmoid":
        return {"c": c, "a": a, "k": p / span, "L0": l_min + q * span}
    return {"c": c, "a": a / span ** p, "g": p, "L0": l_min - float(np.exp(q)) * span}


def link(form: str, params: dict, loss) -> np.ndarray:
    """The fitted link's transfer error at upstream `loss` (nats)."""
    loss = np.asarray(loss, dtype=float)
    if form == "sigmoid":
        return params["c"] + params["a"] * expit(params["k"] * (loss - params["L0"]))
    with np.errstate(invalid="ignore"):
        return params["c"] + params["a"] * np.clip(loss - params["L0"], 0, None) ** params["g"]


def fit_link(points: pd.DataFrame, n_boot: int = 200, seed: int = 0,
             level: float = LEVEL) -> dict:
    """Both forms fitted to `points` (columns loss, error, cluster), the one of smaller residual
    RMSE chosen (both have 4 constants, so this is also the smaller AIC), with bootstrap refits
    of the chosen form over resampled clusters. Returns ok, form, forms {form: ok, params,
    rmse, at_bound}, n_points, n_clusters, samples (constants per refit); or ok False, reason."""
    n, runs = len(points), points["cluster"].nunique() if len(points) else 0
    out = {"ok": False, "form": None, "forms": {}, "n_points": n, "n_clusters": int(runs),
           "samples": [], "level": level, "reason": None}
    if n < MIN_POINTS or runs < MIN_RUNS:
        return {**out, "reason": (f"{n} (checkpoint, transfer) point(s) of {runs} run group(s); "
                                  f"the link needs at least {MIN_POINTS} points of {MIN_RUNS}")}
    loss, y = points["loss"].to_numpy(float), points["error"].to_numpy(float)
    l_min, span = float(loss.min()), float(np.ptp(loss))
    if span <= 0:
        return {**out, "reason": "every point has the same upstream loss: no slope to fit"}
    u = (loss - l_min) / span
    thetas = {}
    for form in FORMS:
        theta = _solve(form, u, y, _starts(form, y))
        if theta is None:
            out["forms"][form] = {"ok": False}
            continue
        thetas[form] = theta
        rmse = float(np.sqrt(np.mean((_model(form, theta, u) - y) ** 2)))
        out["forms"][form] = {"ok": True, "params": _physical(form, theta, l_min, span),
                              "rmse": rmse, "at_bound": _at_bound(form, theta)}
    if not thetas:
        return {**out, "reason": "neither form could be fitted from any start"}
    form = min(thetas, key=lambda f: out["forms"][f]["rmse"])
    samples = _bootstrap(form, points, thetas[form], n_boot, seed)
    return {**out, "ok": True, "form": form, "samples": samples, "n_boot": n_boot}


def _bootstrap(form, points, theta, n_boot, seed) -> list[dict]:
    """Refits of `form` to resampled clusters (whole runs, whole trunks), each from the point
    fit; constants in loss units."""
    rng = np.random.default_rng(seed)
    codes, names = pd.factorize(points["cluster"].astype(str))
    members = [np.flatnonzero(codes == i) for i in range(len(names))]
    loss, y = points["loss"].to_numpy(float), points["error"].to_numpy(float)
    l_min, span = float(loss.min()), float(np.ptp(loss))
    out = []
    for _ in range(n_boot):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        lb, yb = loss[idx], y[idx]
        if np.ptp(lb) <= 0 or len(set(codes[idx])) < 2:
            continue
        t = _solve(form, (lb - l_min) / span, yb, [theta])
        if t is not None:
            out.append(_physical(form, t, l_min, span))
    return out


def predict_interval(fit: dict, loss, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of the link's prediction at `loss` over the bootstrap refits (NaN
    with fewer than 2 refits)."""
    loss = np.atleast_1d(np.asarray(loss, dtype=float))
    if len(fit["samples"]) < 2:
        return np.full(loss.shape, np.nan), np.full(loss.shape, np.nan)
    draws = np.array([link(fit["form"], p, loss) for p in fit["samples"]])
    q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    return np.nanpercentile(draws, q[0], axis=0), np.nanpercentile(draws, q[1], axis=0)


# -- the ladder of one transfer metric -------------------------------------------------------------

def link_points(res: Results, evals: pd.DataFrame) -> pd.DataFrame:
    """Every (run, step) of a transfer metric's eval table (`evals`, analysis.fit.transfer.
    transfer_evals) that has an upstream eval loss too, with the run's columns and `cluster`
    (the run's recipe; branches: their trunk's)."""
    pts = evals.drop(columns=["loss"])
    up = res.evals[["run", "step", "loss"]]
    pts = pts.merge(up, on=["run", "step"], how="inner")
    pts = pts[np.isfinite(pts["loss"].astype(float)) & np.isfinite(pts["error"].astype(float))
              & pts["status"].isin(("ok", "running"))]
    trunk_of = trunk_clusters(res)
    pts = pts.assign(cluster=[trunk_of.get(r, rec) for r, rec in zip(pts["run"], pts["recipe"])])
    return pts.reset_index(drop=True)


def _held_finals(held_pts: pd.DataFrame) -> pd.DataFrame:
    """The left-out runs' final points, seeds averaged per recipe (loss and error means)."""
    fin = held_pts[held_pts["is_final"].astype(bool) & (held_pts["status"] == "ok")]
    return (fin.groupby("recipe", sort=True)
            .agg(model=("model", "first"), params=("params", "first"),
                 images_seen=("images_seen", "first"), flops_seen=("flops_seen", "mean"),
                 loss=("loss", "mean"), error=("error", "mean"), n_seeds=("run", "nunique"),
                 num_samples=("num_samples", "min"))
            .reset_index().sort_values(["images_seen", "recipe"], kind="stable"))


def _chained_losses(res: Results, x: str) -> dict:
    """{(params, images_seen): upstream loss predicted by approach 3 fitted to the other sizes'
    final losses} for the largest size's final points; empty with the reason under None."""
    points = frontier_points(transfer.loss_evals(res.evals), x)
    entry = backtest(points, [parametric_method()], x, kinds=("largest_size",))
    entry = entry["parametric:largest_size"]
    if entry["rel_errors"] is None:
        return {None: entry["reason"]}
    return {(float(p["params"]), float(p["images"])): float(p["predicted"])
            for p in entry["predictions"]}


def _direct(evals: pd.DataFrame, x: str, loss: str, memo) -> dict:
    """The direct fits' largest-size backtests on a transfer metric's eval table
    (analysis.fit.backtest)."""
    methods = [frontier_method(x, loss=loss, memo=memo), parametric_method()]
    out = backtest(frontier_points(evals, x), methods, x, kinds=("largest_size",))
    return {k.split(":")[0]: {"mean_abs_rel_error": e["mean_abs_rel_error"],
                              "n_predicted": len(e["predictions"]),
                              "predictions": e["predictions"], "reason": e["reason"]}
            for k, e in out.items()}


def ladder_entry(res: Results, rows: pd.DataFrame, metric_text: str, *, x: str = "flops",
                 loss: str = "huber", memo=plain, n_boot: int = 200, seed: int = 0,
                 chained: dict | None = None) -> dict:
    """The two-step prediction of one transfer metric (schema: analysis/README.md)."""
    metric = transfer.parse_metric(metric_text)
    out = {"metric": metric_text, "held_out": None, "form": None, "forms": {},
           "n_points": 0, "n_runs": 0, "predictions": [], "mean_abs_rel_error": None,
           "mean_abs_rel_error_chained": None, "direct": {}, "chained_reason": None,
           "reason": None}
    evals = transfer.transfer_evals(res, rows, metric)  # once: the link's and the direct fits'
    pts = link_points(res, evals)
    parts = split(pts, "largest_size") if len(pts) else "no checkpoint has both measured"
    if isinstance(parts, str):
        return {**out, "reason": parts}
    train, held, label = parts
    out["held_out"] = label
    fit = fit_link(train, n_boot=n_boot, seed=seed)
    out.update(form=fit["form"], forms=fit["forms"], n_points=fit["n_points"],
               n_runs=int(train["run"].nunique()),
               direct=_direct(evals, x, loss, memo))
    if not fit["ok"]:
        return {**out, "reason": f"no link without {label}: {fit['reason']}"}
    finals = _held_finals(pts[pts["params"] == held["params"].max()])
    if finals.empty:
        return {**out, "reason": f"the left-out runs ({label}) have no finished final point"}
    p = fit["forms"][fit["form"]]["params"]
    pred = link(fit["form"], p, finals["loss"])
    lo, hi = predict_interval(fit, finals["loss"])
    m_lo, m_hi = wilson_interval(finals["error"].to_numpy(float),
                                 finals["num_samples"].to_numpy(float))
    chained = _chained_losses(res, x) if chained is None else chained
    out["chained_reason"] = chained.get(None)
    preds = []
    for i, r in enumerate(finals.itertuples(index=False)):
        l_hat = chained.get((float(r.params), float(r.images_seen)))
        e_hat = float(link(fit["form"], p, l_hat)) if l_hat is not None else None
        preds.append({"model": r.model, "params": r.params, "images": r.images_seen,
                      "compute": r.flops_seen, "n_seeds": int(r.n_seeds), "loss": r.loss,
                      "error": r.error, "num_test": int(r.num_samples),
                      "error_interval": [float(m_lo[i]), float(m_hi[i])],
                      "predicted": float(pred[i]),
                      "interval": [float(lo[i]), float(hi[i])],
                      "rel_error": float((pred[i] - r.error) / r.error) if r.error > 0 else None,
                      "loss_predicted": l_hat, "predicted_chained": e_hat,
                      "rel_error_chained": (e_hat - r.error) / r.error
                      if e_hat is not None and r.error > 0 else None})
    rel = [q["rel_error"] for q in preds if q["rel_error"] is not None]
    rel_c = [q["rel_error_chained"] for q in preds if q["rel_error_chained"] is not None]
    if out["chained_reason"] is None and not rel_c:
        out["chained_reason"] = "approach 3 on the loss predicted none of these final points"
    return {**out, "predictions": preds,
            "mean_abs_rel_error": float(np.mean(np.abs(rel))) if rel else None,
            "mean_abs_rel_error_chained": float(np.mean(np.abs(rel_c))) if rel_c else None,
            "link_samples": fit["samples"], "link_points": pts}


def run_ladders(res: Results, rows: pd.DataFrame, *, x: str = "flops", loss: str = "huber",
                memo=plain, n_boot: int = 200, seed: int = 0) -> dict[str, dict]:
    """{metric: ladder_entry} for every transfer metric `rows` hold (none: empty). The chained
    step 1 (approach 3 on the upstream loss) is fitted once and shared. One BLAS thread, as the
    backtests (many small solves)."""
    names = transfer.metric_names(rows)
    if not names:
        return {}
    with threadpool_limits(1):
        chained = _chained_losses(res, x)
        return {m: ladder_entry(res, rows, m, x=x, loss=loss, memo=memo, n_boot=n_boot,
                                seed=seed, chained=chained) for m in names}

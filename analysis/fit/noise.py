"""Measurement noise: binomial intervals on every eval point (the Wilson score interval, Wilson
1927; for a mean of per-image values such as --metric loss, the t interval from their sd), and
the runs of one recipe (seeds) averaged into one point with their spread.

Why these intervals and how they combine (transfer points' `probe_half` included):
analysis/README.md ("Measurement noise and seeds").
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

LEVEL = 0.95
GROUP = ("recipe", "step")
# Columns that are one value per recipe: kept from its first row (`run`, `run_id`: the first
# seed's run; `runs` names them all).
_FIRST = ("sweep", "run_id", "run", "model", "size", "patch", "params", "macs_per_image",
          "budget", "lr", "batch_size", "epoch")
_MEAN = ("images_seen", "flops_seen", "wall_s", "device_hours", "top1", "top5", "loss", "error")
# A table with this column holds means of per-image values (--metric loss: `error` is the mean
# eval loss, SD_COLUMN the per-image sd behind it), not proportions: a point's interval is the
# t interval of the mean (mean_interval) in the wilson_lo/hi columns, and nothing is capped at 1.
SD_COLUMN = "value_sd"


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level!r}")
    return float(stats.norm.ppf(0.5 + level / 2))


def wilson_interval(p, n, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a proportion p observed on n trials (arrays broadcast):
    centre (p + z^2 / 2n) / (1 + z^2 / n), half-width z / (1 + z^2 / n) sqrt(p (1 - p) / n +
    z^2 / 4n^2). NaN where p is not in [0, 1] or n is not > 0."""
    p = np.asarray(p, dtype=float)
    n = np.asarray(n, dtype=float)
    z = _z(level)
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = 1.0 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z / denom * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    bad = ~((p >= 0) & (p <= 1) & (n > 0))
    lo = np.where(bad, np.nan, np.clip(centre - half, 0.0, 1.0))
    hi = np.where(bad, np.nan, np.clip(centre + half, 0.0, 1.0))
    return lo, hi


def mean_interval(mean, sd, n, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """t interval of a mean of n per-image values with sample sd `sd` (arrays broadcast):
    mean +- t_{n-1} sd / sqrt(n), the lower end floored at 0 (losses are >= 0). NaN where sd is
    missing or negative or n < 2."""
    mean, sd, n = (np.asarray(v, dtype=float) for v in (mean, sd, n))
    _z(level)  # the same check of `level`
    with np.errstate(invalid="ignore", divide="ignore"):
        half = stats.t.ppf(0.5 + level / 2, np.where(n >= 2, n - 1, np.nan)) * sd / np.sqrt(n)
    bad = ~((sd >= 0) & (n >= 2) & np.isfinite(mean))
    return (np.where(bad, np.nan, np.maximum(mean - half, 0.0)),
            np.where(bad, np.nan, mean + half))


def point_interval(error, n, sd=None, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """One eval point's interval: Wilson on a proportion, or mean_interval when `sd` (the
    SD_COLUMN of a table of means) is given."""
    if sd is None:
        return wilson_interval(error, n, level)
    return mean_interval(error, sd, n, level)


def _seed_spread(ev: pd.DataFrame, grouped, level: float) -> pd.DataFrame:
    """Per group: the t interval of the mean error across its seeds (seed_lo, seed_hi) and the
    sd of log-error (log_err_sd); NaN for one seed, and for a group with a NaN error."""
    k = grouped["error"].size().to_numpy()
    mean = grouped["error"].mean().to_numpy()
    sd = grouped["error"].std(ddof=1).to_numpy()
    ok = (k >= 2) & (grouped["error"].count().to_numpy() == k)
    t = stats.t.ppf(0.5 + level / 2, np.maximum(k - 1, 1))
    half = t * sd / np.sqrt(k)
    positive = (ev["error"] > 0).groupby([ev[c] for c in GROUP], sort=False,
                                          dropna=False).all().to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        log_err = np.log(ev["error"].where(ev["error"] > 0))
    log_sd = log_err.groupby([ev[c] for c in GROUP], sort=False, dropna=False).std(ddof=1)
    cap = np.inf if SD_COLUMN in ev else 1.0  # a mean loss has no ceiling
    return pd.DataFrame({"seed_lo": np.where(ok, np.maximum(mean - half, 0.0), np.nan),
                         "seed_hi": np.where(ok, np.minimum(mean + half, cap), np.nan),
                         "log_err_sd": np.where(ok & positive, log_sd.to_numpy(), np.nan)})


def _joined(texts: np.ndarray, rank: np.ndarray, codes: np.ndarray, sep: str) -> list[str]:
    """Per group code 0..n-1: its `texts` ordered by `rank` (ties: row order), joined."""
    order = np.lexsort((rank, codes))
    texts, codes = texts[order], codes[order]
    cut = np.flatnonzero(np.diff(codes)) + 1
    return [sep.join(part) for part in np.split(texts, cut)]


def _seed_texts(seed: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Each row's seed as text ("3", not "3.0") and its rank (NaN last)."""
    codes, uniques = pd.factorize(seed, sort=True, use_na_sentinel=True)
    texts = np.array([_seed_text(v) for v in uniques] + ["nan"], dtype=object)
    return texts[codes], np.where(codes < 0, len(uniques), codes)


def _seed_text(v) -> str:
    return str(int(v)) if pd.notna(v) and v == int(v) else str(v)


def _status(ev: pd.DataFrame, index: pd.MultiIndex) -> np.ndarray:
    """Per group: "ok" when every row is ok, else its first other status."""
    other = ev[ev["status"] != "ok"]
    first = other.groupby([other[c] for c in GROUP], sort=False, dropna=False)["status"].first()
    return first.reindex(index).fillna("ok").to_numpy()


def aggregate_seeds(evals: pd.DataFrame, level: float = LEVEL) -> pd.DataFrame:
    """One row per (recipe, step): the seeds' rows averaged (`_MEAN` columns), with `n_seeds`,
    `seeds` ("0,1"), `runs`, `num_samples` (the fewest images of its evals), `status` ("ok" when
    every seed finished, else the first other status), `is_final` (every seed's last eval) and
    the intervals of the module docstring: wilson_lo/hi, seed_lo/hi (NaN for one seed),
    err_lo/err_hi. Rows without a recipe (tables built by hand) count as their own recipe."""
    if evals.empty:
        return evals.assign(n_seeds=pd.Series(dtype=int), err_lo=pd.Series(dtype=float),
                            err_hi=pd.Series(dtype=float))
    ev = evals.copy()
    if "recipe" not in ev:
        ev["recipe"] = ev["run"] if "run" in ev else np.arange(len(ev)).astype(str)
    ev["recipe"] = ev["recipe"].fillna(ev.get("run", pd.Series(index=ev.index, dtype=str)))
    if "step" not in ev:
        ev["step"] = np.arange(len(ev))
    agg = {c: (c, "first") for c in _FIRST if c in ev}
    agg |= {c: (c, "mean") for c in _MEAN if c in ev}
    for col, how in (("num_samples", "min"), ("is_final", "all"), ("probe_seeds", "min"),
                     ("probe_sd", "mean"), ("probe_half", "mean"), (SD_COLUMN, "mean")):
        if col in ev:
            agg[col] = (col, how)
    agg["n_seeds"] = ("error", "size")
    grouped = ev.groupby(list(GROUP), sort=False, dropna=False)
    out = grouped.agg(**agg)
    codes = grouped.ngroup().to_numpy()  # groups numbered as `out` lists them
    if "seed" in ev:
        out.insert(out.columns.get_loc("n_seeds"), "seeds",
                   _joined(*_seed_texts(ev["seed"]), codes, ","))
    if "run" in ev:
        rank, names = pd.factorize(ev["run"].map(str), sort=True)
        out["runs"] = _joined(names.to_numpy(dtype=object)[rank], rank, codes, "; ")
    if "status" in ev:
        out["status"] = _status(ev, out.index)
    out = out.reset_index()
    out = pd.concat([out, _seed_spread(ev, grouped, level)], axis=1)
    n = out.get("num_samples", np.nan)
    out["wilson_lo"], out["wilson_hi"] = point_interval(out["error"], n, out.get(SD_COLUMN), level)
    out["err_lo"] = np.fmin(out["wilson_lo"], out["seed_lo"])
    out["err_hi"] = np.fmax(out["wilson_hi"], out["seed_hi"])
    if "probe_half" in out:  # a transfer metric: the draws of the k-shot set
        out["err_lo"] = np.fmin(out["err_lo"], (out["error"] - out["probe_half"]).clip(lower=0))
        out["err_hi"] = np.fmax(out["err_hi"], (out["error"] + out["probe_half"]).clip(upper=1))
    return out


def with_intervals(points: pd.DataFrame, level: float = LEVEL) -> pd.DataFrame:
    """`points` with err_lo/err_hi (and n_seeds = 1) filled in where they are missing: raw eval
    rows (failed runs' points) get their Wilson (or mean_interval) interval."""
    pts = points.copy()
    if "n_seeds" not in pts:
        pts["n_seeds"] = 1
    n = pts.get("num_samples", np.nan)
    lo, hi = point_interval(pts["error"], n, pts.get(SD_COLUMN), level)
    for col, val in (("err_lo", lo), ("err_hi", hi)):
        pts[col] = pts[col].fillna(pd.Series(val, index=pts.index)) if col in pts else val
    return pts


def seeds_per_point(points: pd.DataFrame) -> dict:
    """{"counts": {"1": points with one seed, ...}, "min", "max"}, for the summaries."""
    if points.empty or "n_seeds" not in points:
        return {"counts": {}, "min": None, "max": None}
    n = points["n_seeds"].astype(int)
    return {"counts": {str(k): int(v) for k, v in n.value_counts().sort_index().items()},
            "min": int(n.min()), "max": int(n.max())}


def close_calls(points: pd.DataFrame, frontier: pd.DataFrame, col: str,
                rtol: float = 0.05) -> pd.DataFrame:
    """Frontier points whose size is not told apart from another size at the same compute:
    for each frontier point and each other model with a point within a factor (1 + rtol) of its
    compute, the best such point, when the two intervals (err_lo..err_hi) overlap."""
    rows = []
    for f in frontier.itertuples(index=False):
        c = getattr(f, col)
        near = points[(points["model"] != f.model) & (points[col] <= c * (1 + rtol))
                      & (points[col] >= c / (1 + rtol))]
        near = near[(near["err_lo"] <= f.err_hi) & (near["err_hi"] >= f.err_lo)]
        for model, grp in near.groupby("model", sort=False):
            o = grp.loc[grp["error"].idxmin()]
            rows.append({"compute": c, "model": f.model, "error": f.error, "lo": f.err_lo,
                         "hi": f.err_hi, "other": model, "other_error": o["error"],
                         "other_lo": o["err_lo"], "other_hi": o["err_hi"]})
    cols = ["compute", "model", "error", "lo", "hi", "other", "other_error", "other_lo",
            "other_hi"]
    return pd.DataFrame(rows, columns=cols)

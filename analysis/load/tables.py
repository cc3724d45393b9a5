"""The tidy tables of analysis.load.runs built in one pass over all runs (one DataFrame per run
cost seconds on thousands of runs): the eval rows of every run with the run's columns repeated,
and the params and MACs filled in for runs that lack them (analysis.load.runs's module docstring)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.load.metrics_file import EVAL_FIELDS
from scaling.flops import FLOPS_PER_MAC_TRAINING

EVAL_COLUMNS = (
    "sweep", "run_id", "run", "model", "size", "patch", "status", "seed", "lr", "batch_size",
    "budget", "recipe", "params", "macs_per_image", "step", "epoch", "images_seen",
    "flops_seen", "wall_s", "device_hours", "top1", "top5", "loss", "num_samples", "loss_sd",
    "error", "is_final",
)
STATUS_RUNNING = "running"
# The x axes a plot can use (--x) and the column of the tables each one reads.
X_COLUMNS = {"flops": "flops_seen", "images": "images_seen", "device_hours": "device_hours"}

_COL = {name: j for j, name in enumerate(EVAL_FIELDS)}
# Eval columns that repeat a value of the run.
_RUN_VALUES = ("sweep", "run_id", "run", "model", "size", "patch", "status", "seed", "lr",
               "batch_size", "budget", "recipe")


def _macs_from_rows(rows: np.ndarray) -> float:
    """MACs per image recovered from the rows: median of flops_seen / (6 x images_seen)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        macs = rows[:, _COL["flops_seen"]] / (FLOPS_PER_MAC_TRAINING * rows[:, _COL["images_seen"]])
    macs[macs == np.inf] = np.nan
    return float(np.nanmedian(macs)) if (~np.isnan(macs)).any() else np.nan


def _device_hours(runs: list[dict], idx: np.ndarray, wall_s: np.ndarray) -> np.ndarray:
    """Device hours at each eval row (the approximation of analysis.load.runs's docstring): the
    run's device hours x wall_s / its wall time, else wall_s / 3600 x world size, else NaN."""
    spread = np.array([r["device_hours"] is not None and bool(r["wall_hours"]) for r in runs])
    world = np.array([bool(r["_world_size"]) for r in runs]) & ~spread
    dh = np.array([r["device_hours"] if s else np.nan for r, s in zip(runs, spread)], float)
    wh = np.array([r["wall_hours"] if s else np.nan for r, s in zip(runs, spread)], float)
    ws = np.array([r["_world_size"] if w else np.nan for r, w in zip(runs, world)], float)
    out = np.full(wall_s.shape, np.nan)
    a, b = spread[idx], world[idx]
    out[a] = dh[idx[a]] * wall_s[a] / (wh[idx[a]] * 3600.0)
    out[b] = wall_s[b] / 3600.0 * ws[idx[b]]
    return out


def _repeat(values: list, idx: np.ndarray) -> pd.Series:
    """One value per run -> one per eval row (the dtype pandas infers from the values)."""
    return pd.Series(values).take(idx).reset_index(drop=True)


def eval_table(runs: list[dict], blocks: list[np.ndarray],
               run_df: pd.DataFrame) -> pd.DataFrame:
    """The eval rows of every run with the run's columns repeated on each; params as filled in
    `run_df`, MACs from the rows when the run has none."""
    keep = [i for i, b in enumerate(blocks) if len(b)]
    if not keep:
        return pd.DataFrame(columns=EVAL_COLUMNS)
    runs, blocks = [runs[i] for i in keep], [blocks[i] for i in keep]
    counts = np.array([len(b) for b in blocks])
    idx = np.repeat(np.arange(len(runs)), counts)
    values = np.vstack(blocks)
    cols = {name: values[:, j] for j, name in enumerate(EVAL_FIELDS)}
    for key in _RUN_VALUES:
        cols[key] = _repeat([r[key] for r in runs], idx)
    cols["params"] = run_df["params"].to_numpy()[keep][idx]
    cols["macs_per_image"] = _repeat([_macs_from_rows(b) if r["macs_per_image"] is None
                                      else r["macs_per_image"] for r, b in zip(runs, blocks)],
                                     idx)
    cols["device_hours"] = _device_hours(runs, idx, cols["wall_s"])
    cols["error"] = 1.0 - cols["top1"]
    cols["is_final"] = np.zeros(len(idx), dtype=bool)
    cols["is_final"][np.cumsum(counts) - 1] = [r["status"] != STATUS_RUNNING
                                               and not r.get("_trunk") for r in runs]
    return pd.DataFrame(cols, columns=list(EVAL_COLUMNS))


def fill_params(runs: pd.DataFrame, blocks: list[np.ndarray]) -> None:
    """Give unfinished runs the params of a finished run of the same model and sweep, and MACs
    from their eval rows."""
    known = runs.dropna(subset=["params"]).groupby(["sweep", "model"])["params"].median()
    keys = pd.MultiIndex.from_arrays([runs["sweep"], runs["model"]])
    fill = pd.Series(known.reindex(keys).to_numpy(dtype=float), index=runs.index)
    runs["params"] = runs["params"].astype(float).fillna(fill)
    macs = [_macs_from_rows(b) if len(b) else np.nan for b in blocks]
    runs["macs_per_image"] = runs["macs_per_image"].astype(float).fillna(
        pd.Series(macs, index=runs.index, dtype=float))



"""The loader as it was before the fast line path and the cache (analysis/load/runs.py at commit
7cf0d5d), kept unchanged as the reference that analysis.bench.load times and
tests/test_analysis_speed.py compares the fast loader with. Not used by the analysis itself.
How it parses and where it differs: analysis/README.md ("What the loader skips").
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.load import checks
from analysis.load.checks import final_problem
from analysis.load.runs import (
    EVAL_COLUMNS,
    RUN_COLUMNS,
    STATUS_RUNNING,
    NoResultsError,
    Results,
    flops_budget,
    read_plan,
    recipe_key,
)
from analysis.load.skips import Skipped, read_error, skip
from scaling.flops import FLOPS_PER_MAC_TRAINING
from scaling.results import (
    CONFIG_FILE,
    FINAL_FILE,
    METRICS_FILE,
    SchemaError,
    iter_run_dirs,
    read_final,
    read_json,
    validate_row,
)
from scaling.vitconfig import split_name


def eval_row_problem(row: dict) -> str | None:
    """The eval checks without the FREE_NUMBERS one (see the module docstring)."""
    return checks.eval_row_problem(row, numbers=False)


def _parse_lines(path: Path, data: bytes, skipped: list[Skipped]) -> list[tuple[int, dict]]:
    """(line number, row) of every schema-valid line; the others are skipped, each named."""
    lines = data.splitlines()
    rows = []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict):
                raise SchemaError(f"expected a JSON object, got {type(row).__name__}")
            rows.append((i, validate_row(row)))
        except UnicodeDecodeError as e:
            skip(skipped, path, f"not UTF-8 text ({e})", i)
        except json.JSONDecodeError as e:
            torn = " (torn last line: an interrupted append)" if i == len(lines) else ""
            skip(skipped, path, f"not valid JSON{torn}: {e}", i)
        except SchemaError as e:
            skip(skipped, path, e, i)
    return rows


def _read_metrics(run_dir: Path, skipped: list[Skipped]) -> list[dict]:
    """The usable eval rows of a run, by the rules of the module docstring; every line left
    out is reported and counted once, naming file, line and reason."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    try:
        data = path.read_bytes()
    except OSError as e:
        skip(skipped, path, e)
        return []
    by_step: dict[int, list[tuple[int, dict]]] = defaultdict(list)
    for i, row in _parse_lines(path, data, skipped):
        if row["kind"] != "eval":
            continue
        problem = eval_row_problem(row)
        if problem and problem.startswith("step="):
            skip(skipped, path, problem, i)
        else:
            by_step[int(row["step"])].append((i, row))
    kept = []
    for step, group in sorted(by_step.items()):
        texts = [json.dumps(row, sort_keys=True) for _, row in group]
        if len(set(texts)) > 1:  # one step, different numbers: none of them can be trusted
            where = ", ".join(str(i) for i, _ in group)
            for i, row in group:
                problem = eval_row_problem(row)
                skip(skipped, path, problem or (
                    f"eval step {step} is logged {len(group)} times with different values "
                    f"(lines {where}): none of them is kept"), i)
            continue
        first, row = group[0]
        problem = eval_row_problem(row)
        for i, _ in group:
            if problem:
                skip(skipped, path, problem, i)
            elif i != first:
                skip(skipped, path, f"exact copy of the eval row of step {step} on line "
                                     f"{first} (kept once)", i)
        if not problem:
            kept.append(row)
    return kept


def _read_run(run_dir: Path, skipped: list[Skipped]) -> tuple[dict, list[dict]] | None:
    """Read one run dir into (run record, eval rows); None if it cannot be interpreted."""
    try:
        config = read_json(run_dir / CONFIG_FILE)
        size, patch = split_name(config.get("model"))
    except (SchemaError, OSError, UnicodeDecodeError, ValueError) as e:
        path = run_dir / CONFIG_FILE
        skip(skipped, path, f"{read_error(path, e)}; run skipped")
        return None
    path = run_dir / FINAL_FILE
    try:
        final = read_final(run_dir)
        problem = final_problem(final) if final is not None else None
        if problem:
            raise SchemaError(problem)
    except (SchemaError, OSError, UnicodeDecodeError) as e:
        # Without a trustworthy final.json the run's status is unknown: skip it, never guess.
        skip(skipped, path, f"{read_error(path, e)}; run skipped")
        return None
    evals = _read_metrics(run_dir, skipped)
    plan = read_plan(run_dir, skipped)
    final = {**plan, **{k: v for k, v in (final or {}).items() if v is not None}}
    run = {
        "sweep": run_dir.parent.name, "run_id": run_dir.name,
        "run": f"{run_dir.parent.name}/{run_dir.name}", "model": config["model"],
        "size": size, "patch": patch, "status": final.get("status", STATUS_RUNNING),
        "seed": config.get("seed"), "lr": config.get("lr"), "batch_size": config.get("batch_size"),
        "budget": flops_budget(config), "recipe": recipe_key(run_dir.parent.name, config),
        "params": final.get("params"), "macs_per_image": final.get("macs_per_image"),
        "n_evals": len(evals), "final_top1": final.get("final_top1"),
        "images_seen": final.get("images_seen"), "total_flops": final.get("total_flops"),
        "wall_hours": final.get("wall_hours"), "device_hours": final.get("device_hours"),
        "message": final.get("error"),
        "_world_size": final.get("world_size") or config.get("world_size"),
    }
    return run, evals


def _device_hours(run: dict, wall_s: np.ndarray) -> np.ndarray:
    """Device hours at each eval row (see the module docstring for the approximation)."""
    dh, wh = run["device_hours"], run["wall_hours"]
    if dh is not None and wh:
        return dh * wall_s / (wh * 3600.0)
    if run["_world_size"]:
        return wall_s / 3600.0 * run["_world_size"]
    return np.full(wall_s.shape, np.nan)


def _eval_frame(run: dict, evals: list[dict]) -> pd.DataFrame:
    """The eval rows of one run as a DataFrame with the run's columns repeated."""
    df = pd.DataFrame(evals).reindex(columns=["step", "epoch", "images_seen", "flops_seen",
                                              "wall_s", "top1", "top5", "loss",
                                              "num_samples", "loss_sd"])
    df = df.astype(float).sort_values(["step", "images_seen"], kind="stable")
    for key in EVAL_COLUMNS:
        if key in run and key not in df:
            df[key] = run[key]
    if run["macs_per_image"] is None:
        with np.errstate(divide="ignore", invalid="ignore"):
            macs = df["flops_seen"] / (FLOPS_PER_MAC_TRAINING * df["images_seen"])
            macs = macs.replace(np.inf, np.nan)
        df["macs_per_image"] = float(macs.median()) if macs.notna().any() else np.nan
    df["device_hours"] = _device_hours(run, df["wall_s"].to_numpy())
    df["error"] = 1.0 - df["top1"]
    df["is_final"] = False
    if run["status"] != STATUS_RUNNING and len(df):
        df.iloc[-1, df.columns.get_loc("is_final")] = True
    return df


def _fill_params(runs: pd.DataFrame, evals: pd.DataFrame) -> None:
    """Give unfinished runs the params of a finished run of the same model and sweep."""
    known = runs.dropna(subset=["params"]).groupby(["sweep", "model"])["params"].median()
    for frame in (runs, evals):
        keys = list(zip(frame["sweep"], frame["model"]))
        fill = pd.Series([known.get(k, np.nan) for k in keys], index=frame.index)
        frame["params"] = frame["params"].astype(float).fillna(fill)
    macs = evals.groupby("run")["macs_per_image"].first()
    runs["macs_per_image"] = runs["macs_per_image"].astype(float).fillna(runs["run"].map(macs))


def load_results(results_dir) -> Results:
    """Read every run under `results_dir` into tidy eval and run tables (see module docstring)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise NoResultsError(f"results dir {str(root)!r} does not exist or is not a directory")
    run_dirs = list(iter_run_dirs(root))
    if not run_dirs:
        raise NoResultsError(f"no runs under {str(root)!r}: no <sweep>/<run>/{CONFIG_FILE} found")
    skipped: list[Skipped] = []
    runs, frames = [], []
    for run_dir in run_dirs:
        read = _read_run(run_dir, skipped)
        if read is None:
            continue
        run, evals = read
        frame = _eval_frame(run, evals)
        run["best_top1"] = float(frame["top1"].max()) if frame["top1"].notna().any() else math.nan
        runs.append(run)
        frames.append(frame)
    if not runs:
        raise NoResultsError(f"none of the {len(run_dirs)} runs under {str(root)!r} could be "
                             f"read; skipped: {[s.path for s in skipped]}")
    run_df = pd.DataFrame(runs).reindex(columns=RUN_COLUMNS)
    eval_df = pd.concat([f for f in frames if len(f)] or [pd.DataFrame(columns=EVAL_COLUMNS)],
                        ignore_index=True).reindex(columns=EVAL_COLUMNS)
    _fill_params(run_df, eval_df)
    for frame in (run_df, eval_df):  # config values: numbers, so the parquet columns are typed
        for col in ("seed", "lr", "batch_size"):
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    run_df["final_top1"] = run_df["final_top1"].astype(float)  # null (no eval) -> NaN
    eval_df["is_final"] = eval_df["is_final"].astype(bool)
    return Results(root, eval_df, run_df, skipped)

"""summary.json: the numbers of summary.md for programs (schema: analysis/README.md,
"summary.json"). Every value is valid JSON: a NaN or infinity is written as null."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.fit import law as F
from analysis.fit.frontier import x_column
from analysis.fit.noise import LEVEL, seeds_per_point
from analysis.load.runs import status_counts
from analysis.load.skips import count_skipped
from analysis.report.style import X_UNITS
from analysis.report.summary_backtest import backtest_json
from analysis.report.summary_data import Report
from analysis.report.summary_ladder import ladder_json
from analysis.report.summary_law import determination_json
from analysis.report.summary_parametric import parametric_json
from analysis.report.summary_transfer import transfer_json

SCHEMA_VERSION = 1
LAW = "E = a (C + d)^(-b) + c"


def clean(value):
    """`value` with numpy scalars and arrays as Python ones and NaN/inf as None, recursively."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray, pd.Series)):
        return [clean(v) for v in list(value)]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    if pd.isna(value):
        return None
    return str(value)


def _fit(result: dict, frontier: pd.DataFrame, x: str) -> dict:
    out = {"method": result["loss"], "law": LAW, "params": None, "intervals": None,
           "poorly_determined": [], "n_points": result.get("n", 0), "rmse_log": None,
           "comparison": None, "outliers": [], "why": result.get("why"), "reason": None,
           **determination_json(result)}
    if not result["ok"]:
        return {**out, "reason": result["message"]}
    boot, fit, alt = result["boot"], result["fit"], result["alt"]
    pts = frontier[frontier["error"] > 0].reset_index(drop=True).iloc[result["outliers"]]
    return {**out, "params": {k: fit[k] for k in F.PARAMS},
            "intervals": {k: list(boot["intervals"][k]) for k in F.PARAMS},
            "poorly_determined": F.poorly_determined(boot), "rmse_log": fit["rmse_log"],
            "n_boot": boot["n_boot"], "n_boot_ok": boot["n_ok"],
            "comparison": {"method": alt["loss"], "params": {k: alt[k] for k in F.PARAMS},
                           "rmse_log": alt["rmse_log"],
                           "max_rel_diff": result["alt_max_rel_diff"]},
            "outliers": [{"model": m, "compute": c, "error": e} for m, c, e in
                         zip(pts["model"], pts[x_column(x)], pts["error"])]}


def _extrapolation(result: dict) -> dict:
    ex = result.get("extrapolation") if result["ok"] else None
    out = {"method": "top-20%-held-out", "fit_method": result["loss"],
           "mean_abs_rel_error": None, "max_abs_rel_error": None, "points": [], "reason": None}
    if ex is None or not ex["ok"]:
        return {**out, "reason": (ex or result)["message"]}
    points = [{"compute": c, "error": e, "predicted": p, "rel_error": r} for c, e, p, r in
              zip(ex["holdout_compute"], ex["holdout_error"], ex["holdout_pred"],
                  ex["rel_error"])]
    return {**out, "method": f"top-{round(100 * ex['holdout_fraction'])}%-held-out",
            "n_train": ex["n_train"], "n_holdout": ex["n_holdout"],
            "mean_abs_rel_error": ex["mean_abs_rel_error"],
            "max_abs_rel_error": ex["max_abs_rel_error"], "points": points}


def _optimal(res: dict) -> dict:
    fit = res["fit"]
    per_budget = [{k: p[k] for k in ("compute", "params_opt", "bound", "interval", "n_sizes",
                                     "seeds", "models", "best_model", "tied")}
                  | {k: p.get(k) for k in ("vertex_position", "size_span", "flags", "left_out")}
                  for p in res["profiles"]]
    return {"method": res["method"], "compute_unit": "FLOPs (config flops budget)",
            "exponent": fit["exponent"] if fit else None,
            "interval": fit["interval"] if fit else None,
            "n_budgets_fitted": fit["n"] if fit else 0, "n_budgets": res["n_budgets"],
            "n_budgets_left_out": sum(1 for p in res["profiles"] if p.get("left_out")),
            "per_budget": per_budget, "monotone": fit["monotone"] if fit else None,
            "reason": res["reason"]}


def _frontier(frontier: pd.DataFrame, x: str) -> list[dict]:
    cols = {"model": "model", x_column(x): "compute", "error": "error", "err_lo": "err_lo",
            "err_hi": "err_hi", "n_seeds": "n_seeds", "num_samples": "num_samples",
            "probe_seeds": "probe_seeds"}
    cols = {k: v for k, v in cols.items() if k in frontier}
    return frontier[list(cols)].rename(columns=cols).to_dict(orient="records")


def build(report: Report) -> dict:
    """The summary.json payload of a Report (analysis.report.summary_data)."""
    res, x = report.results, report.x
    files, lines = count_skipped(report.skipped)
    return clean({
        "schema_version": SCHEMA_VERSION, "results_dir": str(res.results_dir),
        "metric": report.metric, "x": x, "x_unit": X_UNITS[x], "level": LEVEL,
        "transfer": transfer_json(report.transfer_rows, report.metric),
        **report.compute,  # compute_spent, compute_independent (branching)
        "fit": _fit(report.fit, report.frontier, x),
        "extrapolation": _extrapolation(report.fit),
        "optimal_size": _optimal(report.optimal),
        "parametric": parametric_json(report.parametric, report.optimal),
        "backtest": backtest_json(report.backtest),
        "ladder": ladder_json(report.ladder),
        "frontier": _frontier(report.frontier, x),
        "close_calls": report.close_calls.to_dict(orient="records"),
        "runs": status_counts(res.runs),
        "input_bound": list(report.input_bound),
        "seeds_per_point": seeds_per_point(report.frontier),
        "skipped": {"files": files, "lines": lines},
        "figures": [p.name for p in report.figures], "notes": list(report.notes),
    })


def write_summary_json(report: Report, path) -> Path:
    """Write summary.json (strict JSON: allow_nan=False) and return its path."""
    path = Path(path)
    path.write_text(json.dumps(build(report), indent=2, allow_nan=False) + "\n")
    return path

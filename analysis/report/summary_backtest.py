"""summary.md's headline section and summary.json's `backtest`: the laws refitted without the
largest size and without the largest budget, and how well they predicted the runs left out
(analysis.fit.backtest)."""

from __future__ import annotations

from analysis.report.summary_sections import md_table

METHOD_NAMES = {"frontier": "frontier law E(C) = a (C + d)^(-b) + c",
                "parametric": "approach 3, E(N, D) = E0 + A N^-alpha + B D^-beta"}
KIND_NAMES = {"largest_size": "largest size", "largest_budget": "largest FLOPs budget"}
SHOWN = 6  # relative errors listed per row; the rest are in summary.json


def _errors(rel: list[float]) -> str:
    text = ", ".join(f"{100 * r:+.1f}%" for r in rel[:SHOWN])
    return text + (f" and {len(rel) - SHOWN} more" if len(rel) > SHOWN else "")


def _row(e: dict) -> list:
    kind = KIND_NAMES.get(e["left_out"], e["left_out"])
    held = f"{kind} ({e['held_out']})" if e["held_out"] else kind
    name = METHOD_NAMES.get(e["method"], e["method"])
    used = f"{e['n_points_used']} {e['points_used']}" if e["n_points_used"] else "–"
    if e["rel_errors"] is None:
        return [name, held, used, "–", f"not run: {e['reason']}", "–", "–"]
    n = len(e["rel_errors"])
    within = (f"{e['n_within_interval']} of {e['n_with_interval']}"
              if e.get("n_with_interval") else "– (no intervals)")
    return [name, held, used, f"{n} final point{'s' if n != 1 else ''}", _errors(e["rel_errors"]),
            f"{100 * e['mean_abs_rel_error']:.1f}% (bias {100 * e['mean_rel_error']:+.1f}%)",
            within]


def backtest_section(backtest: dict) -> list[str]:
    """The headline: each law's predictions of the runs it was not fitted to."""
    out = ["## Backtest: predicting the largest runs", "",
           ("Each law refitted without the largest model size, and separately without the "
            "largest FLOPs budget, then asked for the left-out runs' final errors; relative "
            "error = (predicted - measured) / measured (analysis/fit/backtest.py). The frontier "
            "law predicts the best error at a compute, so it is asked only about left-out final "
            "points on the frontier of all the runs. \"Inside\": predictions that fall inside "
            "the measured point's own 95% interval (a miss smaller than the measurement's "
            "noise); each prediction's relative error with the range the measured interval "
            "allows is in summary.json. The top-20 %-of-compute hold-out check is further down "
            "(\"Extrapolation check\")."), ""]
    if not backtest:
        return out + ["No backtest was run.", ""]
    rows = [_row(e) for e in backtest.values()]
    return out + md_table(["law", "left out", "fitted on", "predicted", "relative errors",
                           "mean abs. relative error", "inside measured 95%"], rows) + [""]


def backtest_json(backtest: dict) -> dict:
    """summary.json's `backtest`: {"METHOD:KIND": entry} (schema: analysis/README.md)."""
    return {key: dict(e) for key, e in backtest.items()}


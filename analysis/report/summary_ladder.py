"""summary.md's "Upstream to downstream" section and summary.json's `ladder`: each transfer
metric predicted from the upstream loss in two steps (analysis.fit.ladder), next to the direct
fits' backtests of the same left-out size."""

from __future__ import annotations

from analysis.fit.ladder import FORM_TEXT, MIN_POINTS, MIN_RUNS
from analysis.report.summary_sections import md_table, num

SHOWN = 24  # prediction rows listed in summary.md; all are in summary.json

TEXT = (
    "Each transfer metric's error E fitted as a function of the upstream eval cross-entropy L "
    "(nats) over every checkpoint of the other model sizes where both were measured (a "
    "checkpoint's loss is taken to fix its transfer error, however the loss was reached: the "
    "assumption of the two-step ladder of Bhagia et al. 2024), with two forms, the sigmoid "
    f"{FORM_TEXT['sigmoid']} and the shifted power law {FORM_TEXT['shifted_power']}, by least "
    "squares; the one of smaller residual RMSE is used (both have 4 constants, so this is also "
    "the smaller AIC). It then predicts the largest size's final transfer errors (a) from their "
    "measured loss and (b) chained, from the loss that approach 3 fitted to the other sizes' "
    "final losses predicts (nothing of the largest size used). Beside them: the direct fits of "
    "the transfer error against compute, backtested on the same size (frontier law: only final "
    "points on the frontier). Relative error = (predicted - measured) / measured. Intervals are "
    "95%: the prediction's from refits to runs resampled (whole trunks for branches), covering "
    "the fitted link only; the measured error's is Wilson on its test images (analysis/fit/"
    f"ladder.py). The link needs at least {MIN_POINTS} points of {MIN_RUNS} runs.")


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _forms(e: dict) -> str:
    fitted = {f: v for f, v in e["forms"].items() if v.get("ok")}
    text = ", ".join(f"{f.replace('_', ' ')} {100 * v['rmse']:.2f}" for f, v in fitted.items())
    bound = fitted.get(e["form"], {}).get("at_bound")
    return (f"**{e['form'].replace('_', ' ')}** (RMSE %: {text})"
            + (f"; at bound: {', '.join(bound)}" if bound else ""))


def _direct(e: dict, method: str) -> str:
    d = e["direct"].get(method)
    if not d or d["mean_abs_rel_error"] is None:  # the reason's first clause (all in the JSON)
        return "–" if not d else f"not run: {d['reason'].split(' (')[0]}"
    return f"{_pct(d['mean_abs_rel_error'])} ({d['n_predicted']} points)"


def _summary_row(e: dict) -> list:
    if e["form"] is None or not e["predictions"]:
        return [f"`{e['metric']}`", f"not run: {e['reason']}", "–", "–", "–", "–", "–", "–"]
    n = len(e["predictions"])
    chained = (_pct(e["mean_abs_rel_error_chained"]) if e["mean_abs_rel_error_chained"] is not None
               else f"not run: {e['chained_reason']}")
    return [f"`{e['metric']}`", _forms(e), f"{e['n_points']} checkpoints of {e['n_runs']} runs",
            f"{e['held_out']} ({n} final point{'s' if n != 1 else ''})",
            _pct(e["mean_abs_rel_error"]), chained, _direct(e, "frontier"),
            _direct(e, "parametric")]


def _with_interval(v: float, iv: list) -> str:
    """A fraction and its interval in %, e.g. "25.1 [20.3, 30.6]"."""
    return f"{100 * v:.1f} [{num(100 * iv[0], '.1f')}, {num(100 * iv[1], '.1f')}]"


def _prediction_rows(ladder: dict) -> list[list]:
    rows = []
    for e in ladder.values():
        for p in e["predictions"]:
            rows.append([f"`{e['metric']}`", p["model"], num(p["images"]), num(p["loss"], ".4f"),
                         _with_interval(p["error"], p["error_interval"]),
                         _with_interval(p["predicted"], p["interval"]), _pct(p["rel_error"]),
                         num(p["loss_predicted"], ".4f"),
                         "–" if p["predicted_chained"] is None
                         else f"{100 * p['predicted_chained']:.1f}",
                         _pct(p["rel_error_chained"])])
    return rows


def ladder_section(ladder: dict) -> list[str]:
    """The two-step predictions of every transfer metric (none: no section)."""
    if not ladder:
        return []
    out = ["## Upstream to downstream: two-step prediction", "", TEXT, "",
           *md_table(["metric", "link E(L) chosen", "fitted on", "left out",
                      "two-step, measured L: mean abs. rel. error",
                      "two-step, chained: mean abs. rel. error",
                      "direct frontier law", "direct approach 3"],
                     [_summary_row(e) for e in ladder.values()]), ""]
    rows = _prediction_rows(ladder)
    if rows:
        out += ["Per left-out final point (errors in %, seeds of a recipe averaged):", "",
                *md_table(["metric", "model", "images seen", "measured L (nats)",
                           "measured error [95%]", "two-step prediction [95%]", "rel. error",
                           "L predicted by approach 3", "chained prediction",
                           "chained rel. error"], rows[:SHOWN])]
        if len(rows) > SHOWN:
            out.append(f"\n{len(rows) - SHOWN} more rows in summary.json (`ladder`).")
        out.append("")
    return out


def ladder_json(ladder: dict) -> dict:
    """summary.json's `ladder`: {metric: entry} without the bootstrap draws and points (the
    `link_` keys; schema: analysis/README.md)."""
    return {m: {k: v for k, v in e.items() if not k.startswith("link_")}
            for m, e in ladder.items()}

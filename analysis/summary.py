"""summary.md: the numbers behind the figures, in Markdown tables."""

from __future__ import annotations

import math

import pandas as pd

from analysis import fit as F
from analysis.load import count_skipped, status_counts
from analysis.style import X_UNITS

# A rough guide for reading the hold-out error, not a statistical test.
TRUST = ((0.05, "the law extrapolated well"), (0.15, "the law extrapolated roughly"),
         (math.inf, "the law did not extrapolate; do not trust predictions beyond the data"))


def _num(v, fmt: str = ".3g") -> str:
    """Format a number, with '–' for missing values."""
    try:
        if v is None or not math.isfinite(float(v)):
            return "–"
    except (TypeError, ValueError):
        return str(v)
    return format(float(v), fmt)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def sizes_section(sizes: pd.DataFrame, x: str) -> list[str]:
    """Per model size: best top-1, the compute to reach it, params, GMACs/image."""
    rows = [[r.model, f"{r.runs} ({r.ok})", _num(r.params), _num(r.gmacs, ".4g"),
             _num(100 * r.best_top1, ".2f"), _num(r.compute_at_best), r.best_run or "–"]
            for r in sizes.itertuples()]
    head = ["model", "runs (ok)", "params", "GMACs/image", "best top-1 (%)",
            f"{X_UNITS[x]} at best", "best run"]
    return ["## Per model size", "", *_table(head, rows), ""]


def fit_section(result: dict, x: str) -> list[str]:
    """Constants of the law fitted to the frontier, with bootstrap intervals."""
    out = ["## Scaling-law fit", "",
           ("E = a (C + d)^(-b) + c (Zhai et al. 2022, Sec. 2.2), fitted on log-error to the "
           f"compute-optimal frontier; C in {X_UNITS[x]}."), ""]
    if not result["ok"]:
        return out + [f"No fit: {result['message']}.", ""]
    boot, fit = result["boot"], result["fit"]
    level = round(100 * boot["level"])
    iv = boot["intervals"]
    rows = [[k, _num(fit[k], ".4g"), f"[{_num(iv[k][0], '.4g')}, {_num(iv[k][1], '.4g')}]"]
            for k in F.PARAMS]
    out += _table(["constant", "value", f"{level}% bootstrap interval"], rows)
    out += ["", (f"{fit['n']} frontier points; RMSE {_num(fit['rmse'], '.3g')} (error units), "
                f"{boot['n_ok']}/{boot['n_boot']} bootstrap refits ({boot['method']} "
                f"resampling).")]
    loose = F.poorly_determined(boot)
    if loose:
        out.append(f"Poorly determined by these {fit['n']} points: {', '.join(loose)} (a or d "
                   "spanning more than 10x, b or c an interval wider than the value); read the "
                   "curve as a description of the data, not a law to extrapolate.")
    return out + [""]


def size_fit_section(size_fit: dict | None, x: str) -> list[str]:
    """params_opt ∝ C^k, fitted to one point per frontier size, and those points."""
    out = ["## Compute-optimal model size", ""]
    if size_fit is None:
        return out + ["Not fitted: no parameter counts on the frontier.", ""]
    sp = size_fit["points"]
    rows = [[r.model, _num(r.params), r.n_points, _num(r.compute_lo), _num(r.compute_hi),
             _num(r.compute)] for r in sp.itertuples()]
    out += _table(["model", "params", "frontier points", f"first ({X_UNITS[x]})",
                   f"last ({X_UNITS[x]})", "log-midpoint"], rows) + [""]
    if not size_fit["ok"]:
        return out + [f"Not fitted: {size_fit['message']}.", ""]
    return out + [(f"params_opt ≈ {_num(size_fit['y_ref'])} × (C / {_num(size_fit['x_ref'])})"
                   f"^{size_fit['k']:.3f}: least squares in log-log space over {size_fit['n']} "
                   f"model sizes, one point each (the log-midpoint of its frontier range; "
                   f"{size_fit['n_frontier']} frontier points in all)."), ""]


def extrapolation_section(result: dict) -> list[str]:
    """The hold-out check: does the law fitted to small compute predict the largest runs?"""
    out = ["## Extrapolation check", ""]
    ex = result.get("extrapolation") if result["ok"] else None
    if ex is None:
        return out + [f"Not run: {result['message']}.", ""]
    if not ex["ok"]:
        return out + [f"Not run: {ex['message']}.", ""]
    rows = [[_num(c), _num(100 * e, ".2f"), _num(100 * p, ".2f"), f"{100 * r:+.1f}%"]
            for c, e, p, r in zip(ex["holdout_compute"], ex["holdout_error"],
                                  ex["holdout_pred"], ex["rel_error"])]
    verdict = next(text for bound, text in TRUST if ex["mean_abs_rel_error"] < bound)
    out += [(f"Fit on the {ex['n_train']} lowest-compute frontier points, then predicted the "
            f"{ex['n_holdout']} largest-compute ones "
            f"(top {round(100 * ex['holdout_fraction'])}%):"),
            "", *_table(["compute", "error (%)", "predicted (%)", "relative error"], rows), "",
            (f"Mean |relative error| {100 * ex['mean_abs_rel_error']:.1f}% "
            f"(max {100 * ex['max_abs_rel_error']:.1f}%): {verdict} "
            "(guide: < 5% good, < 15% rough)."), ""]
    return out


def paper_section(fits: dict[str, dict]) -> list[str]:
    """The law fitted to the ViT rows of the ViT paper's Table 6."""
    out = ["## Reference: ViT paper Table 6", "",
           ("Dosovitskiy et al. 2021 (arXiv 2010.11929v2), Appendix Table 6; the law fitted to its "
           "ViT rows (error = 1 - accuracy/100, C in exaFLOPs):"), ""]
    rows = []
    for column, res in fits.items():
        iv = res["boot"]["intervals"]
        rows.append([column, res["n"]] + [f"{_num(res['fit'][k], '.4g')} [{_num(iv[k][0])}, "
                                          f"{_num(iv[k][1])}]" for k in F.PARAMS])
    return out + _table(["panel", "ViT points", *F.PARAMS], rows) + [""]


def status_section(runs: pd.DataFrame, skipped: list) -> list[str]:
    """Runs by status, failed/diverged messages, and every skipped file."""
    counts = status_counts(runs)
    out = ["## Runs", "", *_table(list(counts), [list(counts.values())]), ""]
    bad = runs[runs["status"].isin(["failed", "diverged"])]
    for r in bad.itertuples():
        out.append(f"- {r.status}: `{r.run}` ({r.model}): {r.message or 'no message'}")
    files, lines = count_skipped(skipped)
    out += ["", (f"Skipped files: {files}; skipped lines: {lines} (left out of every figure "
                 "and table; rules: analysis/README.md, \"What the loader skips\")")]
    out += [f"- `{s.path}`: {s.reason}" for s in skipped]
    return out + [""]


def render(report: dict) -> str:
    """The whole summary.md for a report dict built by analysis.report.analyse."""
    res = report["results"]
    counts = ", ".join(f"{k} {v}" for k, v in status_counts(res.runs).items())
    files, skipped_lines = count_skipped(report["skipped"])
    lines = ["# Scaling analysis", "",
             (f"Results: `{res.results_dir}`: {len(res.runs)} runs ({counts}), "
             f"{len(res.evals)} eval points, {files} skipped files, {skipped_lines} skipped "
             "lines."), "",
             *sizes_section(report["sizes"], report["x"]),
             *fit_section(report["fit"], report["x"]),
             *size_fit_section(report["size_fit"], report["x"]),
             *extrapolation_section(report["fit"]),
             *paper_section(report["paper_fits"]),
             *status_section(res.runs, report["skipped"]),
             "## Figures", ""]
    lines += [f"- `{p.name}`" for p in report["figures"]]
    lines += [f"- note: {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"

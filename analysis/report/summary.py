"""summary.md: the numbers behind the figures, in Markdown tables."""

from __future__ import annotations

import math

import pandas as pd

from analysis.fit import law as F
from analysis.fit.frontier import x_column
from analysis.load.runs import status_counts
from analysis.load.skips import count_skipped
from analysis.report.figures import FIT_NAMES
from analysis.report.figures_bench import bench_order
from analysis.report.style import X_UNITS
from analysis.report.summary_backtest import backtest_section
from analysis.report.summary_data import Report
from analysis.report.summary_ladder import ladder_section
from analysis.report.summary_law import extrapolation_claim, verdict_lines
from analysis.report.summary_parametric import parametric_section
from analysis.report.summary_sections import (
    bench_section,
    frontier_section,
    isoflop_section,
    md_table,
    noise_section,
    num,
    value_header,
    value_text,
)
from analysis.report.summary_transfer import transfer_section

# A rough guide for reading the hold-out error, not a statistical test.
TRUST = ((0.05, "the law extrapolated well"), (0.15, "the law extrapolated roughly"),
         (math.inf, "the law did not extrapolate; do not trust predictions beyond the data"))


def sizes_section(sizes: pd.DataFrame, x: str) -> list[str]:
    """Per model size: best top-1, the compute to reach it, params, GMACs/image."""
    rows = [[r.model, f"{r.runs} ({r.ok})", num(r.params), num(r.gmacs, ".4g"),
             num(100 * r.best_top1, ".2f"), num(r.compute_at_best), r.best_run or "–"]
            for r in sizes.itertuples()]
    head = ["model", "runs (ok)", "params", "GMACs/image", "best top-1 (%)",
            f"{X_UNITS[x]} at best", "best run"]
    return ["## Per model size", "", *md_table(head, rows), ""]


def _constants(fit: dict, iv: dict | None) -> list[str]:
    """Each constant, with its interval when there is one."""
    return [f"{num(fit[k], '.4g')} [{num(iv[k][0], '.4g')}, {num(iv[k][1], '.4g')}]"
            if iv else num(fit[k], ".4g") for k in F.PARAMS]


def _outliers_line(result: dict, frontier: pd.DataFrame, x: str) -> list[str]:
    """The frontier points the used fit leaves more than 3 robust sd away."""
    if not result["outliers"]:
        return []
    col = x_column(x)
    pts = frontier[frontier["error"] > 0].reset_index(drop=True).iloc[result["outliers"]]
    where = ", ".join(f"{m} at {num(c)}" for m, c in zip(pts["model"], pts[col]))
    return [(f"Points more than 3 robust sd (1.4826 MAD of the log-residuals) from the used "
            f"fit: {where}.")]


def fit_section(result: dict, x: str, frontier: pd.DataFrame | None = None) -> list[str]:
    """Constants of the law fitted to the frontier with the chosen loss (and why), with
    bootstrap intervals; the other loss's constants; points the used fit set aside."""
    out = ["## Scaling-law fit", "",
           ("E = a (C + d)^(-b) + c (Zhai et al. 2022, Sec. 2.2), fitted on log-error to the "
           f"compute-optimal frontier; C in {X_UNITS[x]}."), ""]
    if not result["ok"]:
        return out + [f"No fit: {result['message']}.", ""]
    boot, fit, alt = result["boot"], result["fit"], result["alt"]
    level = round(100 * boot["level"])
    out += [f"Fit used: **{FIT_NAMES[result['loss']]}**, {result['why']}.", ""]
    rows = [[f"{FIT_NAMES[result['loss']]} (used)", *_constants(fit, boot["intervals"]),
             num(fit["rmse_log"])],
            [f"{FIT_NAMES[alt['loss']]} (comparison)", *_constants(alt, None),
             num(alt["rmse_log"])]]
    out += md_table(["fit", *(f"{k} [{level}% bootstrap]" for k in F.PARAMS),
                   "RMS log-residual"], rows)
    out += ["", (f"{fit['n']} frontier points; {boot['n_ok']}/{boot['n_boot']} bootstrap refits "
                 f"({boot['method']} resampling). The two fits' predictions differ by up to "
                 f"{100 * result['alt_max_rel_diff']:.1f}% over the data's compute range.")]
    if frontier is not None:
        out += _outliers_line(result, frontier, x)
    return out + ["", *verdict_lines(result), ""]


def extrapolation_section(result: dict, metric: str = "error") -> list[str]:
    """The hold-out check: does the law fitted to small compute predict the largest runs?"""
    out = ["## Extrapolation check", ""]
    ex = result.get("extrapolation") if result["ok"] else None
    if ex is None:
        return out + [f"Not run: {result['message']}.", ""]
    if not ex["ok"]:
        return out + [f"Not run: {ex['message']}.", ""]
    rows = [[num(c), value_text(e, metric), value_text(p, metric), f"{100 * r:+.1f}%"]
            for c, e, p, r in zip(ex["holdout_compute"], ex["holdout_error"],
                                  ex["holdout_pred"], ex["rel_error"])]
    verdict = (extrapolation_claim(result)
               or next(text for bound, text in TRUST if ex["mean_abs_rel_error"] < bound))
    out += [(f"The {FIT_NAMES[ex['loss']]} fit on the {ex['n_train']} lowest-compute frontier "
             "points, then predicted the "
            f"{ex['n_holdout']} largest-compute ones "
            f"(top {round(100 * ex['holdout_fraction'])}%):"),
            "", *md_table(["compute", value_header(metric),
                           "predicted " + value_header(metric).split(" ", 1)[1],
                           "relative error"], rows), "",
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
        rows.append([column, res["n"]] + [f"{num(res['fit'][k], '.4g')} [{num(iv[k][0])}, "
                                          f"{num(iv[k][1])}]" for k in F.PARAMS])
    return out + md_table(["panel", "ViT points", *F.PARAMS], rows) + [""]


def status_section(runs: pd.DataFrame, skipped: list) -> list[str]:
    """Runs by status, failed/diverged messages, and every skipped file."""
    counts = status_counts(runs)
    out = ["## Runs", "", *md_table(list(counts), [list(counts.values())]), ""]
    bad = runs[runs["status"].isin(["failed", "diverged"])]
    for r in bad.itertuples():
        out.append(f"- {r.status}: `{r.run}` ({r.model}): {r.message or 'no message'}")
    files, lines = count_skipped(skipped)
    out += ["", (f"Skipped files: {files}; skipped lines: {lines} (left out of every figure "
                 "and table; rules: analysis/README.md, \"What the loader skips\")")]
    out += [f"- `{s.path}`: {s.reason}" for s in skipped]
    return out + [""]


def _bench(report: Report) -> list[str]:
    best = report.bench_used
    if best is None or best.empty:
        return []
    return bench_section(best, bench_order(best, report.results.runs))


def render(report: Report) -> str:
    """The whole summary.md of a Report (analysis.report.summary_data)."""
    res, x = report.results, report.x
    counts = ", ".join(f"{k} {v}" for k, v in status_counts(res.runs).items())
    files, skipped_lines = count_skipped(report.skipped)
    lines = ["# Scaling analysis", "",
             (f"Results: `{res.results_dir}`: {len(res.runs)} runs ({counts}), "
             f"{len(res.evals)} eval points, {files} skipped files, {skipped_lines} skipped "
             "lines."), "",
             *backtest_section(report.backtest),
             *sizes_section(report.sizes, x),
             *noise_section(report.frontier, report.close_calls, x, report.metric),
             *frontier_section(report.frontier, x_column(x), x, report.metric),
             *fit_section(report.fit, x, report.frontier),
             *extrapolation_section(report.fit, report.metric),
             *isoflop_section(report.optimal),
             *parametric_section(report.parametric, report.optimal),
             *transfer_section(report.transfer_rows, report.metric),
             *ladder_section(report.ladder),
             *paper_section(report.paper_fits),
             *_bench(report),
             *status_section(res.runs, report.skipped),
             "## Figures", ""]
    lines += [f"- `{p.name}`" for p in report.figures]
    lines += [f"- note: {n}" for n in report.notes]
    return "\n".join(lines) + "\n"

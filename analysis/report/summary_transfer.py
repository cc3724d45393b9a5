"""summary.md's "Transfer" section and summary.json's `transfer` key: which transfer metrics the
results hold, how their points and intervals are made, and the one analysed."""

from __future__ import annotations

import pandas as pd

from analysis.fit.transfer import metric_names, parse_metric, probe_points, select
from analysis.report.summary_sections import md_table, num

INTERVAL_TEXT = (
    "A transfer point is one (run, step): error = 1 - the mean top-1 over the probe seeds (draws "
    "of the k-shot train set). Its 95% interval is the widest of the Wilson interval at the mean "
    "error on the downstream val images (every draw is scored on the same images, so the draws "
    "are not draws x images binomial trials), the t interval of the mean over the draws, and, "
    "for recipes trained with several seeds, the t interval across those seeds. \"seeds\" counts "
    "training seeds; \"k-shot draws\" the probe seeds averaged into each point.")


def metric_stats(rows: pd.DataFrame) -> list[dict]:
    """Per transfer metric: runs, points, probe draws per point, test images, best error."""
    out = []
    for name in metric_names(rows):
        pts = probe_points(select(rows, parse_metric(name)))
        out.append({"metric": name, "runs": int(pts["run"].nunique()), "points": len(pts),
                    "draws_min": int(pts["probe_seeds"].min()),
                    "draws_max": int(pts["probe_seeds"].max()),
                    "num_test": int(pts["num_samples"].min()),
                    "best_error": float(1 - pts["top1"].max()),
                    "probe_sd_median": float(pts["probe_sd"].median())
                    if pts["probe_sd"].notna().any() else None})
    return out


def transfer_section(rows: pd.DataFrame, metric_text: str) -> list[str]:
    """The metric analysed (`--metric` text) and every transfer metric `rows` hold."""
    metric = parse_metric(metric_text)
    out = ["## Transfer", ""]
    if metric.transfer:
        out += [(f"Metric analysed: **{metric.label}** (`--metric {metric.text}`), against "
                 "pre-training compute; every figure and table above and below uses it, except "
                 "`upstream_vs_transfer`, which shows it next to the upstream error."), ""]
    if rows.empty:
        return out + [("No transfer.jsonl rows (train with --fewshot DIR, or run python -m "
                       "scaling.fewshot after training)."), ""]
    stats = metric_stats(rows)
    table = [[f"`{s['metric']}`", s["runs"], s["points"],
              f"{s['draws_min']}" if s["draws_min"] == s["draws_max"]
              else f"{s['draws_min']}–{s['draws_max']}", f"{s['num_test']:,}",
              num(100 * s["best_error"], ".2f"),
              num(None if s["probe_sd_median"] is None else 100 * s["probe_sd_median"], ".2f")]
             for s in stats]
    return out + [INTERVAL_TEXT, "", *md_table(
        ["metric", "runs", "points", "draws/point", "test images", "best error (%)",
         "median sd over draws (top-1 %)"], table), ""]


def transfer_json(rows: pd.DataFrame, metric_text: str) -> dict:
    """summary.json's `transfer`: the metric's label, whether it is a transfer metric, and the
    per-metric numbers of metric_stats over `rows`."""
    metric = parse_metric(metric_text)
    return {"label": metric.label, "is_transfer": metric.transfer,
            "available": metric_stats(rows)}

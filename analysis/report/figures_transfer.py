"""Upstream and transfer side by side, as in the ViT paper's Figure 5 (Dosovitskiy et al. 2021:
transfer accuracy against pre-training compute, one panel per downstream task): the first panel
is the upstream top-1 error, the others few-shot (or fine-tuned) error on downstream sets, all
against the same pre-training compute axis, with the curves coloured by model size and each
panel's compute-optimal frontier."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from matplotlib.lines import Line2D

from analysis.fit.frontier import x_column
from analysis.fit.ladder import link, predict_interval
from analysis.fit.transfer import metric_names, parse_metric
from analysis.report.figures import (
    as_plotted,
    draw_curves,
    interval_note,
    legend_columns,
    metric_axis,
    metric_label,
)
from analysis.report.style import X_LABELS, log_axis

MAX_TRANSFER_PANELS = 3
HEADLINE_SHOTS = 10  # the papers' headline few-shot number (Zhai et al. 2022, Fig. 2)


def panel_metrics(rows: pd.DataFrame, metric: str) -> list[str]:
    """The transfer metrics to draw: the chosen --metric when it is one, then per downstream
    set its 10-shot rows (else its largest shots) and its fine-tune rows; at most
    MAX_TRANSFER_PANELS."""
    names = metric_names(rows)
    chosen = [metric] if metric in names else []
    by_set: dict[tuple, list[int]] = {}
    for name in names:
        m = parse_metric(name)
        by_set.setdefault((m.kind, m.dataset), []).append(m.shots or 0)
    for (kind, dataset), shots in sorted(by_set.items()):
        if kind == "finetune":
            chosen.append(f"finetune:{dataset}")
        else:
            k = HEADLINE_SHOTS if HEADLINE_SHOTS in shots else max(shots)
            chosen.append(f"fewshot:{dataset}:{k}")
    return list(dict.fromkeys(chosen))[:MAX_TRANSFER_PANELS]


def _panel(ax, panel: dict, palette: dict, col: str, x: str) -> None:
    """One metric: its seed-averaged curves, final points, frontier, axes."""
    good, frontier, metric = panel["averaged"], panel["frontier"], panel["metric"]
    good = good.assign(as_plotted=as_plotted(good["error"], "error"))
    draw_curves(ax, good, "recipe", col, "error", palette, 0.75, bars=len(good) <= 5_000)
    final = good[good["is_final"] & (good["status"] == "ok")]
    ax.scatter(final[col], final["as_plotted"], s=26, c=[palette.get(m, "grey") for m in final["model"]],
               edgecolors="white", linewidths=0.7, zorder=4)
    ax.plot(frontier[col], frontier["error"], color="black", lw=1.3, ls="--", marker="o",
            ms=3, zorder=3)
    log_axis(ax, "x")
    metric_axis(ax, "error", good["error"])
    ax.set_ylabel(f"{metric_label(metric)} (%)")
    ax.set_xlabel(X_LABELS[x].replace("Training compute", "Pre-training compute"))
    ax.set_title("Upstream" if metric in ("error", "top1") else "Transfer", fontsize="medium")


def transfer_figure(panels: list[dict], order: list[str], palette: dict, *, x: str = "flops"):
    """`panels`: [{"metric", "averaged" (seed-averaged points of ok/running runs),
    "frontier"}], the upstream one first. Shared compute axis; the legend under the panels
    names the sizes, the marks and each panel's intervals."""
    col = x_column(x)
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 0.6, 5.4), layout="constrained",
                             sharex=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        _panel(ax, panel, palette, col, x)
    fig.suptitle("Upstream and transfer error vs pre-training compute (as ViT paper Fig. 5)",
                 fontweight="bold")
    models = set().union(*(set(p["averaged"]["model"]) for p in panels))
    sizes = [(Line2D([], [], color=palette[m], lw=1.6), m) for m in order if m in models]
    marks = [(Line2D([], [], color="black", lw=1.3, ls="--", marker="o", ms=3),
              "compute-optimal frontier (per panel)"),
             (Line2D([], [], color="grey", lw=1.0),
              "one run's evals in training\n(seeds of a recipe averaged)"),
             (Line2D([], [], marker="o", ls="", color="grey", mec="white"), "final eval")]
    notes = [(Line2D([], [], color="grey", lw=0.9, marker="|", ms=8, ls=""),
              f"{metric_label(p['metric'])}:\n" + interval_note(p["averaged"]))
             for p in panels if len(p["averaged"])]
    legend_columns(fig, sizes, marks + notes, fontsize="x-small")
    return fig


def ladder_figure(ladder: dict, order: list[str], palette: dict):
    """Upstream to downstream (analysis.fit.ladder): per transfer metric (at most
    MAX_TRANSFER_PANELS, those with a link), transfer error against upstream eval loss at every
    checkpoint, the chosen link with its 95 % band, the other form dotted, and the left-out size's
    final points: measured (Wilson bars) and predicted from their loss (band of the link)."""
    entries = [e for e in ladder.values() if e["predictions"]][:MAX_TRANSFER_PANELS]
    n = len(entries)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 0.6, 5.4), layout="constrained",
                             squeeze=False)
    for ax, e in zip(axes[0], entries):
        pts = e["link_points"]
        pts = pts[pts["params"] < pts["params"].max()]  # the points the link was fitted to
        ax.scatter(pts["loss"], 100 * pts["error"], s=9, alpha=0.55, linewidths=0,
                   c=[palette.get(m, "grey") for m in pts["model"]], zorder=2)
        grid = np.geomspace(pts["loss"].min(), pts["loss"].max(), 200)
        for form, fitted in e["forms"].items():
            if fitted.get("ok"):
                ax.plot(grid, 100 * link(form, fitted["params"], grid), color="black",
                        lw=1.4 if form == e["form"] else 0.9,
                        ls="-" if form == e["form"] else ":", zorder=3)
        lo, hi = predict_interval({"form": e["form"], "samples": e["link_samples"]}, grid)
        ax.fill_between(grid, 100 * lo, 100 * hi, color="black", alpha=0.12, lw=0, zorder=1)
        p = pd.DataFrame(e["predictions"])
        meas = np.array(p["error_interval"].tolist())
        ax.errorbar(p["loss"], 100 * p["error"], yerr=100 * np.abs(meas.T - p["error"].to_numpy()),
                    fmt="o", ms=6, mfc="white", mec="crimson", ecolor="crimson", lw=1,
                    zorder=5)
        band = np.array(p["interval"].tolist())
        ax.errorbar(p["loss"], 100 * p["predicted"],
                    yerr=100 * np.abs(band.T - p["predicted"].to_numpy()), fmt="x", ms=7,
                    color="crimson", lw=0.8, capsize=3, zorder=6)
        log_axis(ax, "x")
        ax.set_xlabel("Upstream eval cross-entropy L (nats)")
        ax.set_ylabel(f"{metric_label(e['metric'])} (%)")
        ax.set_title(f"{e['metric']}: left out {e['held_out']}", fontsize="medium")
    fig.suptitle("Transfer error from upstream loss: two-step prediction of the largest size",
                 fontweight="bold")
    models = set().union(*(set(e["link_points"]["model"]) for e in entries))
    sizes = [(Line2D([], [], marker="o", ls="", color=palette[m]), f"{m} (checkpoints fitted)")
             for m in order if m in models and m not in {e["held_out"] for e in entries}]
    marks = [(Line2D([], [], color="black", lw=1.4), ("link chosen (fitted without the\n"
                                                   "left-out size), 95% band")),
             (Line2D([], [], color="black", lw=0.9, ls=":"), "the other form"),
             (Line2D([], [], marker="o", mfc="white", mec="crimson", color="crimson", ls=""),
              "left-out final point, measured\n(95% Wilson)"),
             (Line2D([], [], marker="x", color="crimson", ls=""),
              "predicted from its loss (95%)")]
    legend_columns(fig, sizes, marks, fontsize="x-small")
    return fig

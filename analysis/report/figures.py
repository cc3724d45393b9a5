"""The scaling figures: curves vs compute with the frontier, and the power-law fit (the
compute-optimal size: analysis.report.figures_optimal; benchmark throughput / MFU:
analysis.report.figures_bench, re-exported here). Each function returns the figure; saving is left to
the caller (analysis.report.style.save_figure)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from matplotlib.collections import LineCollection
from matplotlib.lines import Line2D

from analysis.fit import law as F
from analysis.fit.frontier import FRONTIER_STATUSES, x_column
from analysis.fit.noise import SD_COLUMN, aggregate_seeds, with_intervals
from analysis.fit.transfer import parse_metric
from analysis.report.figures_bench import BENCH_CONFIG, comparable_latest, throughput_figure  # noqa: F401
from analysis.report.style import (
    ACCENT,
    X_LABELS,
    X_UNITS,
    legend_below,
    log_axis,
    percent_axis,
)

METRIC_LABELS = {"error": "Top-1 error", "top1": "Top-1 accuracy"}
FIT_NAMES = {"huber": "Huber", "lsq": "least-squares"}


def metric_label(metric: str) -> str:
    """Axis text of a --metric: upstream top-1 error or accuracy, or a transfer error
    (analysis.fit.transfer.Metric.label)."""
    return METRIC_LABELS.get(metric) or parse_metric(metric).label


def as_plotted(error, metric: str):
    """Error -> the plotted metric (error itself, or accuracy = 1 - error for top1; transfer
    metrics are errors)."""
    return error if metric != "top1" else 1.0 - np.asarray(error)


def metric_axis(ax, metric: str, errors) -> None:
    """Error on a log axis (where the law is read, Zhai et al. Fig. 2), unless the errors span
    less than a factor of 2 (a log axis would show a single tick); accuracy linear."""
    errors = np.asarray(errors, dtype=float)
    errors = errors[np.isfinite(errors) & (errors > 0)]
    if metric == "loss":  # nats, not a fraction
        if errors.size and errors.max() / errors.min() >= 2:
            log_axis(ax, "y", fmt=lambda v: f"{v:.3g}")
        ax.set_ylabel(metric_label(metric))
        return
    if metric != "top1" and errors.size and errors.max() / errors.min() >= 2:
        log_axis(ax, "y", fmt=lambda v: f"{100 * v:.3g}%")
    else:
        percent_axis(ax, "y")
    ax.set_ylabel(f"{metric_label(metric)} (%)")


def _interval(pts: pd.DataFrame, metric: str) -> np.ndarray:
    """Asymmetric error-bar lengths (2 x n) of err_lo..err_hi in the plotted metric."""
    y = as_plotted(pts["error"].to_numpy(float), metric)
    a, b = as_plotted(pts["err_lo"].to_numpy(float), metric), as_plotted(pts["err_hi"].to_numpy(float), metric)
    lo, hi = np.fmin(a, b), np.fmax(a, b)
    return np.nan_to_num(np.vstack([y - lo, hi - y]), nan=0.0).clip(min=0.0)


def error_bars(ax, pts: pd.DataFrame, col: str, metric: str, color, **kw) -> None:
    """Each point's 95 % interval (analysis.fit.noise) as a vertical bar."""
    if len(pts):
        ax.errorbar(pts[col], as_plotted(pts["error"], metric), yerr=_interval(pts, metric), fmt="none",
                    ecolor=color, elinewidth=kw.pop("lw", 0.9), capsize=kw.pop("capsize", 1.5),
                    zorder=kw.pop("zorder", 3), **kw)


def interval_note(pts: pd.DataFrame) -> str:
    """Legend text for the bars: the images behind each eval and the seeds per point."""
    n = pd.to_numeric(pts.get("num_samples"), errors="coerce").dropna()
    k = pts["n_seeds"].astype(int) if "n_seeds" in pts else pd.Series([1])
    imgs = (f"{int(n.min()):,}" if n.min() == n.max() else f"{int(n.min()):,}–{int(n.max()):,}"
            ) if len(n) else "?"
    seeds = f"{k.min()}" if k.min() == k.max() else f"{k.min()}–{k.max()}"
    how = "t from the per-image loss sd" if SD_COLUMN in pts else "Wilson"
    note = (f"bars: 95% interval ({how} on {imgs} images;\nacross seeds when > 1); "
            f"{seeds} seed(s)/point")
    draws = (pd.to_numeric(pts["probe_seeds"], errors="coerce").dropna()
             if "probe_seeds" in pts else ())
    if len(draws):  # a transfer metric: the k-shot draws of each point
        d = (f"{int(draws.min())}" if draws.min() == draws.max()
             else f"{int(draws.min())}–{int(draws.max())}")
        note = note.replace("seeds when > 1)", f"seeds when > 1;\nt over the {d} k-shot draws "
                                                 "averaged)")
    width = ((pts["err_hi"] - pts["err_lo"]) / pts["error"]).median() if len(pts) else 0.0
    if width < 0.03:  # on these axes a marker spans about 3 % of the value
        note += "\n(most bars are narrower than the markers)"
    return note


# Above this many points the curves figure draws interval bars on final evals only: hundreds
# of thousands of overlapping bars say nothing and take seconds to render.
MAX_BARS = 20_000


def draw_curves(ax, frame: pd.DataFrame, units: str, col: str, metric: str, palette: dict,
            alpha: float, bars: bool = True) -> None:
    """One line per `units` group (a recipe, or a run) through its points by x, and (`bars`)
    every point's interval bar, each coloured by its model: two collections for all of them
    (one plot call per curve costs seconds on thousands of runs)."""
    if frame.empty:
        return
    f = frame.sort_values([units, col], kind="stable")
    colors = [palette.get(m, "grey") for m in f["model"]]
    xy = np.column_stack([f[col].to_numpy(float), f["as_plotted"].to_numpy(float)])
    codes = pd.factorize(f[units])[0]
    starts = np.r_[0, np.flatnonzero(np.diff(codes)) + 1]
    ax.add_collection(LineCollection(np.split(xy, starts[1:]), colors=[colors[i] for i in starts],
                                     linewidths=1.0, alpha=alpha, zorder=2))
    if bars:
        _bar_collection(ax, f, col, metric, colors, alpha)


def _bar_collection(ax, f: pd.DataFrame, col: str, metric: str, colors: list,
                    alpha: float) -> None:
    """Every row's interval bar (err_lo..err_hi), one collection for all."""
    x, y = f[col].to_numpy(float), f["as_plotted"].to_numpy(float)
    lo_hi = _interval(f, metric)
    segments = np.stack([np.column_stack([x, y - lo_hi[0]]), np.column_stack([x, y + lo_hi[1]])],
                        axis=1)
    ax.add_collection(LineCollection(segments, colors=colors, linewidths=0.7, alpha=alpha,
                                     zorder=3))


def _mark_runs(ax, good: pd.DataFrame, bad: pd.DataFrame, col: str, palette: dict,
               metric: str, bars: bool = False) -> list:
    """Final evals (joined per size across budgets; with `bars`, their interval bars), running
    and failed runs; legend extras."""
    final = good[good["is_final"] & (good["status"] == "ok")].sort_values(col)
    if bars and len(final):
        _bar_collection(ax, final, col, metric, [palette.get(m, "grey") for m in final["model"]],
                        0.9)
    joined = False
    for model, grp in _by_model(final, palette):
        if len(grp) > 1:  # one curve per size through its runs' final points (one per budget)
            ax.plot(grp[col], grp["as_plotted"], color=palette[model], lw=1.8, zorder=3)
            joined = True
    ax.scatter(final[col], final["as_plotted"], s=30, c=[palette[m] for m in final["model"]],
               edgecolors="white", linewidths=0.8, zorder=4)
    running = good[good["status"] == "running"].sort_values("step").groupby("recipe").tail(1)
    last = bad.sort_values("step").groupby("run").tail(1)
    ax.scatter(last[col], last["as_plotted"], marker="X", s=45, color=ACCENT["red"], zorder=5)
    ax.scatter(running[col], running["as_plotted"], marker="o", s=34, facecolors="none",
               edgecolors="black", linewidths=0.9, zorder=5)
    thin = "thin line: one run's evals in training\n(seeds of a recipe averaged)"
    extra = [(Line2D([], [], color="grey", lw=1.0), thin)]
    if joined:
        extra.append((Line2D([], [], color="grey", lw=1.8, marker="o", mec="white"),
                      "thick line: a size's final evals\nacross budgets"))
    else:
        extra.append((Line2D([], [], marker="o", ls="", color="grey", mec="white"),
                      "final eval"))
    if len(running):
        extra.append((Line2D([], [], marker="o", ls="", mfc="none", mec="black"),
                      "running (latest eval)"))
    if len(last):
        extra.append((Line2D([], [], marker="X", ls="", color=ACCENT["red"]),
                      "failed / diverged (faint line,\nlast eval crossed)"))
    return extra


def legend_columns(fig, *columns: list, **kw) -> None:
    """A legend under the axes, each list of (handle, text) pairs in a column of its own (e.g.
    the sizes in one, what the marks mean in another). A text of several lines becomes one
    entry per line (the handle on the first), so that columns padded to the same number of
    entries have the same height."""
    def blank():
        return Line2D([], [], ls="", marker="")

    lines = [[(h if i == 0 else blank(), part) for h, t in c
              for i, part in enumerate(t.split("\n"))] for c in columns]
    n = max(len(c) for c in lines)
    items = [item for c in lines for item in c + [(blank(), "")] * (n - len(c))]
    legend_below(fig, [h for h, _ in items], [t for _, t in items], ncol=len(columns), **kw)


def compute_figure(points: pd.DataFrame, frontier: pd.DataFrame, order: list[str],
                   palette: dict, *, x: str = "flops", metric: str = "error", averaged=None):
    """Eval curves coloured by model size, seeds averaged per recipe (one curve per recipe,
    95 % interval bars on every point), failed/diverged runs drawn alone and faint, final
    points marked, frontier in black. `points`: usable eval rows of every status; `averaged`:
    those of ok/running runs seeds averaged, when the caller has them (frontier_points)."""
    col = x_column(x)
    fig, ax = plt.subplots(figsize=(7.0, 6.4), layout="constrained")
    good = (aggregate_seeds(points[points["status"].isin(FRONTIER_STATUSES)])
            if averaged is None else averaged)
    bad = with_intervals(points[~points["status"].isin(FRONTIER_STATUSES)])
    good, bad = (f.assign(as_plotted=as_plotted(f["error"], metric)) for f in (good, bad))
    every_bar = len(good) + len(bad) <= MAX_BARS
    for units, frame, alpha in (("recipe", good, 0.75), ("run", bad, 0.35)):
        draw_curves(ax, frame, units, col, metric, palette, alpha, bars=every_bar)
    extra = _mark_runs(ax, good, bad, col, palette, metric, bars=not every_bar)
    ax.plot(frontier[col], as_plotted(frontier["error"], metric), color="black", lw=1.4, ls="--",
            marker="o", ms=3, zorder=3)
    log_axis(ax, "x")
    metric_axis(ax, metric, pd.concat([good["error"], bad["error"]]))
    ax.set_xlabel(X_LABELS[x])
    ax.set_title(f"{metric_label(metric)} vs {X_LABELS[x].split(' (')[0].lower()}")
    seeds = good.groupby("model")["n_seeds"].max() if len(good) else pd.Series(dtype=int)
    sizes = [(Line2D([], [], color=palette[m], lw=1.6),
              f"{m}" + (f" ({int(seeds[m])} seeds)" if seeds.get(m, 1) > 1 else ""))
             for m in order if m in set(good["model"]) | set(bad["model"])]
    marks = [(Line2D([], [], color="black", lw=1.4, ls="--", marker="o", ms=3),
              "compute-optimal frontier"), *extra,
             (Line2D([], [], color="grey", lw=0.9, marker="|", ms=8, ls=""),
              interval_note(pd.concat([good, bad])) + ("" if every_bar else
              f"\n(drawn on final evals only: {len(good) + len(bad):,} points)"))]
    legend_columns(fig, sizes, marks, fontsize="small")
    return fig


def _by_model(frame: pd.DataFrame, palette: dict):
    """(model, rows) groups in palette order (small -> large), unknown models last."""
    models = [m for m in palette if m in set(frame["model"])]
    models += sorted(set(frame["model"]) - set(models))
    return [(m, frame[frame["model"] == m]) for m in models]


def compact(v: float) -> str:
    """Compact number for legends: 3 significant digits, scientific when large or small."""
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.2e}"


def law_label(fit: dict, intervals: dict | None, level: float, unit: str,
              loose: list[str] = (), percent: bool = False) -> str:
    """Legend text: the law, its constants with bootstrap intervals, and a warning for the
    constants the data do not determine (`loose`). `percent`: E in percent (a and c x 100,
    as the axes show error), `unit` saying so."""
    scale = {"a": 100.0, "c": 100.0} if percent else {}
    lines = [r"$E = a\,(C + d)^{-b} + c$" + f",  {unit}"]
    for k in F.PARAMS:
        m, pct = scale.get(k, 1.0), "%" if percent and k == "c" else ""
        ci = ""
        if intervals:
            lo, hi = intervals[k]
            ci = f"  [{compact(m * lo)}, {compact(m * hi)}]"
        lines.append(f"{k} = {compact(m * fit[k])}{pct}{ci}")
    if intervals:
        lines.append(f"(bootstrap {round(100 * level)}% intervals)")
    if loose:
        lines.append(f"poorly determined: {', '.join(loose)}")
    return "\n".join(lines)


def _pct(v: float, metric: str = "error") -> str:
    """An error fraction as a percentage for legends (3 significant digits); a loss as is."""
    return compact(v) if metric == "loss" else f"{100 * v:.3g}%"


def _ceiling(metric: str) -> float:
    """The largest value the metric can take: 1 for an error, none for a loss (nats)."""
    return np.inf if metric == "loss" else 1.0


def _fit_lines(ax, result: dict, grid, metric: str, unit: str) -> None:
    """The chosen fit with its band, the other loss's fit, and the floor."""
    boot, fit, det = result["boot"], result["fit"], result["determination"]
    loose = det["poorly_determined"] + [f"{k} (at bound)" for k in det["at_bound"]]
    # Errors live in [0, 1]: a loose fit's band may leave that range far from the data.
    lo, hi = (np.clip(v, 1e-4, _ceiling(metric)) for v in F.prediction_band(boot, grid))
    ylo, yhi = np.minimum(as_plotted(lo, metric), as_plotted(hi, metric)), np.maximum(as_plotted(lo, metric),
                                                                       as_plotted(hi, metric))
    ax.fill_between(grid, ylo, yhi, color=ACCENT["orange"], alpha=0.25, lw=0,
                    label=f"{round(100 * boot['level'])}% bootstrap band")
    name = FIT_NAMES[result["loss"]]
    ax.plot(grid, as_plotted(np.clip(F.predict(fit, grid), 0, _ceiling(metric)), metric),
            color=ACCENT["orange"], lw=2,
            label=f"{name} fit (used): " + law_label(fit, boot["intervals"], boot["level"], unit,
                                                     loose, percent=metric != "loss")
            + ("" if det["determined"] else "\nlaw not determined (why: summary.md)"))
    alt = result["alt"]
    ax.plot(grid, as_plotted(np.clip(F.predict(alt, grid), 0, _ceiling(metric)), metric),
            color="dimgrey", lw=1.1,
            ls="-.", label=f"{FIT_NAMES[alt['loss']]} fit, for comparison\n"
                           f"(b = {compact(alt['b'])}, c = {_pct(alt['c'], metric)})")


def _holdout(ax, ex: dict, grid, metric: str) -> None:
    """The fit without the top 20 % of compute and the points it predicts."""
    if not ex["ok"]:
        return
    ax.plot(grid, as_plotted(np.clip(F.predict(ex["fit"], grid), 0, _ceiling(metric)), metric),
            color=ACCENT["green"], ls="--", lw=1.4,
            label=f"fit without top {round(100 * ex['holdout_fraction'])}% compute\n"
                  f"(mean |rel. err.| on held-out: {100 * ex['mean_abs_rel_error']:.1f}%)")
    ax.scatter(ex["holdout_compute"], as_plotted(ex["holdout_error"], metric), s=80,
               facecolors="none", edgecolors=ACCENT["green"], linewidths=1.4, zorder=6,
               label="held-out points")


def _extrapolation_region(ax, lo: float, hi: float, grid) -> None:
    """Shade the computes beyond the frontier's range, where the curves are extrapolated."""
    ax.axvspan(hi, grid.max(), color="0.93", lw=0, zorder=0,
               label="beyond the data: extrapolation")
    ax.axvspan(grid.min(), lo, color="0.93", lw=0, zorder=0)
    ax.text(math.sqrt(hi * grid.max()), 0.98, "extrapolation", transform=ax.get_xaxis_transform(),
            ha="center", va="top", fontsize="x-small", color="0.35")


def _frontier_marks(ax, pts: pd.DataFrame, result: dict, col: str, metric: str,
                    palette: dict) -> None:
    """The frontier points with their bars, and those the robust fit set aside."""
    for model, grp in _by_model(pts, palette):
        color = palette.get(model, "black")
        error_bars(ax, grp, col, metric, color, zorder=4)
        ax.scatter(grp[col], as_plotted(grp["error"], metric), s=26, color=color,
                   edgecolors="black", linewidths=0.5, zorder=5, label=f"frontier: {model}")
    out = pts.iloc[result["outliers"]]
    if len(out):
        ax.scatter(out[col], as_plotted(out["error"], metric), s=110, marker="s", facecolors="none",
                   edgecolors=ACCENT["red"], linewidths=1.3, zorder=6,
                   label="> 3 robust sd from the fit")
    ax.plot([], [], color="grey", marker="|", ms=8, ls="", label=interval_note(pts))


def fit_figure(frontier: pd.DataFrame, result: dict, palette: dict, *, x: str = "flops",
               metric: str = "error"):
    """Frontier points (seeds averaged, 95 % interval bars), the law fitted with the chosen
    loss and its bootstrap band (constants in percent error, as the axis), the other loss's
    fit, points the robust fit set aside, the hold-out check, and the computes beyond the
    data shaded."""
    col = x_column(x)
    fig, ax = plt.subplots(figsize=(7.0, 6.6), layout="constrained")
    cx = frontier[col].to_numpy()
    grid = np.logspace(np.log10(cx.min()) - 0.3, np.log10(cx.max()) + 1.0, 200)
    _extrapolation_region(ax, float(cx.min()), float(cx.max()), grid)
    what = "top-1 error" if metric in METRIC_LABELS else metric_label(metric)
    what, unit = ("eval cross-entropy", "nats") if metric == "loss" else (what, "%")
    _fit_lines(ax, result, grid, metric, f"E: {what} ({unit}), C: {X_UNITS[x]}")
    fit = result["fit"]
    # The floor is drawn only where it is in view: a fitted c far below every observed error
    # (the data show no saturation yet) would otherwise stretch the log axis over decades.
    visible_floor = 0.25 * float(frontier["error"].min())
    if metric != "top1" and fit["c"] >= visible_floor:
        ax.axhline(fit["c"], color="grey", ls=":", lw=1,
                   label=f"floor c = {_pct(fit['c'], metric)}")
    _holdout(ax, result["extrapolation"], grid, metric)
    _frontier_marks(ax, frontier[frontier["error"] > 0].reset_index(drop=True), result, col,
                    metric, palette)
    log_axis(ax, "x")
    ax.set_xlim(grid.min(), grid.max())
    metric_axis(ax, metric, frontier["error"])
    if metric != "top1":
        ax.set_ylim(bottom=max(ax.get_ylim()[0], visible_floor))
    ax.set_xlabel(X_LABELS[x])
    ax.set_title("Saturating power law on the frontier (Zhai et al. 2022)")
    # The fits in one column, the marks in the other: the used fit's constants take 7 lines.
    items = list(zip(*ax.get_legend_handles_labels()))
    fits = [i for i in items if any(k in i[1] for k in ("fit (used)", "bootstrap band",
                                                        "for comparison", "floor c"))]
    legend_columns(fig, fits, [i for i in items if i not in fits], fontsize="x-small")
    return fig

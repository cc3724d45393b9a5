"""The scaling figures: curves vs compute with the frontier, the power-law fit, and benchmark
throughput / MFU (the compute-optimal size: analysis.figures_optimal). Each function returns the figure;
saving is left to the caller (analysis.style.save_figure)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import pyplot as plt
from matplotlib.lines import Line2D

from analysis import fit as F
from analysis.frontier import FRONTIER_STATUSES, x_column
from analysis.noise import aggregate_seeds, with_intervals
from analysis.style import ACCENT, X_LABELS, X_UNITS, legend_outside, log_axis, percent_axis

METRIC_LABELS = {"error": "Top-1 error", "top1": "Top-1 accuracy"}
FIT_NAMES = {"huber": "Huber", "lsq": "least-squares"}


def _y(error, metric: str):
    """Error -> the plotted metric (error itself, or accuracy = 1 - error)."""
    return error if metric == "error" else 1.0 - np.asarray(error)


def _metric_axis(ax, metric: str, errors) -> None:
    """Error on a log axis (where the law is read, Zhai et al. Fig. 2), unless the errors span
    less than a factor of 2 (a log axis would show a single tick); accuracy linear."""
    errors = np.asarray(errors, dtype=float)
    errors = errors[np.isfinite(errors) & (errors > 0)]
    if metric == "error" and errors.size and errors.max() / errors.min() >= 2:
        log_axis(ax, "y", fmt=lambda v: f"{100 * v:.3g}%")
    else:
        percent_axis(ax, "y")
    ax.set_ylabel(f"{METRIC_LABELS[metric]} (%)")


def _interval(pts: pd.DataFrame, metric: str) -> np.ndarray:
    """Asymmetric error-bar lengths (2 x n) of err_lo..err_hi in the plotted metric."""
    y = _y(pts["error"].to_numpy(float), metric)
    a, b = _y(pts["err_lo"].to_numpy(float), metric), _y(pts["err_hi"].to_numpy(float), metric)
    lo, hi = np.fmin(a, b), np.fmax(a, b)
    return np.nan_to_num(np.vstack([y - lo, hi - y]), nan=0.0).clip(min=0.0)


def error_bars(ax, pts: pd.DataFrame, col: str, metric: str, color, **kw) -> None:
    """Each point's 95 % interval (analysis.noise) as a vertical bar."""
    if len(pts):
        ax.errorbar(pts[col], _y(pts["error"], metric), yerr=_interval(pts, metric), fmt="none",
                    ecolor=color, elinewidth=kw.pop("lw", 0.9), capsize=kw.pop("capsize", 1.5),
                    zorder=kw.pop("zorder", 3), **kw)


def interval_note(pts: pd.DataFrame) -> str:
    """Legend text for the bars: the images behind each eval and the seeds per point."""
    n = pd.to_numeric(pts.get("num_samples"), errors="coerce").dropna()
    k = pts["n_seeds"].astype(int) if "n_seeds" in pts else pd.Series([1])
    imgs = (f"{int(n.min()):,}" if n.min() == n.max() else f"{int(n.min()):,}–{int(n.max()):,}"
            ) if len(n) else "?"
    seeds = f"{k.min()}" if k.min() == k.max() else f"{k.min()}–{k.max()}"
    note = (f"bars: 95% interval (Wilson on {imgs} images;\nacross seeds when > 1); "
            f"{seeds} seed(s)/point")
    width = ((pts["err_hi"] - pts["err_lo"]) / pts["error"]).median() if len(pts) else 0.0
    if width < 0.03:  # on these axes a marker spans about 3 % of the value
        note += "\n(most bars are narrower than the markers)"
    return note


def _mark_runs(ax, good: pd.DataFrame, bad: pd.DataFrame, col: str, palette: dict) -> list:
    """Final evals (joined per size across budgets), running and failed runs; legend extras."""
    final = good[good["is_final"] & (good["status"] == "ok")].sort_values(col)
    for model, grp in _by_model(final, palette):
        if len(grp) > 1:  # one curve per size through its runs' final points (one per budget)
            ax.plot(grp[col], grp["_y"], color=palette[model], lw=1.8, zorder=3)
    ax.scatter(final[col], final["_y"], s=30, c=[palette[m] for m in final["model"]],
               edgecolors="white", linewidths=0.8, zorder=4)
    running = good[good["status"] == "running"].sort_values("step").groupby("recipe").tail(1)
    last = bad.sort_values("step").groupby("run").tail(1)
    ax.scatter(last[col], last["_y"], marker="X", s=45, color=ACCENT["red"], zorder=5)
    ax.scatter(running[col], running["_y"], marker="o", s=34, facecolors="none",
               edgecolors="black", linewidths=0.9, zorder=5)
    extra = [(Line2D([], [], marker="o", ls="", color="grey", mec="white"), "final eval")]
    if len(running):
        extra.append((Line2D([], [], marker="o", ls="", mfc="none", mec="black"),
                      "running (latest eval)"))
    if len(last):
        extra.append((Line2D([], [], marker="X", ls="", color=ACCENT["red"]),
                      "failed / diverged (last eval)"))
    return extra


def compute_figure(points: pd.DataFrame, frontier: pd.DataFrame, order: list[str],
                   palette: dict, *, x: str = "flops", metric: str = "error"):
    """Eval curves coloured by model size, seeds averaged per recipe (one curve per recipe,
    95 % interval bars on every point), failed/diverged runs drawn alone and faint, final
    points marked, frontier in black. `points`: usable eval rows of every status."""
    col = x_column(x)
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    good = aggregate_seeds(points[points["status"].isin(FRONTIER_STATUSES)])
    bad = with_intervals(points[~points["status"].isin(FRONTIER_STATUSES)])
    good, bad = (f.assign(_y=_y(f["error"], metric)) for f in (good, bad))
    for units, frame, alpha in (("recipe", good, 0.75), ("run", bad, 0.35)):
        for _, grp in frame.sort_values(col).groupby(units, sort=False):
            color = palette.get(grp["model"].iloc[0], "grey")
            ax.plot(grp[col], grp["_y"], color=color, lw=1.0, alpha=alpha, zorder=2)
            error_bars(ax, grp, col, metric, color, alpha=alpha, lw=0.7, capsize=0)
    extra = _mark_runs(ax, good, bad, col, palette)
    ax.plot(frontier[col], _y(frontier["error"], metric), color="black", lw=1.4, ls="--",
            marker="o", ms=3, zorder=3)
    log_axis(ax, "x")
    _metric_axis(ax, metric, pd.concat([good["error"], bad["error"]]))
    ax.set_xlabel(X_LABELS[x])
    ax.set_title(f"{METRIC_LABELS[metric]} vs {X_LABELS[x].split(' (')[0].lower()}")
    seeds = good.groupby("model")["n_seeds"].max() if len(good) else pd.Series(dtype=int)
    handles = [(Line2D([], [], color=palette[m], lw=1.6),
                f"{m}" + (f" ({int(seeds[m])} seeds)" if seeds.get(m, 1) > 1 else ""))
               for m in order if m in set(good["model"]) | set(bad["model"])]
    handles.append((Line2D([], [], color="black", lw=1.4, ls="--", marker="o", ms=3),
                    "compute-optimal frontier"))
    handles += extra
    handles.append((Line2D([], [], color="grey", lw=0.9, marker="|", ms=8, ls=""),
                    interval_note(pd.concat([good, bad]))))
    ax.legend([h for h, _ in handles], [t for _, t in handles], title="model",
              loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
              fontsize="small")
    return fig


def _by_model(frame: pd.DataFrame, palette: dict):
    """(model, rows) groups in palette order (small -> large), unknown models last."""
    models = [m for m in palette if m in set(frame["model"])]
    models += sorted(set(frame["model"]) - set(models))
    return [(m, frame[frame["model"] == m]) for m in models]


def _fmt(v: float) -> str:
    """Compact number for legends: 3 significant digits, scientific when large or small."""
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.2e}"


def law_label(fit: dict, intervals: dict | None, level: float, unit: str,
              loose: list[str] = ()) -> str:
    """Legend text: the law, its constants with bootstrap intervals, and a warning for the
    constants the data do not determine (`loose`)."""
    lines = [r"$E = a\,(C + d)^{-b} + c$" + f",  {unit}"]
    for k in F.PARAMS:
        ci = ""
        if intervals:
            lo, hi = intervals[k]
            ci = f"  [{_fmt(lo)}, {_fmt(hi)}]"
        lines.append(f"{k} = {_fmt(fit[k])}{ci}")
    if intervals:
        lines.append(f"(bootstrap {round(100 * level)}% intervals)")
    if loose:
        lines.append(f"poorly determined: {', '.join(loose)}")
    return "\n".join(lines)


def _fit_lines(ax, result: dict, grid, metric: str, unit: str) -> None:
    """The chosen fit with its band, the other loss's fit, and the floor."""
    boot, fit = result["boot"], result["fit"]
    # Errors live in [0, 1]: a loose fit's band may leave that range far from the data.
    lo, hi = (np.clip(v, 1e-4, 1.0) for v in F.prediction_band(boot, grid))
    ylo, yhi = np.minimum(_y(lo, metric), _y(hi, metric)), np.maximum(_y(lo, metric),
                                                                       _y(hi, metric))
    ax.fill_between(grid, ylo, yhi, color=ACCENT["orange"], alpha=0.25, lw=0,
                    label=f"{round(100 * boot['level'])}% bootstrap band")
    name = FIT_NAMES[result["loss"]]
    ax.plot(grid, _y(np.clip(F.predict(fit, grid), 0, 1), metric), color=ACCENT["orange"], lw=2,
            label=f"{name} fit (used): " + law_label(fit, boot["intervals"], boot["level"], unit,
                                                     F.poorly_determined(boot)))
    alt = result["alt"]
    ax.plot(grid, _y(np.clip(F.predict(alt, grid), 0, 1), metric), color="dimgrey", lw=1.1,
            ls="-.", label=f"{FIT_NAMES[alt['loss']]} fit, for comparison\n"
                           f"(b = {_fmt(alt['b'])}, c = {_fmt(alt['c'])})")


def _holdout(ax, ex: dict, grid, metric: str) -> None:
    """The fit without the top 20 % of compute and the points it predicts."""
    if not ex["ok"]:
        return
    ax.plot(grid, _y(np.clip(F.predict(ex["fit"], grid), 0, 1), metric),
            color=ACCENT["green"], ls="--", lw=1.4,
            label=f"fit without top {round(100 * ex['holdout_fraction'])}% compute\n"
                  f"(mean |rel. err.| on held-out: {100 * ex['mean_abs_rel_error']:.1f}%)")
    ax.scatter(ex["holdout_compute"], _y(ex["holdout_error"], metric), s=80,
               facecolors="none", edgecolors=ACCENT["green"], linewidths=1.4, zorder=6,
               label="held-out points")


def fit_figure(frontier: pd.DataFrame, result: dict, palette: dict, *, x: str = "flops",
               metric: str = "error"):
    """Frontier points (seeds averaged, 95 % interval bars), the law fitted with the chosen
    loss and its bootstrap band, the other loss's fit, points the robust fit set aside, and
    the hold-out check."""
    col = x_column(x)
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    cx = frontier[col].to_numpy()
    grid = np.logspace(np.log10(cx.min()) - 0.3, np.log10(cx.max()) + 1.0, 200)
    _fit_lines(ax, result, grid, metric, f"C in {X_UNITS[x]}")
    fit = result["fit"]
    # The floor is drawn only where it is in view: a fitted c far below every observed error
    # (the data show no saturation yet) would otherwise stretch the log axis over decades.
    visible_floor = 0.25 * float(frontier["error"].min())
    if metric == "error" and fit["c"] >= visible_floor:
        ax.axhline(fit["c"], color="grey", ls=":", lw=1, label=f"floor c = {_fmt(fit['c'])}")
    _holdout(ax, result["extrapolation"], grid, metric)
    pts = frontier[frontier["error"] > 0].reset_index(drop=True)
    for model, grp in _by_model(pts, palette):
        color = palette.get(model, "black")
        error_bars(ax, grp, col, metric, color, zorder=4)
        ax.scatter(grp[col], _y(grp["error"], metric), s=26, color=color,
                   edgecolors="black", linewidths=0.5, zorder=5, label=f"frontier: {model}")
    out = pts.iloc[result["outliers"]]
    if len(out):
        ax.scatter(out[col], _y(out["error"], metric), s=110, marker="s", facecolors="none",
                   edgecolors=ACCENT["red"], linewidths=1.3, zorder=6,
                   label="> 3 robust sd from the fit")
    ax.plot([], [], color="grey", marker="|", ms=8, ls="", label=interval_note(pts))
    log_axis(ax, "x")
    _metric_axis(ax, metric, frontier["error"])
    if metric == "error":
        ax.set_ylim(bottom=max(ax.get_ylim()[0], visible_floor))
    ax.set_xlabel(X_LABELS[x])
    ax.set_title("Saturating power law on the frontier (Zhai et al. 2022)")
    legend_outside(ax, fontsize="x-small")
    return fig


# What makes two benchmark rows comparable (besides the model): the same machine and settings.
BENCH_CONFIG = ("device", "precision", "compile", "batch_size", "image_size", "engine", "zero",
                "world_size")


def comparable_latest(bench: pd.DataFrame) -> pd.DataFrame:
    """Per model, the rows of one configuration: the one of the most recent "ours" row (of any
    row when there is none), each implementation's latest row in it. Picking rows per
    implementation independently could set ours measured on 2 threads against a peer measured
    on 1, or a new measurement against an old one."""
    cols = [c for c in BENCH_CONFIG if c in bench.columns]
    rows = bench.assign(**{c: bench[c].astype(str) for c in cols})  # NaN-safe grouping keys
    if "time" in rows.columns:
        rows = rows.sort_values("time", kind="stable")
    latest = rows.groupby(["model", *cols, "impl"], as_index=False).tail(1)
    lead = latest[latest["impl"] == "ours"] if (latest["impl"] == "ours").any() else latest
    configs = lead.groupby("model", as_index=False).tail(1)[["model", *cols]]
    return latest.merge(configs, on=["model", *cols])


def throughput_figure(bench: pd.DataFrame, order: list[str]):
    """Images/s and MFU per model size and implementation, each model's bars from one
    benchmark configuration, its latest (`comparable_latest`)."""
    best = comparable_latest(bench)
    known = [m for m in order if m in set(best["model"])]
    models = known + sorted(set(best["model"]) - set(known))
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0), constrained_layout=True)
    kw = {"x": "model", "order": models, "hue": "impl", "palette": "colorblind", "legend": False}
    impls = list(dict.fromkeys(best["impl"]))
    sns.barplot(data=best, y="images_per_s", hue_order=impls, ax=axes[0], **kw)
    log_axis(axes[0], "y")  # sizes differ by orders of magnitude in throughput
    axes[0].set_ylabel("Throughput (images/s)")
    mfu = best.assign(mfu_pct=pd.to_numeric(best.get("mfu"), errors="coerce") * 100)
    if mfu["mfu_pct"].notna().any():
        sns.barplot(data=mfu, y="mfu_pct", hue_order=impls, ax=axes[1], **kw)
    else:
        axes[1].text(0.5, 0.5, "MFU unknown\n(accelerator peak not in the table)",
                     ha="center", va="center", transform=axes[1].transAxes)
        axes[1].set_xticks([])
        axes[1].set_yticks([])
    axes[1].set_ylabel("Model FLOPs utilisation (%)")
    for ax, title in zip(axes, ("Training throughput", "MFU")):
        ax.set_xlabel("Model (size/patch)")
        ax.set_title(title)
    colours = dict(zip(impls, sns.color_palette("colorblind", len(impls))))
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=colours[i]) for i in impls], impls,
               title="implementation", loc="outside right upper", frameon=False)
    devices = sorted(set(map(str, best.get("device", pd.Series(dtype=str)).dropna())))
    if devices:
        fig.suptitle(f"Benchmark on {', '.join(devices)}", fontweight="bold")
    return fig

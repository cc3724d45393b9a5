"""The compute-optimal model size figure: IsoFLOP profiles (error vs params, one curve per FLOPs
budget, vertices marked) and N_opt vs C with its fitted line and band (analysis.fit.isoflop)."""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from analysis.fit import isoflop as I
from analysis.fit import parametric as P
from analysis.report.figures import compact, error_bars, interval_note, legend_columns
from analysis.report.style import ACCENT, log_axis, sequential_colours

BOUND_MARKERS = {"lower": "^", "upper": "v"}  # N_opt at least / at most the size drawn


def budget_colours(budgets) -> dict:
    """Sequential colours, small -> large budget (plasma, cut where it stops reading on
    white)."""
    return sequential_colours(sorted(budgets), "plasma")


def _profiles_panel(ax, res: dict, colours: dict,
                    label: str = "Top-1 error") -> None:
    """Left: every budget's points with interval bars, its parabola and vertex (or bound)."""
    pts = res["points"]
    fits = {p["compute"]: p for p in res["profiles"]}
    for budget, grp in pts.groupby("budget", sort=True):
        colour = colours[budget]
        error_bars(ax, grp, "params", "error", colour, zorder=4)
        ax.plot(grp["params"], grp["error"], "o", color=colour, mec="black", mew=0.4, ms=5,
                zorder=5, ls="" if budget in fits else ":",
                label=f"C = {compact(budget)} FLOPs")
        p = fits.get(budget)
        if p is None:
            continue
        u = np.log(grp["params"].to_numpy(float))
        grid = np.linspace(u.min() - 0.3, u.max() + 0.3, 100)
        ax.plot(np.exp(grid), np.exp(np.polyval(p["coef"], grid - p["u0"])), color=colour,
                lw=1.3, zorder=3)
        marker = BOUND_MARKERS.get(p["bound"], "*")
        ax.plot(p["params_opt"], p["error_opt"], marker=marker, ms=13 if marker == "*" else 9,
                color=colour, mec="black", mew=0.8, ls="", zorder=6)
        if p["interval"]:
            _clipped_bar(ax, p["error_opt"], p["interval"], np.exp(grid[[0, -1]]), colour)
    log_axis(ax, "x")
    errors = pts["error"]
    nats = "(nats)" in label  # a loss (analysis.fit.transfer.Metric.label), not a fraction
    text = (lambda v: f"{v:.3g}") if nats else (lambda v: f"{100 * v:.3g}%")
    if errors.max() / errors.min() >= 2:
        log_axis(ax, "y", fmt=text)
    else:
        ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: text(v)))
    ax.set_xlabel("Parameters")
    ax.set_ylabel(f"{label}{'' if nats else ' (%)'}, final eval")
    ax.set_title("IsoFLOP profiles")


def _legend_profiles(ax, pts: pd.DataFrame) -> list:
    """Legend entries explaining the markers of both panels."""
    grey = {"color": "lightgrey", "mec": "black", "ls": ""}
    return [(Line2D([], [], marker="*", ms=12, **grey),
             "vertex: N_opt(C)\n(bar: bootstrap 95% interval;\n< >: it goes on beyond)"),
            (Line2D([], [], marker="^", ms=8, **grey),
             "vertex beyond the largest size:\nN_opt ≥ this (a bound)"),
            (Line2D([], [], marker="v", ms=8, **grey),
             "vertex below the smallest size:\nN_opt ≤ this (a bound)"),
            (Line2D([], [], marker="*", ms=12, color="grey", mfc="white", ls=""),
             "hollow: left out of approach 2's line\n(off-centre or narrow sizes)"),
            (Line2D([], [], color="grey", marker="|", ms=8, ls=""), interval_note(pts))]


def _clipped_bar(ax, y: float, interval, span, colour) -> None:
    """A vertex's horizontal interval bar, cut to the span its parabola is drawn over (a
    bootstrap interval can reach orders of magnitude beyond the sizes tried and would squash the
    axis); a cut end gets an arrowhead: the interval goes on beyond it."""
    lo, hi = max(interval[0], span[0]), min(interval[1], span[1])
    ax.hlines(y, lo, hi, color=colour, lw=2.2, zorder=5)
    for end, cut, head in ((lo, interval[0] < span[0], "<"), (hi, interval[1] > span[1], ">")):
        if cut:
            ax.plot(end, y, marker=head, ms=7, color=colour, ls="", zorder=5)


def _nopt_panel(ax, res: dict, colours: dict, parametric: dict | None = None) -> None:
    """Right: N_opt (or its bound) per budget, with the fitted line and its band, and
    approach 3's line beside it."""
    for p in res["profiles"]:
        marker = BOUND_MARKERS.get(p["bound"], "*")
        if p["interval"]:
            ax.vlines(p["compute"], *p["interval"], color=colours[p["compute"]], lw=2.2)
        out = bool(p.get("left_out"))  # off-centre or narrow: hollow, not on the line
        ax.plot(p["compute"], p["params_opt"], marker=marker, ms=13 if marker == "*" else 9,
                color=colours[p["compute"]], mfc="white" if out else colours[p["compute"]],
                mec=colours[p["compute"]] if out else "black", mew=1.4 if out else 0.8, ls="",
                zorder=5)
    sizes = res["points"]["params"]
    for v in (sizes.min(), sizes.max()):
        ax.axhline(v, color="grey", lw=0.8, ls=":", zorder=1)
    ax.plot([], [], color="grey", lw=0.8, ls=":", label="smallest / largest size tried")
    fit = res["fit"]
    computes = [p["compute"] for p in res["profiles"]] or list(res["points"]["budget"])
    if fit is not None:
        grid = np.logspace(np.log10(min(computes)) - 0.2, np.log10(max(computes)) + 0.2, 100)
        lo, hi = I.line_band(fit, grid)
        ax.fill_between(grid, lo, hi, color=ACCENT["blue"], alpha=0.2, lw=0,
                        label="95% band (approach 2)")
        a, (a_lo, a_hi) = fit["exponent"], fit["interval"]
        ax.plot(grid, I.predict_line(fit, grid), color=ACCENT["blue"], lw=1.8,
                label=rf"approach 2: $N_{{opt}} \propto C^{{{a:.2f}}}$, "
                      f"a in [{a_lo:.2f}, {a_hi:.2f}]\n(least squares over {fit['n']} budgets)")
    else:  # upper left: N_opt grows with C, so that corner holds no point (the lower right
        # holds the long lower bars of the largest budgets' vertices)
        ax.text(0.03, 0.97, "\n".join(textwrap.wrap(f"no line: {res['reason']}", 38)),
                transform=ax.transAxes, ha="left", va="top", fontsize="x-small",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    _parametric_line(ax, parametric, computes)
    ax.set_ylim(sizes.min() / 2, sizes.max() * 2)  # bounds sit on the edges: keep them inside
    ax.set_xlim(min(computes) / 2, max(computes) * 2)  # also when no budget has a profile
    log_axis(ax, "x")
    log_axis(ax, "y")
    ax.xaxis.set_minor_formatter(NullFormatter())  # a narrow panel: decades only
    ax.set_xlabel("FLOPs budget (config flops)")
    ax.set_ylabel("Compute-optimal parameters N_opt")
    ax.set_title("Compute-optimal model size")


def _parametric_line(ax, par: dict | None, computes) -> None:
    """Approach 3's N_opt(C) (analysis.fit.parametric) and its bootstrap band, dashed; nothing
    without a fit or without MACs per parameter to turn FLOPs into N D."""
    if not par or not par.get("ok") or not par.get("macs_per_param"):
        return
    grid = np.logspace(np.log10(min(computes)) - 0.2, np.log10(max(computes)) + 0.2, 100)
    if len(par.get("samples") or ()) >= 2:
        lo, hi = P.n_opt_band(par, grid)
        ax.fill_between(grid, lo, hi, color=ACCENT["green"], alpha=0.15, lw=0,
                        label="95% band (approach 3)")
    e, iv = par["exponent"], par.get("interval")
    text = rf"approach 3: $N_{{opt}} \propto C^{{{e:.2f}}}$"
    text += f", a in [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else ""
    ax.plot(grid, P.n_opt(par, grid), color=ACCENT["green"], lw=1.8, ls="--",
            label=f"{text}\n(parametric E(N, D), {par['n_points']} runs)")


def optimal_size_figure(res: dict, label: str = "Top-1 error", parametric: dict | None = None):
    """Both panels for an analysis.fit.isoflop.optimal_size result with at least one budget's
    points (and approach 3's line, a fit_parametric result, when given); the legend (under the
    panels) lists budgets, lines and markers."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 5.6), layout="constrained")
    colours = budget_colours(res["points"]["budget"].unique())
    _profiles_panel(left, res, colours, label)
    _nopt_panel(right, res, colours, parametric)
    legend_columns(fig, list(zip(*left.get_legend_handles_labels())),
                   list(zip(*right.get_legend_handles_labels())),
                   _legend_profiles(left, res["points"]), fontsize="x-small", frameon=False)
    return fig

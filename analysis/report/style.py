"""One figure style for every plot: seaborn paper context, colour-blind safe colours, log axes
with readable ticks, legends outside the data, 300 dpi PNG."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib import colors as mcolors
from matplotlib import ticker

DPI = 300
FORMATS = ("png", "pdf", "svg")
# Colour-blind safe accents (seaborn "colorblind" = Okabe-Ito-like): frontier, fit, hold-out.
ACCENT = dict(zip(("blue", "orange", "green", "red", "purple", "brown", "pink", "grey"),
                  sns.color_palette("colorblind", 8).as_hex()[:7] + ["#7f7f7f"]))
X_LABELS = {
    "flops": "Training compute (FLOPs)",
    "images": "Images seen",
    "device_hours": "Compute (device hours)",
}
X_UNITS = {"flops": "FLOPs", "images": "images", "device_hours": "device hours"}


def set_style() -> None:
    """Apply the project's matplotlib/seaborn style (call once before plotting)."""
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.25, rc={
        "savefig.dpi": DPI, "figure.dpi": 100, "axes.titleweight": "bold",
        "legend.frameon": False, "grid.linewidth": 0.6, "lines.linewidth": 1.6,
        "svg.fonttype": "none", "pdf.fonttype": 42,  # editable text in vector outputs
    })


# Lines and markers need a contrast ratio of at least 3:1 against the white background
# (WCAG 2.1, success criterion 1.4.11, non-text contrast).
MIN_CONTRAST = 3.0


def contrast_on_white(color) -> float:
    """WCAG contrast ratio of `color` against white: 1.05 / (relative luminance + 0.05)."""
    rgb = np.array(mcolors.to_rgb(color))
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    return 1.05 / (float(lin @ [0.2126, 0.7152, 0.0722]) + 0.05)


def readable_end(cmap_name: str) -> float:
    """The last stop of a dark-to-light colormap whose colour still has MIN_CONTRAST on white."""
    cmap = plt.get_cmap(cmap_name)
    stops = np.linspace(0.0, 1.0, 201)
    ok = [s for s in stops if contrast_on_white(cmap(s)) >= MIN_CONTRAST]
    return float(max(ok))


def sequential_colours(keys, cmap_name: str) -> dict:
    """One colour per key (in the order given), evenly spaced from the dark end of a
    perceptually ordered colormap to its last stop with MIN_CONTRAST on white (viridis' and
    plasma's pale ends read badly on white)."""
    keys = list(keys)
    cmap, end = plt.get_cmap(cmap_name), readable_end(cmap_name)
    stops = np.linspace(0.0, end, len(keys)) if len(keys) > 1 else [end / 2]
    return {k: cmap(s) for k, s in zip(keys, stops)}


def size_palette(models: list[str]) -> dict[str, tuple]:
    """Sequential colours, small -> large; viridis is perceptually ordered and colour-blind safe.
    It is cut where its colours stop reading on white (about 0.6 of the way to its yellow)."""
    return sequential_colours(models, "viridis")


class _LogLabels(ticker.LogFormatterSciNotation):
    """Log-axis labels: every decade, plus 2/3/5 x 10^k (or more) when the axis is short, so a
    narrow range still gets several labels and a wide one is not crowded."""

    def __init__(self, fmt=None, minor: bool = False):
        super().__init__(labelOnlyBase=False, minor_thresholds=(1e9, 1e9))
        self.fmt, self.minor = fmt, minor

    def __call__(self, x, pos=None):
        lo, hi = sorted(self.axis.get_view_interval())
        if x <= 0 or lo <= 0:
            return ""
        if self.minor:
            span = math.log10(hi / lo)
            keep = (() if span > 2.5 else (2, 5) if span > 1.3 else (2, 3, 5) if span > 0.6
                    else tuple(range(2, 10)))
            mant = x / 10 ** math.floor(math.log10(x) + 1e-9)
            if not any(abs(mant - k) < 1e-6 for k in keep):
                return ""
        return self.fmt(x) if self.fmt else super().__call__(x, pos)


def log_axis(ax, axis: str = "x", fmt=None, min_decades: float = 0.5) -> None:
    """Log scale with readable ticks: decades labelled, selected minors on short ranges, and at
    least `min_decades` shown (runs at one budget would otherwise leave no tick at all).
    `fmt` (value -> str) replaces the default 10^k labels, e.g. for percentages."""
    getattr(ax, f"set_{axis}scale")("log")
    lo, hi = sorted(getattr(ax, f"get_{axis}lim")())
    if 0 < lo and math.log10(hi / lo) < min_decades:
        mid, half = math.sqrt(lo * hi), 10 ** (min_decades / 2)
        getattr(ax, f"set_{axis}lim")(mid / half, mid * half)
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(ticker.LogLocator(base=10, numticks=12))
    target.set_minor_locator(ticker.LogLocator(base=10, subs=np.arange(2, 10), numticks=12))
    target.set_major_formatter(_LogLabels(fmt))
    target.set_minor_formatter(_LogLabels(fmt, minor=True))


def percent_axis(ax, axis: str = "y") -> None:
    """Format a fraction axis as percent."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(ticker.PercentFormatter(xmax=1.0, decimals=None))


def legend_outside(ax, **kw) -> None:
    """Legend to the right of the axes, so it never covers data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  borderaxespad=0.0, **kw)


def legend_below(fig, handles, labels, ncol: int = 2, **kw) -> None:
    """Legend in columns under the axes (the figure needs layout="constrained"), so it never
    covers data and the axes keep the figure's width."""
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=ncol, **kw)


def save_figure(fig, out_dir, name: str, formats=("png",)) -> list[Path]:
    """Save `fig` as out_dir/name.<fmt> for each format (tight bbox keeps outside legends)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"figure format {fmt!r} not supported; choose from {FORMATS}")
        path = out_dir / f"{name}.{fmt}"
        fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.05)
        paths.append(path)
    plt.close(fig)
    return paths

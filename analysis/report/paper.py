"""The ViT paper's own scaling figure, redrawn from its Appendix Table 6, with the saturating
power law of Zhai et al. (2022, Sec. 2.2) fitted to its ViT points.

Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021 (arXiv 2010.11929v2): Figure 5
plots transfer accuracy against JFT-300M pre-training compute (exaFLOPs) for ViTs, ResNets (BiT)
and R50+ViT hybrids, in two panels, "Average-5" and "ImageNet"; Table 6 lists the 18 points.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import pyplot as plt

from analysis.fit import law as F
from analysis.fit.memo import plain
from analysis.report.figures import law_label
from analysis.report.style import ACCENT, log_axis

TABLE6 = Path(__file__).resolve().parents[1] / "reference" / "vit_paper_table6.csv"
# Average-5: ImageNet and the four transfer datasets of Table 6 (ReaL re-labels ImageNet's
# validation set, so it is not a separate task).
AVERAGE5 = ("imagenet", "cifar10", "cifar100", "pets", "flowers")
PANELS = {"average5": "Average-5", "imagenet": "ImageNet"}
FAMILIES = ("ViT", "ResNet", "Hybrid")
_STYLE = {"ViT": ("o", ACCENT["blue"]), "ResNet": ("s", ACCENT["orange"]),
          "Hybrid": ("^", ACCENT["green"])}


def _family(name: str) -> str:
    """Architecture family of a Table 6 row name."""
    if "+" in name:
        return "Hybrid"  # "R50x1+ViT-B/16"
    if name.startswith("ViT-"):
        return "ViT"
    if name.startswith("ResNet"):
        return "ResNet"
    raise ValueError(f"Table 6 row {name!r} is neither ViT-*, ResNet* nor a '+' hybrid")


def load_table6(path=TABLE6) -> pd.DataFrame:
    """Table 6 as a DataFrame with `family` and `average5` (mean accuracy over AVERAGE5) added."""
    table = pd.read_csv(path, comment="#")
    missing = [c for c in ("name", "epochs", "exaflops", *AVERAGE5) if c not in table]
    if missing:
        raise ValueError(f"{path}: columns {missing} missing; found {list(table.columns)}")
    table["family"] = [_family(n) for n in table["name"]]
    table["average5"] = table[list(AVERAGE5)].mean(axis=1)
    return table


def fit_table6(table: pd.DataFrame, column: str, *, n_boot: int = 200, memo=plain) -> dict:
    """Bootstrap fit of E = a (C + d)^(-b) + c to the ViT rows, E = 1 - accuracy / 100
    (`memo`, analysis.fit.memo.FitMemo, remembers it)."""
    vit = table[table["family"] == "ViT"]
    boot = memo(F.bootstrap_fit, vit["exaflops"], 1.0 - vit[column] / 100.0, n_boot=n_boot)
    return {"column": column, "n": len(vit), "names": list(vit["name"]),
            "fit": boot["fit"], "boot": boot}


def table6_figure(table: pd.DataFrame, fits: dict[str, dict]):
    """Two panels (Average-5, ImageNet): accuracy vs exaFLOPs per family, with the ViT fit."""
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 6.2), sharex=True, layout="constrained")
    grid = np.logspace(np.log10(table["exaflops"].min()) - 0.15,
                       np.log10(table["exaflops"].max()) + 0.3, 200)
    for ax, (column, title) in zip(axes, PANELS.items()):
        for family in FAMILIES:
            rows = table[table["family"] == family].sort_values("exaflops")
            marker, color = _STYLE[family]
            ax.plot(rows["exaflops"], rows[column], ls="-", lw=0.8, alpha=0.5, color=color)
            ax.scatter(rows["exaflops"], rows[column], marker=marker, s=42, color=color,
                       edgecolors="black", linewidths=0.5, zorder=4,
                       label="Transformer (ViT)" if family == "ViT" else
                       ("ResNet (BiT)" if family == "ResNet" else "Hybrid (R50+ViT)"))
        res = fits[column]
        line, = ax.plot(grid, 100.0 * (1.0 - F.predict(res["fit"], grid)), color=ACCENT["blue"],
                        ls="--", lw=1.5, zorder=3)
        # Each panel has its own fit: its constants (in percent error) go under that panel,
        # where they cover no point.
        ax.legend([line], [f"law fitted to the {res['n']} ViT points\n" + law_label(
            res["fit"], res["boot"]["intervals"], res["boot"]["level"],
            "E = 100 − accuracy (%), C in exaFLOPs", F.poorly_determined(res["boot"]),
            percent=True)],
            loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize="x-small")
        log_axis(ax, "x")
        ax.set_title(title)
        ax.set_xlabel("Pre-training compute (exaFLOPs)")
        ax.set_ylabel("Transfer accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3)
    fig.suptitle("ViT paper Fig. 5 redrawn from Table 6 (Dosovitskiy et al. 2021, JFT-300M)",
                 fontweight="bold")
    return fig

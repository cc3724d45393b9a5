"""The benchmark figure: training images/s and MFU per model size and implementation, from the
rows of RESULTS/bench/*.jsonl (the committed reference) and RESULTS/bench/local/*.jsonl (this
machine's, git-ignored; analysis.load.bench_rows), each model's bars from one configuration, its
newest, with the machine, date, batch, resolution, precision and file of every bar written
under the panels."""

from __future__ import annotations

import pandas as pd
import seaborn as sns
from matplotlib import pyplot as plt

from analysis.load.runs import model_order

# What makes two benchmark rows comparable (besides the model): the same machine and settings.
BENCH_CONFIG = ("device", "precision", "compile", "batch_size", "image_size", "engine", "zero",
                "world_size")


def _times(rows: pd.DataFrame) -> pd.Series:
    """Each row's `time` as a UTC timestamp (NaT when absent or unreadable)."""
    if "time" not in rows:
        return pd.Series(pd.NaT, index=rows.index, dtype="datetime64[ns, UTC]")
    return pd.to_datetime(rows["time"].astype(str), utc=True, errors="coerce", format="mixed")


def comparable_latest(bench: pd.DataFrame) -> pd.DataFrame:
    """Per model, the rows of one configuration: the one of the most recent "ours" row (of any
    row when there is none), each implementation's latest row in it. Picking rows per
    implementation independently could set ours measured on 2 threads against a peer measured
    on 1, or a new measurement against an old one."""
    cols = [c for c in BENCH_CONFIG if c in bench.columns]
    # Grouping keys as text, NaN included ("nan": a field a file's rows do not have; astype(str)
    # would keep NaN, and groupby would drop those rows).
    rows = bench.assign(**{c: bench[c].map(str) for c in cols})
    rows = rows.assign(_t=_times(bench)).sort_values("_t", kind="stable", na_position="first")
    latest = rows.groupby(["model", *cols, "impl"], as_index=False, dropna=False).tail(1)
    lead = latest[latest["impl"] == "ours"] if (latest["impl"] == "ours").any() else latest
    configs = lead.groupby("model", as_index=False).tail(1)[["model", *cols]]
    return latest.merge(configs, on=["model", *cols]).drop(columns="_t")


def bench_order(best: pd.DataFrame, runs: pd.DataFrame | None = None) -> list[str]:
    """Models small -> large: by params (the benchmark rows' own, else the runs'), then MACs
    per image, then patch (smaller patch = more tokens), then name (analysis.load.runs.model_order)."""
    key = pd.DataFrame({"model": best["model"]})
    for col in ("params", "macs_per_image"):
        key[col] = pd.to_numeric(best[col], errors="coerce") if col in best else float("nan")
        if runs is not None and len(runs):
            known = pd.to_numeric(runs[col], errors="coerce").groupby(runs["model"]).median()
            key[col] = key[col].fillna(key["model"].map(known))
    return model_order(key)


def _date(times: pd.Series) -> str:
    """The day of the rows (a range when they differ), or "date unknown"."""
    days = sorted({t.strftime("%Y-%m-%d") for t in times.dropna()})
    return "date unknown" if not days else days[0] if len(days) == 1 else f"{days[0]}–{days[-1]}"


def _value(row: pd.Series, col: str, fmt: str = "{}") -> str:
    v = row.get(col)
    return "?" if v is None or pd.isna(v) or str(v) in ("nan", "None") else fmt.format(v)


def provenance(best: pd.DataFrame, models: list[str]) -> list[str]:
    """One line per (machine, batch, resolution, precision, file) the bars come from: which
    models, and the dates of their rows."""
    rows = best.assign(_t=_times(best))
    parts = rows.apply(lambda r: " · ".join((
        _value(r, "device"), _value(r, "batch_size", "batch {}"),
        _value(r, "image_size", "{} px"), _value(r, "precision"))), axis=1)
    rows = rows.assign(_what=parts, _rank=rows["model"].map({m: i for i, m in enumerate(models)}))
    lines = []
    for (what, source), grp in rows.sort_values("_rank").groupby(["_what", "source"],
                                                                 sort=False):
        names = ", ".join(dict.fromkeys(grp["model"]))
        lines.append(f"{names}: {what} · {_date(grp['_t'])} · {source}")
    return lines


def _compact(v: float) -> str:
    """A bar label: 3 significant digits, thousands as k."""
    return f"{v / 1e3:.3g}k" if v >= 1e3 else f"{v:.3g}"


def _bars(ax, data: pd.DataFrame, y: str, models: list[str], impls: list[str], fmt) -> None:
    """Grouped bars on a linear axis from zero, each labelled with its value."""
    sns.barplot(data=data, x="model", y=y, order=models, hue="impl", hue_order=impls,
                palette="colorblind", legend=False, ax=ax)
    for bars in ax.containers:
        ax.bar_label(bars, labels=[fmt(v) for v in bars.datavalues], fontsize="xx-small",
                     padding=1.5)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)  # room for the labels
    ax.set_xlabel("Model (size/patch), smallest first")


def throughput_figure(bench: pd.DataFrame, order: list[str] = (),
                      runs: pd.DataFrame | None = None):
    """Images/s and MFU per model size and implementation, each model's bars from one
    benchmark configuration, its newest (`comparable_latest`), models by size (`bench_order`;
    `order` is kept for callers, the sizes come from the rows and `runs`), and under the panels
    the machine, date, batch, resolution, precision and file of the rows."""
    best = comparable_latest(bench)
    models = bench_order(best, runs)
    impls = list(dict.fromkeys(best["impl"]))
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.6), layout="constrained")
    _bars(axes[0], best, "images_per_s", models, impls, _compact)
    axes[0].set_ylabel("Throughput (images/s)")
    axes[0].set_title("Training throughput")
    mfu = best.assign(mfu_pct=pd.to_numeric(best.get("mfu"), errors="coerce") * 100)
    if mfu["mfu_pct"].notna().any():
        _bars(axes[1], mfu, "mfu_pct", models, impls, lambda v: f"{v:.3g}%")
        known = set(mfu.loc[mfu["mfu_pct"].notna(), "model"])
        for i in (i for i, m in enumerate(models) if m not in known):
            axes[1].text(i, 0, "MFU\nunknown", ha="center", va="bottom", fontsize="xx-small",
                         color="0.4")
    else:
        axes[1].text(0.5, 0.5, "MFU unknown\n(accelerator peak not in the table)",
                     ha="center", va="center", transform=axes[1].transAxes)
        axes[1].set_xticks([])
        axes[1].set_yticks([])
    axes[1].set_ylabel("Model FLOPs utilisation (%)")
    axes[1].set_title("MFU")
    colours = dict(zip(impls, sns.color_palette("colorblind", len(impls))))
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=colours[i]) for i in impls], impls,
               title="implementation", loc="outside upper center", ncol=len(impls))
    fig.supxlabel("Rows (per model the newest configuration measured):\n"
                  + "\n".join(provenance(best, models)), x=0.01, ha="left",
                  fontsize="x-small", linespacing=1.4)
    return fig

"""What the figures say (issue 12, items 6 and 8): the throughput figure's sources, order and
axis; the curves legend's thin and thick lines; the fit's constants in percent error and the
extrapolation region; legends under the axes; colours that read on white. Figures are built
from results trees written with the scaling.results writers and inspected as matplotlib
objects."""

import json

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import LineCollection
from matplotlib.patches import Rectangle

from analysis.fit import frontier as FR
from analysis.load.bench_rows import load_bench
from analysis.load.runs import load_results, model_order
from analysis.report import figures, figures_bench
from analysis.report.build import analyse
from analysis.report.figures_optimal import budget_colours
from analysis.report.style import MIN_CONTRAST, contrast_on_white, set_style, size_palette
from analysis.synthetic import SIZES, write_bench, write_synthetic_results

matplotlib.use("Agg")
set_style()


@pytest.mark.parametrize("n", range(1, 9))
def test_every_size_and_budget_colour_reads_on_white(n):
    names = [f"m{i}/4" for i in range(n)]
    for colour in [*size_palette(names).values(), *budget_colours(range(n)).values()]:
        assert contrast_on_white(colour) >= MIN_CONTRAST
    assert MIN_CONTRAST == 3.0  # WCAG 2.1 non-text contrast
    # the old cut of viridis (0.85) gave the third of three sizes 1.7:1
    assert contrast_on_white(matplotlib.colormaps["viridis"](0.85)) < 2.0


def _bench_row(model, impl, ips, time, device="NVIDIA H100", **extra):
    params = {m: p for m, p, _ in SIZES}.get(model)
    return {"model": model, "impl": impl, "images_per_s": ips, "mfu": 0.4, "batch_size": 256,
            "image_size": 224, "precision": "bf16", "device": device, "time": time,
            "params": params, **extra}


def _write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def bench_tree(tmp_path):
    """Committed rows for every size (H100), and newer local rows of two sizes (a CPU)."""
    write_bench(tmp_path)  # bench/synthetic.jsonl: the 5 sizes, ours and transformers
    _write_rows(tmp_path / "bench" / "local" / "bench.jsonl", [
        _bench_row("S/16", "ours", 2.5, "2026-11-25T10:00:00+0000", device="AMD EPYC (1 threads)",
                   batch_size=8, precision="fp32", mfu=None),
        _bench_row("S/16", "transformers", 2.4, "2026-11-25T10:00:01+0000",
                   device="AMD EPYC (1 threads)", batch_size=8, precision="fp32", mfu=None),
        _bench_row("B/16", "ours", 900.0, "2024-01-01T00:00:00+0000", device="old GPU")])
    return tmp_path


def test_bench_rows_come_from_both_files_and_the_newest_configuration_wins(bench_tree):
    bench, skipped = load_bench(bench_tree)
    assert skipped == [] and set(bench["source"]) == {"synthetic.jsonl", "local/bench.jsonl"}
    best = figures_bench.comparable_latest(bench).set_index(["model", "impl"])
    assert best.loc[("S/16", "ours"), "source"] == "local/bench.jsonl"  # newer than committed
    assert best.loc[("S/16", "ours"), "images_per_s"] == 2.5
    assert best.loc[("B/16", "ours"), "source"] == "synthetic.jsonl"  # the local row is older
    assert len(best) == 2 * len(SIZES)


def test_throughput_figure_orders_by_size_uses_a_linear_axis_and_names_its_rows(bench_tree):
    bench, _ = load_bench(bench_tree)
    fig = figures.throughput_figure(bench, [])
    ax, mfu = fig.axes[:2]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == [m for m, _, _ in SIZES] != sorted(ticks)  # by params, not by name
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
    labels = [t.get_text() for t in ax.texts]  # each bar's value written on it
    assert len(labels) == 2 * len(SIZES) and "2.5" in labels and "58.9k" in labels
    caption = fig._supxlabel.get_text()
    assert "S/16: AMD EPYC (1 threads) · batch 8 · 224 px · fp32 · 2026-11-25 · local/bench.jsonl" \
        in caption
    assert ("Ti/16, B/16, L/16, H/14: NVIDIA H100 (synthetic) · batch 256 · 224 px · bf16 · "
            "2025-01-01 · synthetic.jsonl") in caption
    assert any("MFU\nunknown" == t.get_text() for t in mfu.texts)  # S/16's CPU rows have none


def test_throughput_order_falls_back_to_the_runs_params(bench_tree):
    rows = [_bench_row(m, "ours", 10.0, "2026-01-01T00:00:00", params=None) for m in
            ("B/16", "Ti/16", "S/16")]
    runs = pd.DataFrame({"model": ["S/16", "Ti/16", "B/16"], "params": [22e6, 5.7e6, 86e6],
                         "macs_per_image": [4.6e9, 1.3e9, 17.6e9]})
    best = figures_bench.comparable_latest(pd.DataFrame(rows).assign(source="x.jsonl"))
    assert figures_bench.bench_order(best, runs) == ["Ti/16", "S/16", "B/16"]


def test_summary_lists_the_benchmark_rows_with_their_file(bench_tree):
    write_synthetic_results(bench_tree, n_evals=6)
    analyse(bench_tree, bench_tree / "out", n_boot=10)
    summary = (bench_tree / "out" / "summary.md").read_text()
    section = summary.split("## Benchmark rows")[1].split("\n## ")[0]
    assert "| S/16 | ours | 2.5 | – | AMD EPYC (1 threads) | 8 | 224 | fp32 |" in section
    assert "`local/bench.jsonl`" in section and "`synthetic.jsonl`" in section


def _curves_inputs(root):
    write_synthetic_results(root, n_evals=8)
    res = load_results(root)
    order = model_order(res.runs)
    return res, order, size_palette(order)


def _legend_texts(fig):
    return [t.get_text() for leg in fig.legends for t in leg.get_texts()]


def _axes_share(fig, ax) -> float:
    fig.canvas.draw()
    return ax.get_position().width


def test_curves_legend_explains_thin_and_thick_lines_and_sits_under_the_axes(tmp_path):
    from analysis.synthetic import write_isoflop_results

    write_isoflop_results(tmp_path, seeds=(0, 1))  # several budgets: thick lines are drawn
    res = load_results(tmp_path)
    order = model_order(res.runs)
    pts = FR.usable_points(res.evals, "flops")
    fig = figures.compute_figure(pts, FR.frontier_table(res.evals, "flops"), order,
                                 size_palette(order))
    texts = _legend_texts(fig)
    assert any(t.startswith("thin line: one run's evals") for t in texts)
    assert any(t.startswith("thick line: a size's final evals") for t in texts)
    assert fig.axes[0].get_legend() is None and len(fig.legends) == 1
    assert _axes_share(fig, fig.axes[0]) > 0.8  # the legend takes no width from the axes


def test_many_points_get_bars_on_final_evals_only(tmp_path):
    res, order, palette = _curves_inputs(tmp_path)
    ev = res.evals
    copies = [ev.assign(run=ev["run"] + f"#{i}", recipe=ev["recipe"] + f"#{i}")
              for i in range(figures.MAX_BARS // len(ev) + 1)]
    pts = FR.usable_points(pd.concat(copies, ignore_index=True), "flops")
    fig = figures.compute_figure(pts, FR.frontier_table(ev, "flops"), order, palette)
    bars = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)
            and all(len(s) == 2 and s[0][0] == s[1][0] for s in c.get_segments())]
    finals = int(pts["is_final"].sum())
    assert len(pts) > figures.MAX_BARS and sum(len(c.get_segments()) for c in bars) == finals
    assert any("drawn on final evals only" in t for t in _legend_texts(fig))


def test_fit_figure_constants_in_percent_and_the_extrapolation_region(tmp_path):
    res, _, palette = _curves_inputs(tmp_path)
    front = FR.frontier_table(res.evals, "flops")
    result = FR.fit_frontier(front, "flops", n_boot=10)
    fig = figures.fit_figure(front, result, palette)
    ax, fit = fig.axes[0], result["fit"]
    texts = _legend_texts(fig)  # one entry per line: the used fit's lines follow its header
    start = next(i for i, t in enumerate(texts) if "fit (used)" in t)
    law = "\n".join(texts[start:start + 6])
    assert "E: top-1 error (%)" in law
    assert f"c = {figures.compact(100 * fit['c'])}%" in law
    assert f"a = {figures.compact(100 * fit['a'])}" in law and f"b = {figures.compact(fit['b'])}" in law
    spans = [p for p in ax.patches if isinstance(p, Rectangle)
             and p.get_label() == "beyond the data: extrapolation"]
    assert len(spans) == 1 and spans[0].get_x() == pytest.approx(front["flops_seen"].max())
    assert spans[0].get_x() + spans[0].get_width() == pytest.approx(ax.get_xlim()[1])
    assert any(t.get_text() == "extrapolation" for t in ax.texts)
    assert ax.get_legend() is None and _axes_share(fig, ax) > 0.8


def test_every_figure_of_the_cli_is_written_with_legends_under_the_axes(tmp_path):
    from analysis.synthetic import write_isoflop_results

    write_isoflop_results(tmp_path / "r", seeds=(0,))
    write_bench(tmp_path / "r")
    report = analyse(tmp_path / "r", tmp_path / "out", n_boot=10)
    names = sorted(p.name for p in report.figures)
    assert names == ["error_vs_flops.png", "optimal_model_size.png", "scaling_law_fit.png",
                     "throughput_mfu.png", "vit_paper_table6.png"]
    from PIL import Image

    for path in report.figures:
        with Image.open(path) as im:
            w, h = im.size
            assert w >= 2000 and 0.4 < h / w < 1.2, path.name  # no legend-eaten strips
            assert np.asarray(im.convert("L")).min() < 50  # something dark was drawn

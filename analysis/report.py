"""The whole analysis in one call: load, frontier, fits, figures, tables and summary.md."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv

from analysis import figures, figures_optimal, paper
from analysis.figures_bench import comparable_latest
from analysis.fit import check_loss
from analysis.frontier import (
    FRONTIER_RTOL,
    fit_frontier,
    frontier_of,
    frontier_points,
    size_table,
    usable_points,
    x_column,
)
from analysis.isoflop import optimal_size
from analysis.load import load_bench, load_results, model_order, select_sweeps
from analysis.memo import FitMemo, plain
from analysis.noise import close_calls
from analysis.style import FORMATS, save_figure, set_style, size_palette
from analysis.summary import render
from analysis.summary_json import write_summary_json

log = logging.getLogger("analysis")
METRICS = ("top1", "error")


def _check_options(metric: str, x: str, formats) -> tuple[str, ...]:
    """Validate the options up front, so a typo fails before any work is done."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; expected one of {METRICS}")
    x_column(x)
    formats = tuple(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"figure formats {bad or formats!r} not supported; choose from {FORMATS}")
    return formats


def write_csv(frame, path: Path) -> None:
    """A table as CSV through pyarrow's writer (some 10x faster than DataFrame.to_csv on a
    study's eval table): strings quoted, booleans true/false, whole floats without ".0"."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    pcsv.write_csv(table, path, write_options=pcsv.WriteOptions(quoting_style="needed"))


def _write_tables(res, out: Path) -> list[Path]:
    """The tidy eval table (CSV and parquet) and the per-run table (CSV)."""
    paths = [out / "evals.csv", out / "evals.parquet", out / "runs.csv"]
    write_csv(res.evals, paths[0])
    res.evals.to_parquet(paths[1], index=False)
    write_csv(res.runs, paths[2])
    return paths


def _scaling_figures(report: dict, out: Path, formats, n_boot: int) -> None:
    """Curves and fit figures from the runs' seed-averaged points (notes where data are
    missing)."""
    res, x, metric, palette = report["results"], report["x"], report["metric"], report["palette"]
    points = usable_points(res.evals, x)
    averaged = frontier_points(res.evals, x)  # seeds averaged, once for all that follows
    frontier = frontier_of(averaged, x)
    report["frontier"], report["fit"] = frontier, {
        "ok": False, "loss": report["loss"], "message": "no frontier points"}
    report["close_calls"] = close_calls(averaged, frontier, x_column(x), FRONTIER_RTOL)
    if points.empty:
        report["notes"].append(f"no eval point with a top-1 and a positive {x} value: scaling "
                               "figures skipped")
        return
    fig = figures.compute_figure(points, frontier, report["order"], palette, x=x, metric=metric,
                                 averaged=averaged)
    report["figures"] += save_figure(fig, out, f"{metric}_vs_{x}", formats)
    report["fit"] = fit_frontier(frontier, x, n_boot=n_boot, loss=report["loss"],
                                 memo=report["memo"])
    if report["fit"]["ok"]:
        fig = figures.fit_figure(frontier, report["fit"], palette, x=x, metric=metric)
        report["figures"] += save_figure(fig, out, "scaling_law_fit", formats)
    else:
        report["notes"].append(f"scaling-law figure skipped: {report['fit']['message']}")


def _optimal_figure(report: dict, out: Path, formats, n_boot: int) -> None:
    """IsoFLOP profiles and N_opt vs C, when some budget has final evals of 2 sizes."""
    report["optimal"] = optimal_size(report["results"].evals, n_boot=n_boot)
    pts = report["optimal"]["points"]
    if len(pts) and pts.groupby("budget")["model"].nunique().max() >= 2:
        fig = figures_optimal.optimal_size_figure(report["optimal"])
        report["figures"] += save_figure(fig, out, "optimal_model_size", formats)
    else:
        report["notes"].append(f"optimal-size figure skipped: {report['optimal']['reason']}")


def _other_figures(report: dict, out: Path, formats, n_boot: int) -> None:
    """Benchmark throughput/MFU (when present) and the ViT paper's Table 6 figure."""
    bench = report["bench"]
    if bench.empty:
        where = report["results"].results_dir / "bench"
        report["notes"].append("throughput/MFU figure skipped: no benchmark rows in "
                               f"{where}/*.jsonl or {where}/local/*.jsonl")
    else:
        report["bench_used"] = comparable_latest(bench)
        fig = figures.throughput_figure(bench, report["order"], report["results"].runs)
        report["figures"] += save_figure(fig, out, "throughput_mfu", formats)
    table = paper.load_table6()
    report["paper_fits"] = {c: paper.fit_table6(table, c, n_boot=n_boot, memo=report["memo"])
                            for c in paper.PANELS}
    fig = paper.table6_figure(table, report["paper_fits"])
    report["figures"] += save_figure(fig, out, "vit_paper_table6", formats)


def _remove_stale(report: dict, out: Path) -> None:
    """Delete our own figure files that this run did not produce (a fit that no longer holds
    must not survive from an earlier run); other files in `out` are left alone."""
    names = (f"{report['metric']}_vs_{report['x']}", "scaling_law_fit", "optimal_model_size",
             "throughput_mfu", "vit_paper_table6")
    produced = set(report["figures"])
    for path in (out / f"{n}.{f}" for n in names for f in FORMATS):
        if path.exists() and path not in produced:
            log.info("removing stale %s", path)
            path.unlink()


def analyse(results_dir, out_dir, *, metric: str = "error", x: str = "flops",
            formats=("png",), n_boot: int = 200, sweeps=None, loss: str = "huber",
            cache_dir=None) -> dict:
    """Run the analysis of `results_dir` (optionally only some sweeps) and write figures, tables,
    summary.md and summary.json to `out_dir`; the law is fitted with `loss` ("huber", the
    default, or "lsq"); parsed metrics are cached in `cache_dir` when given (analysis.cache).
    Raises analysis.load.NoResultsError when there is no run."""
    _check_options(metric, x, formats)
    check_loss(loss)
    res = load_results(results_dir, cache_dir=cache_dir)
    return analyse_results(res, out_dir, metric=metric, x=x, formats=formats, n_boot=n_boot,
                           sweeps=sweeps, loss=loss, cache_dir=cache_dir)


def analyse_results(res, out_dir, *, metric: str = "error", x: str = "flops",
                    formats=("png",), n_boot: int = 200, sweeps=None,
                    loss: str = "huber", cache_dir=None) -> dict:
    """`analyse` from loaded results (analysis.load.Results); benchmark rows are read from
    its results dir; fits are remembered in `cache_dir` when given (analysis.memo)."""
    formats = _check_options(metric, x, formats)
    check_loss(loss)
    if sweeps:
        res = select_sweeps(res, sweeps)
    bench, bench_skipped = load_bench(res.results_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_style()
    order = model_order(res.runs)
    report = {"results": res, "bench": bench, "bench_used": None,
              "skipped": res.skipped + bench_skipped,
              "metric": metric, "x": x, "loss": loss, "order": order,
              "palette": size_palette(order),
              "memo": plain if cache_dir is None else FitMemo(cache_dir),
              "figures": [], "notes": [], "tables": _write_tables(res, out)}
    report["sizes"] = size_table(res.runs, res.evals, order, x)
    if res.runs["sweep"].nunique() > 1:
        # One frontier over several sweeps only makes sense if they share data and recipe.
        report["notes"].append(f"runs of {res.runs['sweep'].nunique()} sweeps are combined "
                               f"({', '.join(sorted(set(res.runs['sweep'])))}); use --sweep "
                               "to analyse one")
    _scaling_figures(report, out, formats, n_boot)
    _optimal_figure(report, out, formats, n_boot)
    _other_figures(report, out, formats, n_boot)
    _remove_stale(report, out)
    report["summary"] = out / "summary.md"
    report["summary"].write_text(render(report))
    report["summary_json"] = write_summary_json(report, out / "summary.json")
    for note in report["notes"]:
        log.info("note: %s", note)
    return report

"""The whole analysis in one call: load, frontier, fits, figures and tables, gathered once into a
frozen Report (analysis.report.summary_data) that summary.md and summary.json are rendered from."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv

from analysis.fit import transfer
from analysis.fit.backtest import run_backtests
from analysis.fit.compute import sweep_compute
from analysis.fit.frontier import (
    FRONTIER_RTOL,
    fit_frontier,
    frontier_of,
    frontier_points,
    size_table,
    usable_points,
    x_column,
)
from analysis.fit.isoflop import optimal_size
from analysis.fit.ladder import run_ladders
from analysis.fit.law import check_loss
from analysis.fit.memo import FitMemo, plain
from analysis.fit.noise import close_calls
from analysis.fit.parametric import fit_parametric, parametric_points
from analysis.load.bench_rows import load_bench
from analysis.load.runs import Results, input_bound, load_results, model_order, select_sweeps
from analysis.load.skips import Skipped, skip
from analysis.report import figures, figures_optimal, figures_transfer, paper
from analysis.report.figures_bench import comparable_latest
from analysis.report.style import FORMATS, save_figure, set_style, size_palette
from analysis.report.summary import render
from analysis.report.summary_data import Report
from analysis.report.summary_json import write_summary_json
from scaling.results import INPUT_BOUND, iter_run_dirs

log = logging.getLogger("analysis")
METRICS = ("top1", "error")  # upstream errors; loss; transfer: fewshot:NAME:K, finetune:NAME


def _check_options(metric: str, x: str, formats) -> tuple[str, ...]:
    """Validate the options up front, so a typo fails before any work is done."""
    transfer.parse_metric(metric)  # ValueError naming the forms
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


def _write_tables(res, rows, out: Path) -> list[Path]:
    """The tidy eval table (CSV and parquet), the per-run table (CSV) and, when there are
    transfer rows, transfer.csv (one row per transfer.jsonl row, with its run)."""
    paths = [out / "evals.csv", out / "evals.parquet", out / "runs.csv"]
    write_csv(res.evals, paths[0])
    res.evals.to_parquet(paths[1], index=False)
    write_csv(res.runs, paths[2])
    stale = out / "transfer.csv"
    if len(rows):
        write_csv(rows, stale)
        paths.append(stale)
    elif stale.exists():
        stale.unlink()
    return paths


@dataclass
class _Work:
    """What the analysis steps share while they run; the frozen Report is made from it once."""

    res: Results  # the metric's results (Report.results)
    upstream: Results
    rows: pd.DataFrame  # transfer rows of these runs
    metric: str
    x: str
    loss: str
    order: list[str]
    palette: dict
    memo: object  # analysis.fit.memo: plain or a FitMemo
    out: Path
    formats: tuple[str, ...]
    n_boot: int
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def save(self, fig, name: str) -> None:
        """Write `fig` as out/name.FORMAT for every format and list the files."""
        self.figures += save_figure(fig, self.out, name, self.formats)


def _scaling_figures(w: _Work) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Curves and fit figures from the runs' seed-averaged points (notes where data are
    missing); returns (frontier, close calls, fit)."""
    x, metric = w.x, w.metric
    slug = transfer.parse_metric(metric).slug
    points = usable_points(w.res.evals, x)
    averaged = frontier_points(w.res.evals, x)  # seeds averaged, once for all that follows
    frontier = frontier_of(averaged, x)
    fit = {"ok": False, "loss": w.loss, "message": "no frontier points"}
    close = close_calls(averaged, frontier, x_column(x), FRONTIER_RTOL)
    if points.empty:
        w.notes.append(f"no eval point with a top-1 and a positive {x} value: scaling "
                       "figures skipped")
        return frontier, close, fit
    w.save(figures.compute_figure(points, frontier, w.order, w.palette, x=x, metric=metric,
                                  averaged=averaged), f"{slug}_vs_{x}")
    fit = fit_frontier(frontier, x, n_boot=w.n_boot, loss=w.loss, memo=w.memo)
    if fit["ok"]:
        w.save(figures.fit_figure(frontier, fit, w.palette, x=x, metric=metric),
               "scaling_law_fit")
    else:
        w.notes.append(f"scaling-law figure skipped: {fit['message']}")
    return frontier, close, fit


def _optimal_figure(w: _Work) -> tuple[dict, dict]:
    """IsoFLOP profiles and N_opt vs C (approach 3's line beside approach 2's), when some
    budget has final evals of 2 sizes; returns (analysis.fit.isoflop.optimal_size's result,
    analysis.fit.parametric.fit_parametric's)."""
    optimal = optimal_size(w.res.evals, n_boot=w.n_boot)
    parametric = fit_parametric(parametric_points(w.res), n_boot=w.n_boot, memo=w.memo)
    pts = optimal["points"]
    if len(pts) and pts.groupby("budget")["model"].nunique().max() >= 2:
        label = "Top-1 error" if w.metric in METRICS else figures.metric_label(w.metric)
        w.save(figures_optimal.optimal_size_figure(optimal, label, parametric),
               "optimal_model_size")
    else:
        w.notes.append(f"optimal-size figure skipped: {optimal['reason']}")
    return optimal, parametric


def _other_figures(w: _Work, bench: pd.DataFrame) -> tuple[pd.DataFrame | None, dict]:
    """Benchmark throughput/MFU (when present) and the ViT paper's Table 6 figure; returns (the
    benchmark rows shown or None, the Table 6 fits)."""
    used = None
    if bench.empty:
        where = w.res.results_dir / "bench"
        w.notes.append("throughput/MFU figure skipped: no benchmark rows in "
                       f"{where}/*.jsonl or {where}/local/*.jsonl")
    else:
        used = comparable_latest(bench)
        w.save(figures.throughput_figure(bench, w.order, w.res.runs), "throughput_mfu")
    table = paper.load_table6()
    fits = {c: paper.fit_table6(table, c, n_boot=w.n_boot, memo=w.memo) for c in paper.PANELS}
    w.save(paper.table6_figure(table, fits), "vit_paper_table6")
    return used, fits


def _remove_stale(w: _Work) -> None:
    """Delete our own figure files that this run did not produce (a fit that no longer holds
    must not survive from an earlier run); other files in `out` are left alone."""
    names = (f"{transfer.parse_metric(w.metric).slug}_vs_{w.x}",
             "scaling_law_fit", "optimal_model_size", "throughput_mfu", "vit_paper_table6",
             "upstream_vs_transfer", "upstream_to_transfer")
    produced = set(w.figures)
    for path in (w.out / f"{n}.{f}" for n in names for f in FORMATS):
        if path.exists() and path not in produced:
            log.info("removing stale %s", path)
            path.unlink()


def _transfer_figure(w: _Work) -> None:
    """Upstream and transfer panels side by side (ViT paper Fig. 5), whenever transfer rows
    exist, whatever --metric is."""
    rows, res, x = w.rows, w.upstream, w.x
    if rows.empty:
        w.notes.append("upstream-vs-transfer figure skipped: no transfer.jsonl rows")
        return
    panels = []
    for metric in ["error", *figures_transfer.panel_metrics(rows, w.metric)]:
        m = transfer.parse_metric(metric)
        evals = res.evals if not m.transfer else transfer.transfer_evals(res, rows, m)
        averaged = frontier_points(evals, x)
        panels.append({"metric": metric, "averaged": averaged,
                       "frontier": frontier_of(averaged, x)})
    w.save(figures_transfer.transfer_figure(panels, w.order, w.palette, x=x),
           "upstream_vs_transfer")


def _ladder(w: _Work) -> dict:
    """Every transfer metric predicted from the upstream loss in two steps
    (analysis.fit.ladder), and their figure when some prediction was made."""
    if w.rows.empty:
        return {}
    ladder = run_ladders(w.upstream, w.rows, x=w.x, loss=w.loss, memo=w.memo, n_boot=w.n_boot)
    if any(e["predictions"] for e in ladder.values()):
        w.save(figures_transfer.ladder_figure(ladder, w.order, w.palette), "upstream_to_transfer")
    else:
        w.notes.append("upstream-to-transfer figure skipped: "
                       + "; ".join(f"{m}: {e['reason']}" for m, e in ladder.items()))
    return ladder


def _note_input_bound(w: _Work, shown: int = 10) -> tuple[dict, ...]:
    """The input-bound runs (analysis.load.runs.input_bound), and a note naming them."""
    bound = tuple(input_bound(w.upstream.runs))
    if not bound:
        return bound
    named = ", ".join(f"{r['run']} ({100 * r['data_wait_fraction']:.1f} %)"
                      for r in bound[:shown])
    more = (f" and {len(bound) - shown} more (summary.json input_bound)"
            if len(bound) > shown else "")
    w.notes.append(
        f"{len(bound)} input-bound run(s), waiting for the next batch over "
        f"{100 * INPUT_BOUND:.0f} % of their loop time (final.json data_wait_fraction): "
        f"{named}{more}; their device-hours and MFU are the loader's, not the model's (rerun "
        "with more --num-workers, in-memory data or --decode-on device)")
    return bound


def read_transfer(results_dir, sweeps=None) -> tuple:
    """(transfer rows of the named sweeps, or all; the lines skipped) under `results_dir`."""
    skipped: list[Skipped] = []
    rows = transfer.read_rows(results_dir, lambda path, reason, line: skip(
        skipped, path, reason, line))
    if sweeps:
        keep = rows["run"].str.split("/").str[0].isin(list(sweeps))
        skipped = [s for s in skipped if Path(s.path).parent.parent.name in sweeps]
        rows = rows[keep].reset_index(drop=True)
    return rows, skipped


def analyse(results_dir, out_dir, *, metric: str = "error", x: str = "flops",
            formats=("png",), n_boot: int = 200, sweeps=None, loss: str = "huber",
            cache_dir=None) -> Report:
    """Run the analysis of `results_dir` (optionally only some sweeps) and write figures, tables,
    summary.md and summary.json to `out_dir`; the law is fitted with `loss` ("huber", the
    default, or "lsq"); parsed metrics are cached in `cache_dir` when given (analysis.load.cache).
    `metric`: error, top1, loss, fewshot:NAME:K or finetune:NAME (analysis.fit.transfer); one
    without rows raises transfer.MetricError before anything is written. Raises
    analysis.load.runs.NoResultsError when there is no run. Returns the Report
    (analysis.report.summary_data) both summaries were rendered from."""
    _check_options(metric, x, formats)
    check_loss(loss)
    root = Path(results_dir)
    runs_here = root.is_dir() and next(iter_run_dirs(root), None) is not None
    rows = read_transfer(root, sweeps) if runs_here else None
    if rows is not None and all((root / w).is_dir() for w in sweeps or ()):
        transfer.check_metric(transfer.parse_metric(metric), rows[0], results_dir)
    res = load_results(results_dir, cache_dir=cache_dir)
    return analyse_results(res, out_dir, metric=metric, x=x, formats=formats, n_boot=n_boot,
                           sweeps=sweeps, loss=loss, cache_dir=cache_dir, transfer_rows=rows)


def _metric_results(res: Results, rows, metric: str) -> Results:
    """`res` with its eval table replaced by the transfer metric's points, or by the eval losses
    for `loss` (unchanged for an upstream error)."""
    m = transfer.parse_metric(metric)
    if metric == "loss":
        return dataclasses.replace(res, evals=transfer.loss_evals(res.evals))
    if not m.transfer:
        return res
    return dataclasses.replace(res, evals=transfer.transfer_evals(res, rows, m))


def analyse_results(res, out_dir, *, metric: str = "error", x: str = "flops",
                    formats=("png",), n_boot: int = 200, sweeps=None,
                    loss: str = "huber", cache_dir=None, transfer_rows=None) -> Report:
    """`analyse` from loaded results (analysis.load.runs.Results); benchmark rows are read from
    its results dir; fits are remembered in `cache_dir` when given (analysis.fit.memo);
    `transfer_rows`: (rows, skipped) of analysis.report.build.read_transfer, read when None."""
    formats = _check_options(metric, x, formats)
    check_loss(loss)
    if sweeps:
        res = select_sweeps(res, sweeps)
    rows, t_skipped = transfer_rows or read_transfer(res.results_dir, sweeps)
    transfer.check_metric(transfer.parse_metric(metric), rows, res.results_dir)
    rows = rows[rows["run"].isin(set(res.runs["run"]))].reset_index(drop=True)
    bench, bench_skipped = load_bench(res.results_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_style()
    order = model_order(res.runs)
    w = _Work(res=_metric_results(res, rows, metric), upstream=res, rows=rows, metric=metric,
              x=x, loss=loss, order=order, palette=size_palette(order),
              memo=plain if cache_dir is None else FitMemo(cache_dir), out=out,
              formats=formats, n_boot=n_boot)
    tables = _write_tables(res, rows, out)
    _note_combined(w)
    if metric == "loss" and transfer.loss_spread_note(w.res.evals):
        w.notes.append(transfer.loss_spread_note(w.res.evals))
    sizes = size_table(res.runs, w.res.evals, order, x)
    bound = _note_input_bound(w)
    frontier, close, fit = _scaling_figures(w)
    optimal, parametric = _optimal_figure(w)
    _transfer_figure(w)
    ladder = _ladder(w)
    bench_used, paper_fits = _other_figures(w, bench)
    _remove_stale(w)
    report = Report(
        results=w.res, upstream=res, transfer_rows=rows, bench=bench, bench_used=bench_used,
        skipped=tuple(res.skipped + t_skipped + bench_skipped), metric=metric, x=x, loss=loss,
        order=tuple(order), sizes=sizes, frontier=frontier, close_calls=close, fit=fit,
        optimal=optimal, parametric=parametric, paper_fits=paper_fits, input_bound=bound,
        backtest=run_backtests(w.res.evals, x, loss=loss, memo=w.memo), ladder=ladder,
        compute=sweep_compute(w.res), figures=tuple(w.figures), notes=tuple(w.notes),
        tables=tuple(tables), summary=out / "summary.md", summary_json=out / "summary.json")
    report.summary.write_text(render(report))
    write_summary_json(report, report.summary_json)
    for note in report.notes:
        log.info("note: %s", note)
    return report


def _note_combined(w: _Work) -> None:
    """Notes on runs left out (fine-tunes) and on runs of several sweeps or data sets."""
    res = w.upstream
    if res.finetunes:
        w.notes.append(
            f"{len(res.finetunes)} fine-tune run(s) left out of the curves (they train on "
            "another data set from a finished run; their top-1 is in that run's transfer rows: "
            f"--metric finetune:NAME): {', '.join(res.finetunes[:5])}"
            + (" ..." if len(res.finetunes) > 5 else ""))
    if res.runs["sweep"].nunique() > 1:
        # One frontier over several sweeps only makes sense if they share data and recipe.
        w.notes.append(f"runs of {res.runs['sweep'].nunique()} sweeps are combined "
                       f"({', '.join(sorted(set(res.runs['sweep'])))}); use --sweep "
                       "to analyse one")
    if len(res.data_sets) > 1:
        w.notes.append(
            f"runs on {len(res.data_sets)} different data sets are combined ("
            + "; ".join(f"{d}: {', '.join(s)}" for d, s in res.data_sets.items())
            + "): one frontier and one law over them mix different tasks; use --sweep")

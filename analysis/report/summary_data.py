"""The `Report`: every number summary.md and summary.json show, computed once by
analysis.report.build.analyse and read by attribute by both renderers (summary.py, summary_json.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.load.runs import Results
from analysis.load.skips import Skipped


@dataclass(frozen=True, eq=False)  # eq=False: DataFrames have no truth value to compare by
class Report:
    """One analysis of a results dir: inputs, fits, figures written and notes (units per field)."""

    results: Results  # runs and eval points of `metric` (a transfer metric's points as evals)
    upstream: Results  # the same runs with their upstream evals, whatever `metric` is
    transfer_rows: pd.DataFrame  # transfer.jsonl rows of these runs, one per row (may be empty)
    bench: pd.DataFrame  # every benchmark row read from RESULTS/bench (images/s, MFU fraction)
    bench_used: pd.DataFrame | None  # rows behind throughput_mfu; None without benchmark rows
    skipped: tuple[Skipped, ...]  # files and lines left out: runs, transfer rows, bench rows
    metric: str  # the metric analysed: error, top1, fewshot:NAME:K or finetune:NAME
    x: str  # the compute axis: flops, images or device_hours (unit: style.X_UNITS[x])
    loss: str  # loss of the law fit: huber or lsq
    order: tuple[str, ...]  # model names, smallest to largest
    sizes: pd.DataFrame  # per model: runs, params, GMACs/image, best top-1 (fraction), compute
    frontier: pd.DataFrame  # compute-optimal seed-averaged points (compute in x's unit, error)
    close_calls: pd.DataFrame  # frontier points another size ties with (errors as fractions)
    fit: dict  # analysis.fit.frontier.fit_frontier's result, or {"ok": False, "message", ...}
    optimal: dict  # analysis.fit.isoflop.optimal_size's result (compute in FLOPs, N in params)
    parametric: dict  # analysis.fit.parametric.fit_parametric's result (N params, D images)
    backtest: dict  # analysis.fit.backtest.run_backtests: {"METHOD:KIND": entry}, rel. errors
    ladder: dict  # analysis.fit.ladder.run_ladders: {transfer metric: entry}, errors as fractions
    paper_fits: dict[str, dict]  # per ViT paper Table 6 panel, its law fit (C in exaFLOPs)
    input_bound: tuple[dict, ...]  # runs over INPUT_BOUND: {run, model, data_wait_fraction}
    compute: dict[str, float]  # compute_spent, compute_independent in training FLOPs
    figures: tuple[Path, ...]  # figure files written, in the order they were made
    notes: tuple[str, ...]  # one line each: what was skipped or combined, and why
    tables: tuple[Path, ...]  # evals.csv, evals.parquet, runs.csv (and transfer.csv) written
    summary: Path  # where summary.md is written
    summary_json: Path  # where summary.json is written

"""Scaling figures, tidy tables and summary.md from a results directory: checks the flags (one
line, exit 2), runs analysis.report.build.analyse and prints what it wrote. Flags (--metric:
error|top1|fewshot:NAME:K|finetune:NAME), outputs and exit status: analysis/README.md.

    python analysis/plot_scaling.py [--results results] [--out RESULTS/figures] [--metric M]
        [--x flops|images|device_hours] [--formats png,pdf,svg] [--sweep NAME[,NAME]]
        [--n-boot 200] [--fit huber|lsq] [--cache-dir DIR | --no-cache]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import matplotlib

from analysis.fit.law import LOSSES
from analysis.fit.transfer import MetricError, parse_metric
from analysis.load.cache import CACHE_DIR
from analysis.load.runs import NoResultsError
from analysis.load.skips import count_skipped
from analysis.load.sweeps import SweepError, check_sweeps
from analysis.load.tables import X_COLUMNS
from analysis.report.build import analyse
from analysis.report.style import FORMATS


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _out_problem(out: Path) -> str | None:
    """Why --out cannot be the output folder (None when it can be made or is one)."""
    folder = out
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"--out {out}: {folder} exists and is not a directory"
    return None


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = _Parser(description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("results"),
                   help="results directory holding <sweep>/<run>/ dirs (default: results)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default: RESULTS/figures)")
    p.add_argument("--metric", default="error",
                   help="y axis: upstream top-1 error (log axis), top1 accuracy, loss (eval "
                        "cross-entropy, nats), or a "
                        "transfer error: fewshot:NAME:K (K-shot probe on downstream set NAME) "
                        "or finetune:NAME (default: error)")
    p.add_argument("--x", choices=sorted(X_COLUMNS), default="flops",
                   help="compute axis: training FLOPs, images seen or device hours "
                        "(default: flops)")
    p.add_argument("--formats", default="png",
                   help="comma-separated figure formats from png,pdf,svg (default: png)")
    p.add_argument("--sweep", default="",
                   help="comma-separated sweep names (folders under RESULTS) to analyse "
                        "(default: all runs)")
    p.add_argument("--n-boot", type=int, default=200,
                   help="bootstrap resamples for the fit intervals (default: 200)")
    p.add_argument("--fit", choices=LOSSES, default="huber",
                   help="loss of the scaling-law fit: huber (robust, default) or lsq (least "
                        "squares); the other is reported for comparison")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--cache-dir", type=Path, default=None,
                       help="where parsed metrics files are cached (default: "
                            "OUT/.analysis-cache)")
    cache.add_argument("--no-cache", action="store_true",
                       help="parse every metrics file, read and write no cache")
    args = p.parse_args(argv)
    try:
        parse_metric(args.metric)
    except ValueError as e:
        p.error(str(e))
    args.formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    bad = [f for f in args.formats if f not in FORMATS]
    if bad or not args.formats:
        p.error(f"--formats {bad or args.formats} not supported; choose from {','.join(FORMATS)}")
    if args.n_boot < 10:
        p.error(f"--n-boot must be at least 10; got {args.n_boot}")
    problem = _out_problem(args.out if args.out is not None else args.results / "figures")
    if problem:
        p.error(problem)
    args.sweeps = [w for w in args.sweep.split(",") if w]
    try:  # before anything is parsed: an unknown name, or a folder of fine-tunes (N36, N36b)
        check_sweeps(args.results, args.sweeps)
    except SweepError as e:
        p.error(str(e))
    return args


def main(argv=None) -> int:
    """Run the analysis; return the process exit status."""
    matplotlib.use("Agg")  # headless: the figures are files, never windows
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("analysis").setLevel(logging.INFO)
    args = parse_args(argv)
    out = args.out if args.out is not None else args.results / "figures"
    cache_dir = None if args.no_cache else args.cache_dir or out / CACHE_DIR
    try:
        report = analyse(args.results, out, metric=args.metric, x=args.x,
                         formats=args.formats, n_boot=args.n_boot, loss=args.fit,
                         sweeps=args.sweeps, cache_dir=cache_dir)
    except NoResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except MetricError as e:  # a --metric without rows: nothing was written
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        return 2
    for path in (*report.figures, *report.tables, report.summary, report.summary_json):
        print(path)
    cache = report.results.cache
    if cache is not None:
        print(f"metrics cache {cache['path']}: {cache['hits']} files reused, {cache['parsed']} "
              "parsed")
    files, lines = count_skipped(report.skipped)
    print(f"{files} skipped files, {lines} skipped lines; {len(report.notes)} notes "
          f"(see {report.summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

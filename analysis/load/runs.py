"""Results directory -> tidy pandas DataFrames (one row per eval point, one row per run) and what
compute accounting needs of every run dir. Reads the layout of scaling/results.py through its
helpers, never logs; nothing is dropped silently: each file or line it cannot use is logged,
skipped and listed in `Results.skipped`. The rules, derived columns and their approximations,
and the cache are in analysis/README.md ("What the loader skips", "Tidy table", "Speed").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.load.cache import MetricsCache
from analysis.load.checks import final_problem
from analysis.load.metrics_file import EVAL_FIELDS, Parsed, flops_value
from analysis.load.parse_pool import MIN_BYTES, parse_all, read_and_parse
from analysis.load.skips import (  # noqa: F401 (count_skipped: part of the API)
    Skipped,
    count_skipped,
    read_error,
    skip,
)
from analysis.load.sweeps import is_finetune, repeats_left_out
from analysis.load.tables import (  # noqa: F401 (EVAL_COLUMNS: part of the API)
    EVAL_COLUMNS,
    STATUS_RUNNING,
    eval_table,
    fill_params,
)
from scaling.branch import trunk_dir
from scaling.results import (
    CONFIG_FILE,
    FINAL_FILE,
    INPUT_BOUND,
    METRICS_FILE,
    PLAN_FILE,
    SchemaError,
    iter_run_dirs,
    read_final,
    read_json,
)
from scaling.vitconfig import split_name

# Config fields that do not make two runs different experiments: the seed (runs that differ
# only by it are repeats, averaged by aggregate_seeds) and where or how often things are
# written (scaling.config.RESUMABLE_FIELDS; tests/test_analysis_noise.py keeps this a superset).
NOT_RECIPE = ("seed", "out", "data", "num_workers", "log_every", "progress", "eval_every",
              "eval_spacing", "ckpt_every", "keep_ckpts", "tensorboard", "wandb",
              "stop_poll_every", "compile",
              "trunk_run")  # a branch's trunk is per seed (launchers/branching.py)


def recipe_key(sweep: str, config: dict) -> str:
    """A short id of the experiment a run belongs to: its sweep and config without NOT_RECIPE
    fields, so the seeds of one (model, budget, recipe) share it."""
    kept = {k: v for k, v in config.items() if k not in NOT_RECIPE}
    text = json.dumps([sweep, kept], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


STATUS_ORDER = ("ok", STATUS_RUNNING, "failed", "diverged")
RUN_COLUMNS = (
    "sweep", "run_id", "run", "model", "size", "patch", "status", "seed", "lr", "batch_size",
    "budget", "recipe", "params", "macs_per_image", "n_evals", "best_top1", "final_top1",
    "images_seen", "total_flops", "wall_hours", "device_hours", "data_wait_fraction", "message",
)


def flops_budget(config: dict) -> float:
    """The run's FLOPs budget (config `flops`), NaN when it had another kind of budget."""
    v = config.get("flops")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


@dataclass(frozen=True)
class RunSpend:
    """The compute one run dir has spent, as analysis.fit.compute counts it."""

    run: str  # its path under the results dir (sweep/run_id)
    flops: float  # training FLOPs so far: final.json total_flops (0 if unreadable), else the
    #               largest flops_seen of its metrics rows, train rows included (0 before one)
    trunk_run: str | None  # config: a branch's trunk (scaling.branch.trunk_dir)
    branch_step: int | None  # config: the trunk step a branch starts from
    batch_size: int | None
    macs_per_image: float | None  # plan.json's (None before the run started)


class NoResultsError(ValueError):
    """The results directory is missing or holds no readable run."""


@dataclass
class Results:
    """Everything read from a results directory."""

    results_dir: Path
    evals: pd.DataFrame
    runs: pd.DataFrame
    skipped: list[Skipped] = field(default_factory=list)
    cache: dict | None = None  # {"path", "hits", "parsed"} when read through the cache
    # branching sweeps: {run: branch_step} of every branch, and the runs that are trunks
    branches: dict = field(default_factory=dict)
    trunks: frozenset = frozenset()
    # fine-tune run dirs (config `init_from`, scaling.finetune) left out: they train on another
    # data set from a finished run; their results are that run's transfer rows (finetune:NAME)
    finetunes: tuple = ()
    # {data dir as the runs' configs name it: the sweeps whose runs trained on it}; runs of
    # several data sets in one frontier are not one scaling study (analysis.report.build notes it)
    data_sets: dict = field(default_factory=dict)
    # what compute accounting (analysis.fit.compute) needs of every run dir with a readable
    # config.json, fine-tunes and skipped runs included (whatever --sweep selects)
    spend: tuple[RunSpend, ...] = ()

    @property
    def n_skipped(self) -> int:
        """How many files and metric lines were skipped."""
        return len(self.skipped)


def _metrics_rows(path: Path, cache: MetricsCache | None, root: Path, parsed: dict) -> Parsed:
    """What one metrics.jsonl holds: from the cache when its key is unchanged, else parsed (by
    a worker, in `parsed`, or here) and stored."""
    rel = str(path.relative_to(root))
    if cache is not None:
        hit = cache.get(rel, os.stat(path))
        if hit is not None:
            return hit
    got = parsed.pop(path, None) or read_and_parse(str(path))
    if isinstance(got, OSError):
        raise got
    out, before, after, read_ns = got
    if cache is not None:
        cache.put(rel, before, after, read_ns, out)
    return out


def _parse_ahead(run_dirs: list[Path], cache: MetricsCache | None, root: Path,
                 workers: int | None) -> dict:
    """The metrics files the cache cannot serve, parsed in worker processes when there are
    enough of them (analysis.load.parse_pool); {} otherwise."""
    todo = []
    for run_dir in run_dirs:
        path = run_dir / METRICS_FILE
        try:
            if cache is None or not cache.has(str(path.relative_to(root)), os.stat(path)):
                todo.append(path)
        except OSError:
            continue  # absent or unreadable: reported where it is read
    # Asked for by number, workers are used however little there is to parse.
    return parse_all(todo, workers, min_bytes=MIN_BYTES if workers is None else 0)


def _read_metrics(run_dir: Path, skipped: list[Skipped], cache: MetricsCache | None,
                  root: Path, parsed: dict) -> Parsed:
    """What a run's metrics.jsonl holds (no rows if it has none or cannot be read); every
    line left out is reported and counted once, naming file, line and reason."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return _NO_ROWS
    try:
        got = _metrics_rows(path, cache, root, parsed)
    except OSError as e:
        skip(skipped, path, e)
        return _NO_ROWS
    for line, reason in got.skips:
        skip(skipped, path, reason, line)
    return got


_NO_ROWS = Parsed(np.empty((0, len(EVAL_FIELDS))), [], 0.0)


def read_plan(run_dir: Path, skipped: list[Skipped]) -> dict:
    """RUN_DIR/plan.json (params, MACs, world size of a started run), or {} if absent/bad."""
    path = run_dir / PLAN_FILE
    if not path.exists():
        return {}
    try:
        plan = read_json(path)
    except (SchemaError, OSError, UnicodeDecodeError) as e:
        skip(skipped, path, read_error(path, e))
        return {}
    return {k: plan[k] for k in ("params", "macs_per_image", "world_size") if k in plan}


def _own_evals(evals: np.ndarray, config: dict) -> np.ndarray:
    """A branch run (launchers/branching.py) starts with a copy of its trunk's metrics rows up
    to `branch_step`; those evals are the trunk's measurements and are counted in the trunk's
    run dir, so a branch keeps only the rows it measured itself (step > branch_step)."""
    branch_step = config.get("branch_step")
    if branch_step is None or not len(evals):
        return evals
    return evals[evals[:, EVAL_FIELDS.index("step")] > branch_step]


def _mark_trunks(runs: list[dict]) -> None:
    """`_trunk`: the run is a branching sweep's trunk (some run of its sweep names it as
    `trunk_run`). Its evals are measurements like any (learning curve, frontier), but its last
    one is no budget's final eval: it stops at a constant (or rsqrt) lr, before any cooldown,
    at the largest branch point; so it never counts as a final eval (analysis.load.tables)."""
    dirs = [trunk_dir(r["run"], t) for r in runs if (t := r["_trunk_run"])]  # sweep/run_id
    trunks = {(d.parent.name, d.name) for d in dirs}
    for r in runs:
        r["_trunk"] = (r["sweep"], r["run_id"]) in trunks


def _read_run(run_dir: Path, skipped: list[Skipped], cache: MetricsCache | None,
              root: Path, parsed: dict) -> tuple[dict, np.ndarray, RunSpend] | None:
    """Read one run dir into (run record, eval rows, RunSpend); None if it cannot be
    interpreted."""
    try:
        config = read_json(run_dir / CONFIG_FILE)
        size, patch = split_name(config.get("model"))
    except (SchemaError, OSError, UnicodeDecodeError, ValueError) as e:
        path = run_dir / CONFIG_FILE
        skip(skipped, path, f"{read_error(path, e)}; run skipped")
        return None
    path = run_dir / FINAL_FILE
    try:
        final = read_final(run_dir)
        problem = final_problem(final) if final is not None else None
        if problem:
            raise SchemaError(problem)
    except (SchemaError, OSError, UnicodeDecodeError) as e:
        # Without a trustworthy final.json the run's status is unknown: skip it, never guess.
        skip(skipped, path, f"{read_error(path, e)}; run skipped")
        return None
    got = _read_metrics(run_dir, skipped, cache, root, parsed)
    evals = _own_evals(got.rows, config)
    plan = read_plan(run_dir, skipped)
    spend = _spend(run_dir, root, config, final, got.max_flops, plan)
    final = {**plan, **{k: v for k, v in (final or {}).items() if v is not None}}
    run = {
        "sweep": run_dir.parent.name, "run_id": run_dir.name,
        "run": f"{run_dir.parent.name}/{run_dir.name}", "model": config["model"],
        "size": size, "patch": patch, "status": final.get("status", STATUS_RUNNING),
        "seed": config.get("seed"), "lr": config.get("lr"), "batch_size": config.get("batch_size"),
        "budget": flops_budget(config), "recipe": recipe_key(run_dir.parent.name, config),
        "params": final.get("params"), "macs_per_image": final.get("macs_per_image"),
        "n_evals": len(evals), "final_top1": final.get("final_top1"),
        "images_seen": final.get("images_seen"), "total_flops": final.get("total_flops"),
        "wall_hours": final.get("wall_hours"), "device_hours": final.get("device_hours"),
        "data_wait_fraction": final.get("data_wait_fraction"),  # absent before it existed
        "message": final.get("error"),
        "_trunk_run": config.get("trunk_run"), "_branch_step": config.get("branch_step"),
        "_world_size": final.get("world_size") or config.get("world_size"),
        "_data": config.get("data"),
    }
    return run, evals, spend


def _spend(run_dir: Path, root: Path, config: dict, final: dict | None, max_flops: float,
           plan: dict) -> RunSpend:
    """A run's RunSpend from its config, final.json (None: there is none) and plan.json."""
    done = max_flops if final is None else final.get("total_flops")
    return RunSpend(str(run_dir.relative_to(root)), flops_value(done), config.get("trunk_run"),
                    config.get("branch_step"), config.get("batch_size"),
                    plan.get("macs_per_image"))


def _unread_spend(run_dir: Path, root: Path, cache: MetricsCache | None,
                  parsed: dict) -> RunSpend | None:
    """The RunSpend of a run dir the tables leave out (a fine-tune, or a run skipped for its
    config's model or its final.json), None when its config.json cannot be read. Nothing is
    reported here: the tables' reading reports what it skips."""
    try:
        config = read_json(run_dir / CONFIG_FILE)
    except (SchemaError, OSError, UnicodeDecodeError):
        return None
    final, max_flops = None, 0.0
    if (run_dir / FINAL_FILE).is_file():
        try:
            final = read_json(run_dir / FINAL_FILE)
        except (SchemaError, OSError, UnicodeDecodeError):
            final = {}  # unreadable: nothing known to be spent
    else:
        max_flops = _read_metrics(run_dir, [], cache, root, parsed).max_flops
    return _spend(run_dir, root, config, final, max_flops, read_plan(run_dir, []))


def load_results(results_dir, *, cache_dir=None, workers: int | None = None) -> Results:
    """Read every run under `results_dir` into tidy eval and run tables (see module docstring);
    with `cache_dir`, parsed metrics files are kept there and reused while unchanged
    (analysis.load.cache); the files to parse are parsed by `workers` processes (analysis.load.parse_pool;
    default: the CPUs, at most 8, and only when there is over MIN_BYTES to parse; 1: this
    process only)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise NoResultsError(f"results dir {str(root)!r} does not exist or is not a directory")
    run_dirs = list(iter_run_dirs(root))
    if not run_dirs:
        raise NoResultsError(f"no runs under {str(root)!r}: no <sweep>/<run>/{CONFIG_FILE} found")
    cache = None if cache_dir is None else MetricsCache(cache_dir, root)
    parsed = _parse_ahead(run_dirs, cache, root, workers)
    skipped: list[Skipped] = []
    runs, blocks, spend = [], [], []
    finetunes = tuple(str(d.relative_to(root)) for d in run_dirs if is_finetune(d))
    for run_dir in run_dirs:
        read = None
        if str(run_dir.relative_to(root)) not in finetunes:
            read = _read_run(run_dir, skipped, cache, root, parsed)
        if read is None:
            spend.extend(filter(None, [_unread_spend(run_dir, root, cache, parsed)]))
            continue
        run, rows, record = read
        top1 = rows[:, EVAL_FIELDS.index("top1")]
        run["best_top1"] = float(top1.max()) if len(top1) else math.nan
        runs.append(run)
        blocks.append(rows)
        spend.append(record)
    kept = repeats_left_out(runs, skipped, root)
    runs, blocks = [runs[i] for i in kept], [blocks[i] for i in kept]
    _mark_trunks(runs)
    if not runs:
        raise NoResultsError(f"none of the {len(run_dirs)} runs under {str(root)!r} could be "
                             f"read; skipped: {[s.path for s in skipped]}")
    if cache is not None:
        cache.save()
    run_df = pd.DataFrame(runs).reindex(columns=RUN_COLUMNS)
    fill_params(run_df, blocks)
    eval_df = eval_table(runs, blocks, run_df)
    for frame in (run_df, eval_df):  # config values: numbers, so the parquet columns are typed
        for col in ("seed", "lr", "batch_size"):
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    run_df["final_top1"] = run_df["final_top1"].astype(float)  # null (no eval) -> NaN
    run_df["data_wait_fraction"] = pd.to_numeric(run_df["data_wait_fraction"], errors="coerce")
    eval_df["is_final"] = eval_df["is_final"].astype(bool)
    stats = None if cache is None else {"path": str(cache.path), "hits": cache.hits,
                                        "parsed": cache.parsed}
    branches = {r["run"]: r["_branch_step"] for r in runs if r["_branch_step"] is not None}
    trunks = frozenset(r["run"] for r in runs if r["_trunk"])
    data_sets: dict[str, set] = {}
    for r in runs:
        data_sets.setdefault(str(r["_data"]), set()).add(r["sweep"])
    return Results(root, eval_df, run_df, skipped, stats, branches, trunks, finetunes,
                   {d: sorted(s) for d, s in sorted(data_sets.items())}, tuple(spend))


def select_sweeps(res: Results, sweeps) -> Results:
    """Keep only the runs of the named sweeps; an unknown name is an error listing the known."""
    sweeps = list(sweeps)
    known = sorted(set(res.runs["sweep"]))
    unknown = [s for s in sweeps if s not in known]
    if unknown:
        raise NoResultsError(f"sweep(s) {unknown} not found under {str(res.results_dir)!r}; "
                             f"found {known}")
    keep = res.runs["sweep"].isin(sweeps)
    return dataclasses.replace(
        res, evals=res.evals[res.evals["sweep"].isin(sweeps)].reset_index(drop=True),
        runs=res.runs[keep].reset_index(drop=True),
        data_sets={d: kept for d, ss in res.data_sets.items()
                   if (kept := [s for s in ss if s in sweeps])})


def model_order(frame: pd.DataFrame) -> list[str]:
    """Model names ordered small -> large: by params, then MACs per image, then name."""
    if frame.empty:
        return []
    key = frame.groupby("model").agg(params=("params", "median"),
                                     macs=("macs_per_image", "median"))
    key = key.fillna(np.inf).reset_index()
    key["patch"] = [-split_name(m)[1] for m in key["model"]]
    return key.sort_values(["params", "macs", "patch", "model"])["model"].tolist()


def input_bound(runs: pd.DataFrame) -> list[dict]:
    """The runs whose final.json data_wait_fraction passed scaling.results.INPUT_BOUND (their
    loader set their speed), most input-bound first: [{run, model, data_wait_fraction}]. Runs
    without the field (written before it existed, or still running) are not among them."""
    bound = runs[runs["data_wait_fraction"] > INPUT_BOUND]
    bound = bound.sort_values("data_wait_fraction", ascending=False, kind="stable")
    return [{"run": r.run, "model": r.model, "data_wait_fraction": float(r.data_wait_fraction)}
            for r in bound.itertuples()]


def status_counts(runs: pd.DataFrame) -> dict[str, int]:
    """Number of runs per status, in a fixed order (ok, running, failed, diverged)."""
    counts = runs["status"].value_counts()
    out = {s: int(counts.get(s, 0)) for s in STATUS_ORDER}
    out.update({s: int(n) for s, n in counts.items() if s not in out})
    return out

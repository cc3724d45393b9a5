"""Results directory -> tidy pandas DataFrames (one row per eval point, one row per run).

Reads the layout defined in scaling/results.py (``RESULTS/<sweep>/<run_id>/config.json``,
``metrics.jsonl``, ``final.json``) through its helpers and never parses logs. Nothing is dropped
silently: runs that are still going (no final.json) get status "running", failed and diverged
runs keep their status, and a file or metrics line that cannot be used is logged with its path
(``path:line`` for a line) and the reason, skipped, and listed in ``Results.skipped``.

What is skipped (analysis/README.md, "What the loader skips"):
- a run whose config.json or final.json is unreadable or breaks the schema, or whose final.json
  holds a NaN or out-of-range ``final_top1`` / ``best_top1`` / ``final_top5`` (not a fraction in
  [0, 1], or best below final): its status and numbers cannot be trusted, so the whole run;
- a metrics line that is not JSON, not an object, not UTF-8, or breaks the row schema
  (including a torn last line: a kill mid-append, rewritten by a resumed run);
- an eval line whose ``top1`` or ``top5`` is null/NaN or outside [0, 1], whose top-5 is below its
  top-1, whose ``num_samples`` is null, zero, negative or fractional, or whose ``step`` is not a
  whole number >= 0;
- duplicate eval steps: exact copies of one eval row are kept once (the copies are skipped);
  rows of one step that disagree are all skipped, since nothing tells which of them is right.

Derived columns, and how they are approximated:
- ``params``, ``macs_per_image``: from final.json, else from plan.json (written when a run
  starts); failing both, MACs are recovered exactly from the metrics rows (flops_seen =
  6 x MACs x images_seen, see scaling/results.py) and params are taken from a run of the same
  model in the same sweep (same architecture and head), else NaN.
- ``device_hours`` per eval row: final device_hours x wall_s / final wall time, i.e. the run's
  device hours spread in proportion to wall-clock time; without final.json, wall_s / 3600 x
  world_size from plan.json (or config.json), else NaN.
- ``budget``: the config's FLOPs budget (``flops``), NaN for another kind; ``recipe``: the
  experiment a run repeats with its seed (analysis.noise.recipe_key); ``num_samples`` is kept.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.checks import eval_row_problem, final_problem
from analysis.noise import NOT_RECIPE, recipe_key  # noqa: F401 (NOT_RECIPE: part of the API)
from scaling.results import (
    CONFIG_FILE,
    FINAL_FILE,
    METRICS_FILE,
    PLAN_FILE,
    SchemaError,
    iter_run_dirs,
    read_final,
    read_json,
    validate_row,
)

log = logging.getLogger("analysis")

STATUS_RUNNING = "running"
STATUS_ORDER = ("ok", STATUS_RUNNING, "failed", "diverged")
EVAL_COLUMNS = (
    "sweep", "run_id", "run", "model", "size", "patch", "status", "seed", "lr", "batch_size",
    "budget", "recipe", "params", "macs_per_image", "step", "epoch", "images_seen",
    "flops_seen", "wall_s", "device_hours", "top1", "top5", "loss", "num_samples", "error",
    "is_final",
)
RUN_COLUMNS = (
    "sweep", "run_id", "run", "model", "size", "patch", "status", "seed", "lr", "batch_size",
    "budget", "recipe", "params", "macs_per_image", "n_evals", "best_top1", "final_top1",
    "images_seen", "total_flops", "wall_hours", "device_hours", "message",
)
def _budget(config: dict) -> float:
    """The run's FLOPs budget (config `flops`), NaN when it had another kind of budget."""
    v = config.get("flops")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


class NoResultsError(ValueError):
    """The results directory is missing or holds no readable run."""


@dataclass
class Skipped:
    """A file (or line: ``path`` is ``file:line`` and ``line`` its number) left out, and why."""

    path: str
    reason: str
    line: int | None = None


@dataclass
class Results:
    """Everything read from a results directory."""

    results_dir: Path
    evals: pd.DataFrame
    runs: pd.DataFrame
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        """How many files and metric lines were skipped."""
        return len(self.skipped)


def count_skipped(skipped: list[Skipped]) -> tuple[int, int]:
    """(skipped files, skipped lines) of a list of Skipped."""
    lines = sum(s.line is not None for s in skipped)
    return len(skipped) - lines, lines


def parse_model_name(name: str) -> tuple[str, int]:
    """Split a model name like "B/16" into its size ("B") and patch size (16)."""
    size, sep, patch = str(name).partition("/")
    if not sep or not size or not patch.isdigit() or int(patch) <= 0:
        raise ValueError(f"model name {name!r} is not SIZE/PATCH (e.g. 'B/16', 'Ti/4', 'mu/4')")
    return size, int(patch)


def _skip(skipped: list[Skipped], path, reason, line: int | None = None) -> None:
    """Record and log a skipped file, or line `line` of file `path`."""
    where = str(path) if line is None else f"{path}:{line}"
    reason = str(reason).replace("\n", "\\n")  # one line per skipped item, always
    log.warning("skipping %s: %s", where, reason)
    skipped.append(Skipped(where, reason, line))


def _reason(path, e: Exception) -> str:
    """The message of a read error without the path that the caller already names."""
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text ({e})"
    return str(e).removeprefix(f"{path}: ")


def _parse_lines(path: Path, data: bytes, skipped: list[Skipped]) -> list[tuple[int, dict]]:
    """(line number, row) of every schema-valid line; the others are skipped, each named."""
    lines = data.splitlines()
    rows = []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict):
                raise SchemaError(f"expected a JSON object, got {type(row).__name__}")
            rows.append((i, validate_row(row)))
        except UnicodeDecodeError as e:
            _skip(skipped, path, f"not UTF-8 text ({e})", i)
        except json.JSONDecodeError as e:
            torn = " (torn last line: an interrupted append)" if i == len(lines) else ""
            _skip(skipped, path, f"not valid JSON{torn}: {e}", i)
        except SchemaError as e:
            _skip(skipped, path, e, i)
    return rows


def _read_metrics(run_dir: Path, skipped: list[Skipped]) -> list[dict]:
    """The usable eval rows of a run, by the rules of the module docstring; every line left
    out is reported and counted once, naming file, line and reason."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    try:
        data = path.read_bytes()
    except OSError as e:
        _skip(skipped, path, e)
        return []
    by_step: dict[int, list[tuple[int, dict]]] = defaultdict(list)
    for i, row in _parse_lines(path, data, skipped):
        if row["kind"] != "eval":
            continue
        problem = eval_row_problem(row)
        if problem and problem.startswith("step="):
            _skip(skipped, path, problem, i)
        else:
            by_step[int(row["step"])].append((i, row))
    kept = []
    for step, group in sorted(by_step.items()):
        texts = [json.dumps(row, sort_keys=True) for _, row in group]
        if len(set(texts)) > 1:  # one step, different numbers: none of them can be trusted
            where = ", ".join(str(i) for i, _ in group)
            for i, row in group:
                problem = eval_row_problem(row)
                _skip(skipped, path, problem or (
                    f"eval step {step} is logged {len(group)} times with different values "
                    f"(lines {where}): none of them is kept"), i)
            continue
        first, row = group[0]
        problem = eval_row_problem(row)
        for i, _ in group:
            if problem:
                _skip(skipped, path, problem, i)
            elif i != first:
                _skip(skipped, path, f"exact copy of the eval row of step {step} on line "
                                     f"{first} (kept once)", i)
        if not problem:
            kept.append(row)
    return kept


def _read_plan(run_dir: Path, skipped: list[Skipped]) -> dict:
    """RUN_DIR/plan.json (params, MACs, world size of a started run), or {} if absent/bad."""
    path = run_dir / PLAN_FILE
    if not path.exists():
        return {}
    try:
        plan = read_json(path)
    except (SchemaError, OSError, UnicodeDecodeError) as e:
        _skip(skipped, path, _reason(path, e))
        return {}
    return {k: plan[k] for k in ("params", "macs_per_image", "world_size") if k in plan}


def _read_run(run_dir: Path, skipped: list[Skipped]) -> tuple[dict, list[dict]] | None:
    """Read one run dir into (run record, eval rows); None if it cannot be interpreted."""
    try:
        config = read_json(run_dir / CONFIG_FILE)
        size, patch = parse_model_name(config.get("model"))
    except (SchemaError, OSError, UnicodeDecodeError, ValueError) as e:
        path = run_dir / CONFIG_FILE
        _skip(skipped, path, f"{_reason(path, e)}; run skipped")
        return None
    path = run_dir / FINAL_FILE
    try:
        final = read_final(run_dir)
        problem = final_problem(final) if final is not None else None
        if problem:
            raise SchemaError(problem)
    except (SchemaError, OSError, UnicodeDecodeError) as e:
        # Without a trustworthy final.json the run's status is unknown: skip it, never guess.
        _skip(skipped, path, f"{_reason(path, e)}; run skipped")
        return None
    evals = _read_metrics(run_dir, skipped)
    plan = _read_plan(run_dir, skipped)
    final = {**plan, **{k: v for k, v in (final or {}).items() if v is not None}}
    run = {
        "sweep": run_dir.parent.name, "run_id": run_dir.name,
        "run": f"{run_dir.parent.name}/{run_dir.name}", "model": config["model"],
        "size": size, "patch": patch, "status": final.get("status", STATUS_RUNNING),
        "seed": config.get("seed"), "lr": config.get("lr"), "batch_size": config.get("batch_size"),
        "budget": _budget(config), "recipe": recipe_key(run_dir.parent.name, config),
        "params": final.get("params"), "macs_per_image": final.get("macs_per_image"),
        "n_evals": len(evals), "final_top1": final.get("final_top1"),
        "images_seen": final.get("images_seen"), "total_flops": final.get("total_flops"),
        "wall_hours": final.get("wall_hours"), "device_hours": final.get("device_hours"),
        "message": final.get("error"),
        "_world_size": final.get("world_size") or config.get("world_size"),
    }
    return run, evals


def _device_hours(run: dict, wall_s: np.ndarray) -> np.ndarray:
    """Device hours at each eval row (see the module docstring for the approximation)."""
    dh, wh = run["device_hours"], run["wall_hours"]
    if dh is not None and wh:
        return dh * wall_s / (wh * 3600.0)
    if run["_world_size"]:
        return wall_s / 3600.0 * run["_world_size"]
    return np.full(wall_s.shape, np.nan)


def _eval_frame(run: dict, evals: list[dict]) -> pd.DataFrame:
    """The eval rows of one run as a DataFrame with the run's columns repeated."""
    df = pd.DataFrame(evals).reindex(columns=["step", "epoch", "images_seen", "flops_seen",
                                              "wall_s", "top1", "top5", "loss",
                                              "num_samples"])
    df = df.astype(float).sort_values(["step", "images_seen"], kind="stable")
    for key in EVAL_COLUMNS:
        if key in run and key not in df:
            df[key] = run[key]
    if run["macs_per_image"] is None:
        with np.errstate(divide="ignore", invalid="ignore"):
            macs = (df["flops_seen"] / (6.0 * df["images_seen"])).replace(np.inf, np.nan)
        df["macs_per_image"] = float(macs.median()) if macs.notna().any() else np.nan
    df["device_hours"] = _device_hours(run, df["wall_s"].to_numpy())
    df["error"] = 1.0 - df["top1"]
    df["is_final"] = False
    if run["status"] != STATUS_RUNNING and len(df):
        df.iloc[-1, df.columns.get_loc("is_final")] = True
    return df


def _fill_params(runs: pd.DataFrame, evals: pd.DataFrame) -> None:
    """Give unfinished runs the params of a finished run of the same model and sweep."""
    known = runs.dropna(subset=["params"]).groupby(["sweep", "model"])["params"].median()
    for frame in (runs, evals):
        keys = list(zip(frame["sweep"], frame["model"]))
        fill = pd.Series([known.get(k, np.nan) for k in keys], index=frame.index)
        frame["params"] = frame["params"].astype(float).fillna(fill)
    macs = evals.groupby("run")["macs_per_image"].first()
    runs["macs_per_image"] = runs["macs_per_image"].astype(float).fillna(runs["run"].map(macs))


def load_results(results_dir) -> Results:
    """Read every run under `results_dir` into tidy eval and run tables (see module docstring)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise NoResultsError(f"results dir {str(root)!r} does not exist or is not a directory")
    run_dirs = list(iter_run_dirs(root))
    if not run_dirs:
        raise NoResultsError(f"no runs under {str(root)!r}: no <sweep>/<run>/{CONFIG_FILE} found")
    skipped: list[Skipped] = []
    runs, frames = [], []
    for run_dir in run_dirs:
        read = _read_run(run_dir, skipped)
        if read is None:
            continue
        run, evals = read
        frame = _eval_frame(run, evals)
        run["best_top1"] = float(frame["top1"].max()) if frame["top1"].notna().any() else math.nan
        runs.append(run)
        frames.append(frame)
    if not runs:
        raise NoResultsError(f"none of the {len(run_dirs)} runs under {str(root)!r} could be "
                             f"read; skipped: {[s.path for s in skipped]}")
    run_df = pd.DataFrame(runs).reindex(columns=RUN_COLUMNS)
    eval_df = pd.concat([f for f in frames if len(f)] or [pd.DataFrame(columns=EVAL_COLUMNS)],
                        ignore_index=True).reindex(columns=EVAL_COLUMNS)
    _fill_params(run_df, eval_df)
    for frame in (run_df, eval_df):  # config values: numbers, so the parquet columns are typed
        for col in ("seed", "lr", "batch_size"):
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    run_df["final_top1"] = run_df["final_top1"].astype(float)  # null (no eval) -> NaN
    eval_df["is_final"] = eval_df["is_final"].astype(bool)
    return Results(root, eval_df, run_df, skipped)


def select_sweeps(res: Results, sweeps) -> Results:
    """Keep only the runs of the named sweeps; an unknown name is an error listing the known."""
    sweeps = list(sweeps)
    known = sorted(set(res.runs["sweep"]))
    unknown = [s for s in sweeps if s not in known]
    if unknown:
        raise NoResultsError(f"sweep(s) {unknown} not found under {str(res.results_dir)!r}; "
                             f"found {known}")
    keep = res.runs["sweep"].isin(sweeps)
    return Results(res.results_dir, res.evals[res.evals["sweep"].isin(sweeps)].reset_index(
        drop=True), res.runs[keep].reset_index(drop=True), res.skipped)


# Rows of scaling.bench's other modes (docs/benchmarks.md), valid but not throughput rows.
OTHER_BENCH_KINDS = ("zero_memory", "overhead")


def load_bench(results_dir) -> tuple[pd.DataFrame, list[Skipped]]:
    """Throughput rows from RESULTS/bench/*.jsonl (empty frame if none); bad lines are skipped
    and reported, rows of the other benchmark modes are left out."""
    rows, skipped = [], []
    for path in sorted((Path(results_dir) / "bench").glob("*.jsonl")):
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            _skip(skipped, path, e)
            continue
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if isinstance(row, dict) and row.get("kind") in OTHER_BENCH_KINDS:
                    continue
                if not isinstance(row, dict) or "model" not in row or "images_per_s" not in row:
                    raise ValueError("expected an object with 'model' and 'images_per_s'")
                parse_model_name(row["model"])
            except ValueError as e:  # JSONDecodeError is a ValueError
                _skip(skipped, path, e, i)
                continue
            rows.append({"impl": "unspecified", **row, "source": path.name})
    return pd.DataFrame(rows), skipped


def model_order(frame: pd.DataFrame) -> list[str]:
    """Model names ordered small -> large: by params, then MACs per image, then name."""
    if frame.empty:
        return []
    key = frame.groupby("model").agg(params=("params", "median"),
                                     macs=("macs_per_image", "median"))
    key = key.fillna(np.inf).reset_index()
    key["patch"] = [-parse_model_name(m)[1] for m in key["model"]]
    return key.sort_values(["params", "macs", "patch", "model"])["model"].tolist()


def status_counts(runs: pd.DataFrame) -> dict[str, int]:
    """Number of runs per status, in a fixed order (ok, running, failed, diverged)."""
    counts = runs["status"].value_counts()
    out = {s: int(counts.get(s, 0)) for s in STATUS_ORDER}
    out.update({s: int(n) for s, n in counts.items() if s not in out})
    return out

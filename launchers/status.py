"""`sweep.py status`: one table row per run found under a results dir.

Rows are grouped by sweep and sorted by size, then budget value; metrics.jsonl is read from its
end only (launchers.runs.read_progress), so the table costs O(runs), not O(rows). `--watch`
and its `eta` column: docs/sweeps.md ("Progress and status").
"""

from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path

from launchers.grid import budget_token
from launchers.progress import duration, isatty
from launchers.runs import (
    CLAIM_FILE,
    RATE_ROWS,
    read_claim,
    read_job,
    read_progress,
    run_state,
    squeue_states,
)
from scaling.model import SIZES, split_name
from scaling.results import CONFIG_FILE, JOB_FILE, PLAN_FILE, SchemaError, read_json

COLUMNS = ("run", "size", "budget", "state", "progress", "top1", "job")
WATCH_COLUMNS = COLUMNS + ("eta",)
WATCH_DEFAULT_S = 10.0
BUDGET_FIELDS = ("flops", "steps", "epochs", "samples")


def find_run_dirs(results_dir: Path) -> list[Path]:
    """Every dir below results_dir with a job.json, config.json or claim, sorted."""
    found = {p.parent for name in (JOB_FILE, CONFIG_FILE, CLAIM_FILE)
             for p in results_dir.rglob(name)}
    return sorted(d for d in found if not any(part.startswith(".") for part in d.parts[-2:]))


def _describe(run_dir: Path, job: dict | None) -> tuple[str, float | None, str | None]:
    """(size, budget, budget kind) from job.json, else from a sweep's claim, else from
    config.json."""
    claim = read_claim(run_dir)[0] or {}
    for known in (job or {}, claim):
        if "model" in known and "budget" in known:
            return known["model"], float(known["budget"]), known["budget_kind"]
    try:
        cfg = read_json(run_dir / CONFIG_FILE)
    except (OSError, SchemaError):
        return "?", None, None
    kind = next((k for k in BUDGET_FIELDS if cfg.get(k) is not None), None)
    return cfg.get("model", "?"), (float(cfg[kind]) if kind else None), kind


def _total_steps(run_dir: Path, job: dict | None) -> int | None:
    """The run's planned steps: job.json's, else plan.json's (a run trained by hand)."""
    if (job or {}).get("total_steps") is not None:
        return job["total_steps"]
    try:
        return read_json(run_dir / PLAN_FILE).get("total_steps")
    except (OSError, SchemaError, AttributeError):
        return None


def sort_key(row: dict) -> tuple:
    """Sweep, then size (in the order of scaling.model.SIZES) and patch, then budget by value
    (3e9 before 1e10, which a string sort would not give), then run id."""
    try:
        size, patch = split_name(row["size"])
    except ValueError:  # '?' (no record of the run) or a name of another version
        size, patch = row["size"], 0
    order = list(SIZES).index(size) if size in SIZES else len(SIZES)
    budget = row["_budget"] if row["_budget"] is not None else float("inf")
    return (str(Path(row["run"]).parent), order, patch, row["_kind"] or "", budget, row["run"])


def status_row(run_dir: Path, squeue: dict[str, str] | None, root: Path, rate_rows: int = 1
               ) -> dict:
    """The table row of one run (with `_budget` and `_kind`, the numeric budget to sort by, and
    `eta`, which needs rate_rows >= 2: launchers.runs.read_progress)."""
    try:
        job = read_job(run_dir)
    except SchemaError:
        job = None
    size, budget, kind = _describe(run_dir, job)
    done = read_progress(run_dir, rate_rows)
    total = _total_steps(run_dir, job)
    state = run_state(run_dir, job, squeue)
    return {"run": str(run_dir.relative_to(root)) if run_dir != root else run_dir.name,
            "size": size, "budget": budget_token(budget, kind) if kind else "?",
            "state": state, "progress": f"{done.steps}/{total if total is not None else '?'}",
            "top1": "-" if done.top1 is None else f"{done.top1:.4f}",
            "job": (job or {}).get("job_id") or "-", "_budget": budget, "_kind": kind,
            "eta": eta(done.steps, total, done.rate) if state == "running" else "-"}


def eta(steps: int, total: int | None, rate: float | None) -> str:
    """Time to the last step at `rate` steps per second; "?" when unknown."""
    if total is None or not rate:
        return "?"
    return duration(max(0, total - steps) / rate)


def format_table(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    """Left-aligned text table with a header line."""
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns).rstrip()
              for r in rows]
    return "\n".join(lines)


def status(results_dir: Path, columns: tuple[str, ...] = COLUMNS) -> str:
    """The status table of every run below results_dir, plus a count per state."""
    if not results_dir.is_dir():
        raise ValueError(f"results dir {results_dir} does not exist")
    runs = find_run_dirs(results_dir)
    if not runs:
        return f"no runs under {results_dir}"
    slurm = any((read_job(d) or {}).get("cluster") == "slurm" for d in runs)
    squeue, note = {}, ""
    if slurm:
        try:
            squeue = squeue_states()
        except RuntimeError as e:
            squeue, note = None, f"\nwarning: {e}"
    rate_rows = RATE_ROWS if "eta" in columns else 1
    rows = sorted((status_row(d, squeue, results_dir, rate_rows) for d in runs), key=sort_key)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"{format_table(rows, columns)}\n{len(rows)} runs: {summary}{note}"


def watch(results_dir: Path, every_s: float, stream=None, times: int | None = None) -> None:
    """Print the table with ETAs every `every_s` seconds (`times` tables; None: until
    interrupted); on a terminal each one replaces the last."""
    stream = stream or sys.stdout
    clear = "\x1b[H\x1b[2J" if isatty(stream) else ""
    shown = 0
    while times is None or shown < times:
        table = status(results_dir, WATCH_COLUMNS)
        stamp = time.strftime("%H:%M:%S")
        print(f"{clear}{stamp}  every {every_s:g} s, Ctrl-C to stop\n{table}", file=stream,
              flush=True)
        shown += 1
        if times is None or shown < times:
            time.sleep(every_s)


def run_status(results: str, watch_s: float | None) -> int:
    """`sweep.py status`: the table once, or --watch until Ctrl-C (130) or SIGTERM (143)."""
    if watch_s is None:
        print(status(Path(results)))
        return 0
    if not (math.isfinite(watch_s) and watch_s > 0):
        raise ValueError(f"--watch {watch_s:g}: the refresh interval must be a positive number "
                         "of seconds")
    if not Path(results).is_dir():
        raise ValueError(f"results dir {results} does not exist")
    try:
        watch(Path(results), watch_s)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM via sweep._interrupt
        signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        return 128 + signum
    return 0

"""`sweep.py status`: one table row per run found under a results dir.

Rows are grouped by sweep and sorted by size, then by budget *value* (3e9, 1e10, 3e10, 1e11),
each with its state, progress (steps done / planned, from metrics.jsonl and job.json or
plan.json), latest top-1 and job id.
"""

from __future__ import annotations

from pathlib import Path

from launchers.grid import budget_token
from launchers.runs import CLAIM_FILE, progress, read_claim, read_job, run_state, squeue_states
from scaling.model import SIZES, split_name
from scaling.results import CONFIG_FILE, JOB_FILE, PLAN_FILE, SchemaError, read_json

COLUMNS = ("run", "size", "budget", "state", "progress", "top1", "job")
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


def status_row(run_dir: Path, squeue: dict[str, str] | None, root: Path) -> dict:
    """The table row of one run (with `_budget` and `_kind`, the numeric budget to sort by)."""
    try:
        job = read_job(run_dir)
    except SchemaError:
        job = None
    size, budget, kind = _describe(run_dir, job)
    steps, _, top1 = progress(run_dir, job)
    total = _total_steps(run_dir, job)
    return {"run": str(run_dir.relative_to(root)) if run_dir != root else run_dir.name,
            "size": size, "budget": budget_token(budget, kind) if kind else "?",
            "state": run_state(run_dir, job, squeue),
            "progress": f"{steps}/{total if total is not None else '?'}",
            "top1": "-" if top1 is None else f"{top1:.4f}",
            "job": (job or {}).get("job_id") or "-", "_budget": budget, "_kind": kind}


def format_table(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    """Left-aligned text table with a header line."""
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns).rstrip()
              for r in rows]
    return "\n".join(lines)


def status(results_dir: Path) -> str:
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
    rows = sorted((status_row(d, squeue, results_dir) for d in runs), key=sort_key)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"{format_table(rows)}\n{len(rows)} runs: {summary}{note}"

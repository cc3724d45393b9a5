"""`sweep.py status`: one table row per run found under a results dir."""

from __future__ import annotations

from pathlib import Path

from launchers.grid import budget_token
from launchers.runs import CLAIM_FILE, progress, read_claim, read_job, run_state, squeue_states
from scaling.results import CONFIG_FILE, JOB_FILE, SchemaError, read_json

COLUMNS = ("run", "size", "budget", "state", "progress", "top1", "job")
BUDGET_FIELDS = ("flops", "steps", "epochs", "samples")


def find_run_dirs(results_dir: Path) -> list[Path]:
    """Every dir below results_dir with a job.json, config.json or claim, sorted."""
    found = {p.parent for name in (JOB_FILE, CONFIG_FILE, CLAIM_FILE)
             for p in results_dir.rglob(name)}
    return sorted(d for d in found if not any(part.startswith(".") for part in d.parts[-2:]))


def _describe(run_dir: Path, job: dict | None) -> tuple[str, str]:
    """(size, budget) from job.json, else from a sweep's claim, else from config.json."""
    claim = read_claim(run_dir)[0] or {}
    for known in (job or {}, claim):
        if "model" in known and "budget" in known:
            return known["model"], budget_token(known["budget"], known["budget_kind"])
    try:
        cfg = read_json(run_dir / CONFIG_FILE)
    except (OSError, SchemaError):
        return "?", "?"
    kind = next((k for k in BUDGET_FIELDS if cfg.get(k) is not None), None)
    return cfg.get("model", "?"), budget_token(cfg[kind], kind) if kind else "?"


def status_row(run_dir: Path, squeue: dict[str, str] | None, root: Path) -> dict:
    """The table row of one run (also used by the sweep's plan)."""
    try:
        job = read_job(run_dir)
    except SchemaError:
        job = None
    size, budget = _describe(run_dir, job)
    steps, total, top1 = progress(run_dir, job)
    return {"run": str(run_dir.relative_to(root)) if run_dir != root else run_dir.name,
            "size": size, "budget": budget, "state": run_state(run_dir, job, squeue),
            "progress": f"{steps}/{total if total is not None else '?'}",
            "top1": "-" if top1 is None else f"{top1:.4f}",
            "job": (job or {}).get("job_id") or "-"}


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
    rows = [status_row(d, squeue, results_dir) for d in runs]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"{format_table(rows)}\n{len(rows)} runs: {summary}{note}"

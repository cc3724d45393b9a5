"""Compute spent by a results dir next to what its runs cost as independent runs.

A branch of a branching sweep (launchers/branching.py; config `trunk_run`, `branch_step`)
counts its trunk's prefix in its `flops_seen` and `total_flops` (its x axis is its full training
compute), but only its own steps were spent on it; its trunk was spent once for all its
branches. So, over every run dir below a results dir:

    compute_spent       = sum of every run's training FLOPs so far (trunks included)
                          - each branch's prefix (6 x MACs x batch x branch_step)
    compute_independent = sum of the training FLOPs of every run that is not a trunk

For a sweep without branches the two are equal. A run's FLOPs so far are its final.json
`total_flops`, else the largest `flops_seen` of its metrics rows (0 before its first row).
"""

from __future__ import annotations

from pathlib import Path

from scaling.branch import trunk_dir
from scaling.flops import flops_for_images
from scaling.results import (
    CONFIG_FILE,
    FINAL_FILE,
    PLAN_FILE,
    SchemaError,
    iter_run_dirs,
    read_json,
    read_metrics,
)


def _done_flops(run_dir: Path) -> float:
    try:
        if (run_dir / FINAL_FILE).is_file():
            return float(read_json(run_dir / FINAL_FILE).get("total_flops") or 0.0)
        rows = read_metrics(run_dir, strict=False)
    except (OSError, SchemaError, ValueError):
        return 0.0
    return float(max((r["flops_seen"] or 0.0 for r in rows), default=0.0))


def _prefix_flops(run_dir: Path, config: dict) -> float:
    """6 x MACs x images of the trunk prefix a branch's counts include (0 if none)."""
    if config.get("branch_step") is None:
        return 0.0
    try:
        macs = read_json(run_dir / PLAN_FILE)["macs_per_image"]
    except (OSError, SchemaError, KeyError):
        return 0.0  # not started: no prefix copied either
    return flops_for_images(macs, config["branch_step"] * config["batch_size"])


def sweep_compute(results_dir) -> dict[str, float]:
    """{"compute_spent", "compute_independent"} in training FLOPs (module docstring)."""
    runs = {}
    for run_dir in iter_run_dirs(results_dir):
        try:
            runs[run_dir.resolve()] = read_json(run_dir / CONFIG_FILE)
        except (OSError, SchemaError):
            continue
    trunks = {trunk_dir(d, c["trunk_run"]).resolve() for d, c in runs.items()
              if c.get("trunk_run")}
    spent = independent = 0.0
    for run_dir, config in runs.items():
        done = _done_flops(run_dir)
        prefix = _prefix_flops(run_dir, config) if done else 0.0
        spent += done - min(prefix, done)
        if run_dir not in trunks:
            independent += done
    return {"compute_spent": spent, "compute_independent": independent}

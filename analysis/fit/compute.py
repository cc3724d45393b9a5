"""Compute spent by a results dir next to what its runs cost as independent runs, from the
loaded results (analysis.load.runs.Results.spend). A branch (launchers/branching.py) counts its
trunk's prefix in its FLOPs, but the trunk was spent once for all its branches; the accounting
is in analysis/README.md ("Compute spent").
"""

from __future__ import annotations

from pathlib import Path

from analysis.load.runs import Results, RunSpend
from scaling.branch import trunk_dir
from scaling.flops import flops_for_images


def _prefix_flops(run: RunSpend) -> float:
    """6 x MACs x images of the trunk prefix a branch's counts include (0 if none, or before
    the branch started: no plan.json, no prefix copied either)."""
    if run.branch_step is None or run.macs_per_image is None or run.batch_size is None:
        return 0.0
    return flops_for_images(run.macs_per_image, run.branch_step * run.batch_size)


def sweep_compute(res: Results) -> dict[str, float]:
    """{"compute_spent", "compute_independent"} in training FLOPs, over every run dir of the
    results dir (fine-tunes and skipped runs included, whatever --sweep selected)."""
    root = Path(res.results_dir)
    runs = {(root / r.run).resolve(): r for r in res.spend}
    trunks = {trunk_dir(d, r.trunk_run).resolve() for d, r in runs.items() if r.trunk_run}
    spent = independent = 0.0
    for run_dir, run in runs.items():
        done = run.flops
        prefix = _prefix_flops(run) if done else 0.0
        spent += done - min(prefix, done)
        if run_dir not in trunks:
            independent += done
    return {"compute_spent": spent, "compute_independent": independent}

"""What a sweep invocation does with each run: skip, submit, resume or report (idempotence)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from launchers.grid import RunSpec, budget_token
from launchers.runs import progress, read_job, run_state, squeue_states
from scaling.results import CONFIG_FILE, FINAL_FILE, read_json

# state -> action; failed / diverged are submitted again only with --resubmit-failed
ACTIONS = {"new": "submit", "preempted": "resume", "done": "skip", "queued": "skip (queued)",
           "running": "skip (running)", "failed": "report", "diverged": "report"}


@dataclass
class Planned:
    """A grid point, its current state and what this invocation does with it."""

    spec: RunSpec
    state: str
    action: str

    @property
    def submits(self) -> bool:
        return self.action in ("submit", "resume", "resubmit")

    def row(self) -> dict:
        steps = progress(self.spec.run_dir, None)[0]
        return {"run": self.spec.run_id, "size": self.spec.model,
                "budget": budget_token(self.spec.budget, self.spec.budget_kind),
                "seed": self.spec.seed, "lr": f"{self.spec.cfg.lr:.3g}",
                "ranks": self.spec.world_size,
                "steps": f"{steps}/{self.spec.total_steps}", "state": self.state,
                "action": self.action}


def needs_squeue(specs: list[RunSpec]) -> bool:
    """Whether some run's recorded job is a SLURM job (then squeue must answer)."""
    return any((read_job(s.run_dir) or {}).get("cluster") == "slurm" for s in specs)


def check_same_config(spec: RunSpec) -> None:
    """A run dir whose config.json differs (other than in resumable fields) is an error."""
    path = spec.run_dir / CONFIG_FILE
    if not path.exists():
        return
    from scaling.config import RESUMABLE_FIELDS

    old = read_json(path)
    new = spec.cfg.to_dict()
    diff = sorted(k for k in new if k not in RESUMABLE_FIELDS and old.get(k, new[k]) != new[k])
    if diff:
        raise ValueError(f"run dir {spec.run_dir} holds a different config (fields {diff}); "
                         "it is not this grid point's run: move it away or use another --name")


def plan(specs: list[RunSpec], resubmit_failed: bool) -> list[Planned]:
    """Classify every run (asks squeue once if any run has a SLURM job)."""
    squeue = squeue_states() if needs_squeue(specs) else {}
    out = []
    for spec in specs:
        check_same_config(spec)
        state = run_state(spec.run_dir, read_job(spec.run_dir), squeue)
        action = ACTIONS[state]
        if action == "report" and resubmit_failed:
            action = "resubmit"
        out.append(Planned(spec, state, action))
    return out


def set_aside_final(run_dir: Path) -> Path | None:
    """Rename a failed/diverged run's final.json (kept, never deleted) so the run can rerun."""
    final = run_dir / FINAL_FILE
    if not final.exists():
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    target = run_dir / f"final.{stamp}.{os.getpid()}.json"
    final.rename(target)
    return target

"""What a sweep invocation does with each run: skip, submit, resume or report (idempotence)."""

from __future__ import annotations

from dataclasses import dataclass

from launchers.grid import RunSpec, budget_token
from launchers.runs import progress, read_job, run_state, squeue_states
from scaling.config import RESUMABLE_FIELDS, TrainConfig
from scaling.results import check_config, set_aside_final  # noqa: F401 (launch.py uses it)

# state -> action; failed / diverged are submitted again only with --resubmit-failed
ACTIONS = {"new": "submit", "preempted": "resume", "done": "skip", "queued": "skip (queued)",
           "running": "skip (running)", "failed": "report", "diverged": "report"}


@dataclass
class PlannedRun:
    """A grid point, its current state and what this invocation does with it (not to be
    confused with scaling.config.TrainPlan, one run's own steps and batch layout)."""

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
    check_config(spec.run_dir, spec.cfg.to_dict(), resumable=RESUMABLE_FIELDS,
                 defaults=TrainConfig.defaults())


def classify(specs: list[RunSpec], resubmit_failed: bool) -> list[PlannedRun]:
    """Every run with its state and action (asks squeue once if any run has a SLURM job)."""
    squeue = squeue_states() if needs_squeue(specs) else {}
    out = []
    for spec in specs:
        check_same_config(spec)
        state = run_state(spec.run_dir, read_job(spec.run_dir), squeue)
        action = ACTIONS[state]
        if action == "report" and resubmit_failed:
            action = "resubmit"
        out.append(PlannedRun(spec, state, action))
    return out

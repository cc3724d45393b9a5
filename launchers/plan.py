"""What a sweep invocation does with each run: skip, submit, resume or report (idempotence)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

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


def other_world_sizes(specs: list[RunSpec], allow: bool) -> list[RunSpec]:
    """The specs, where a grid point's run was started on another number of ranks (--gpus
    changed: the run id covers the world size) and is partly done, pointed at that run, to
    continue on this world size (scaling.train resumes a checkpoint on any), when `allow`
    (--allow-world-size-change); without it, a ValueError (one line) saying so."""
    out = []
    for spec in specs:
        found = None if spec.run_dir.exists() else _started_elsewhere(spec)
        if found is None:
            out.append(spec)
            continue
        run_dir, ranks = found
        if not allow:
            raise ValueError(
                f"{run_dir.name} ({spec.model}, budget {budget_token(spec.budget, spec.budget_kind)}"
                f") was started on {ranks} rank(s) and is partly done; rerun with --gpus {ranks}, "
                f"or add --allow-world-size-change to continue it on {spec.world_size}")
        out.append(dataclasses.replace(spec, run_id=run_dir.name,
                                       cfg=dataclasses.replace(spec.cfg, out=str(run_dir))))
    return out


def _started_elsewhere(spec: RunSpec) -> tuple[Path, int] | None:
    """(run dir, its ranks) of a partly done (preempted) run of spec's grid point at another
    world size: the same model and budget in the run id and the same config."""
    prefix = spec.run_id.rsplit("_", 1)[0] + "_"
    for run_dir in sorted(spec.run_dir.parent.glob(prefix + "*")):
        try:
            ranks = json.loads((run_dir / "plan.json").read_text())["world_size"]
            check_same_config(dataclasses.replace(
                spec, cfg=dataclasses.replace(spec.cfg, out=str(run_dir))))
        except (OSError, ValueError, KeyError):
            continue
        job = read_job(run_dir)
        squeue = squeue_states() if (job or {}).get("cluster") == "slurm" else {}
        if ranks != spec.world_size and run_state(run_dir, job, squeue) == "preempted":
            return run_dir, int(ranks)
    return None

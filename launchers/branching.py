"""Branching sweeps (`sweep.py --branching cooldown`): a whole curve of budgets from one run.

Per (size, lr, seed) one trunk trains the stable schedule and keeps a checkpoint at every
budget's cooldown start; each budget is a branch, an ordinary run dir (`trunk_run`,
`branch_step`) that seeds itself from the trunk's checkpoint and trains only its cooldown. The
tree fixes warmup and data reading for trunk and branches alike, and prices the grid
(`Tree.spent`, `Tree.independent`). Scheduling and guarantees: docs/sweeps.md ("Branching sweeps").
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from launchers.grid import (
    GridOptions,
    RunSpec,
    build_grid,
    data_fingerprint,
    model_token,
    run_id,
)
from launchers.presets import Preset
from launchers.submit import submit_after, submit_array, upstream_job
from scaling import branch
from scaling.config import (
    TrainConfig,
    cooldown_steps,
    resolve_plan,
    warmup_steps,
)
from scaling.data import DatasetInfo
from scaling.data.memory import use_memory
from scaling.schedule import STABLE

MODES = ("cooldown",)
# What --branching sets when neither the preset nor --set does (Hagele et al. 2024: constant lr,
# a 20 % cooldown of 1-sqrt shape matches cosine at each length)
STABLE_DEFAULTS = (("schedule", "constant"), ("cooldown_fraction", 0.2),
                   ("cooldown_shape", "1-sqrt"))
_DEFAULTS = TrainConfig.defaults()


@dataclass(frozen=True)
class Tree:
    """The runs of a branching sweep: trunks first, then branches by branch step."""

    trunks: tuple[RunSpec, ...]
    branches: tuple[RunSpec, ...]

    @property
    def specs(self) -> list[RunSpec]:
        return [*self.trunks, *sorted(self.branches, key=lambda s: s.cfg.branch_step)]

    @property
    def spent(self) -> float:
        """Training FLOPs of the whole sweep: the trunks, and each branch's cooldown."""
        cooldowns = sum(s.train_flops * (1 - s.cfg.branch_step / s.total_steps)
                        for s in self.branches)
        return sum(s.train_flops for s in self.trunks) + cooldowns

    @property
    def independent(self) -> float:
        """Training FLOPs of the same grid as independent runs (every budget in full)."""
        return sum(s.train_flops for s in self.branches)

    def describe(self) -> str:
        ratio = self.spent / self.independent if self.independent else float("nan")
        first = self.branches[0].cfg if self.branches else None
        recipe = (f"{first.schedule}, warmup {first.warmup_steps} steps, cooldown "
                  f"{first.cooldown_steps or f'{first.cooldown_fraction:g} of each run'} "
                  f"({first.cooldown_shape})") if first else ""
        return (f"branching: {len(self.trunks)} trunk(s), {len(self.branches)} branch(es); "
                f"{recipe}\ncompute: {self.spent:.3g} FLOPs for the sweep vs "
                f"{self.independent:.3g} as independent runs ({ratio:.2f}x)")


def with_stable_defaults(preset: Preset, opts: GridOptions) -> GridOptions:
    """The grid options with STABLE_DEFAULTS for the fields neither preset nor --set gives; a
    cosine/linear schedule given by --set is an error (it has no stable phase to branch)."""
    given = dict(opts.overrides)
    if given.get("schedule", "constant") not in STABLE:
        raise ValueError(f"--branching needs --set schedule=constant or rsqrt, not "
                         f"{given['schedule']!r}: a decay to the end has no stable phase")
    explicit = {**preset.train, **given}
    cooldown_given = "cooldown_steps" in explicit or "cooldown_fraction" in explicit
    extra = [(k, v) for k, v in STABLE_DEFAULTS if k not in given and not (
        k == "cooldown_fraction" and cooldown_given) and not (
        k == "schedule" and explicit.get("schedule") in STABLE)]
    return dataclasses.replace(opts, overrides=(*extra, *opts.overrides))


def build_tree(preset: Preset, opts: GridOptions, info: DatasetInfo, sweep_dir: Path) -> Tree:
    """The trunks and branches of the grid; ValueError (one line) for a grid that cannot
    branch (a budget whose cooldown would start at step 0 or inside the warmup)."""
    specs = build_grid(preset, with_stable_defaults(preset, opts), info, sweep_dir)
    groups: dict[tuple, list[RunSpec]] = defaultdict(list)
    for spec in specs:
        groups[(spec.model, spec.seed, spec.base_lr)].append(spec)
    trunks, branches = [], []
    for group in groups.values():
        trunk, members = _group(sorted(group, key=lambda s: s.total_steps), info, sweep_dir,
                                opts.world_size)
        trunks.append(trunk)
        branches += members
    return Tree(tuple(trunks), tuple(branches))


def _shared_fields(group: list[RunSpec], info: DatasetInfo) -> dict:
    """warmup_steps and in_memory, fixed for a whole group (see the module docstring)."""
    shortest, longest = group[0], group[-1]
    cfg = shortest.cfg
    warm = cfg.warmup_steps if cfg.warmup_steps is not None else max(
        1, warmup_steps(cfg, shortest.total_steps))
    memory = cfg.in_memory
    if memory == "auto":
        samples = longest.total_steps * longest.cfg.batch_size
        memory = "on" if use_memory(info, "auto", samples) else "off"
    return {"warmup_steps": warm, "in_memory": memory}


def _spec(spec: RunSpec, cfg: TrainConfig, run_id: str, sweep_dir: Path, world: int,
          info: DatasetInfo, **changes) -> RunSpec:
    cfg = dataclasses.replace(cfg, out=str(sweep_dir / run_id))
    plan = resolve_plan(cfg, info, world)  # checks the schedule against the run's length
    return dataclasses.replace(spec, run_id=run_id, cfg=cfg, total_steps=plan.total_steps,
                               **changes)


def _group(group: list[RunSpec], info: DatasetInfo, sweep_dir: Path, world: int
           ) -> tuple[RunSpec, list[RunSpec]]:
    """One (size, seed, lr): its trunk and its branches."""
    shared = _shared_fields(group, info)
    fingerprint = data_fingerprint(info)
    starts = {}
    for spec in group:
        cfg = dataclasses.replace(spec.cfg, **shared)
        start = spec.total_steps - cooldown_steps(cfg, spec.total_steps)
        if start < max(1, shared["warmup_steps"]):
            raise ValueError(f"{spec.model} at budget {spec.budget:g}: its cooldown would "
                             f"start at step {start}, before the {shared['warmup_steps']}-step "
                             "warmup ends; raise the budget or shorten the cooldown")
        starts[spec.run_id] = (cfg, start)
    last = max(start for _, start in starts.values())
    base = starts[group[-1].run_id][0]
    trunk_cfg = dataclasses.replace(
        base, steps=last, flops=None, epochs=None, samples=None, cooldown_steps=None,
        cooldown_fraction=0.0, cooldown_shape=_DEFAULTS["cooldown_shape"],
        ckpt_at=",".join(str(s) for s in sorted({s for _, s in starts.values()})))
    trunk_id = run_id([model_token(base.model), f"trunk{last}st"], trunk_cfg, fingerprint,
                      sweep_dir)
    trunk = _spec(group[-1], trunk_cfg, trunk_id, sweep_dir, world, info, budget=last,
                  budget_kind="steps")
    branches = []
    for spec in group:
        cfg, start = starts[spec.run_id]
        cfg = dataclasses.replace(cfg, trunk_run=trunk_id, branch_step=start)
        rid = run_id([spec.run_id.rsplit("_", 1)[0]], cfg, fingerprint, sweep_dir)
        branches.append(_spec(spec, cfg, rid, sweep_dir, world, info))
    return trunk, branches


def ready(spec: RunSpec) -> bool:
    """Whether a run may start now (a trunk always; a branch once its trunk point exists)."""
    return branch.ready(spec.cfg.out, spec.cfg.trunk_run, spec.cfg.branch_step)


# what a local sweep says of the branches left waiting (launchers.local.run_gated)
WAITING = ("{n} branch(es) wait for their trunk's checkpoint (trunk stopped before it): {runs}; "
           "rerun the sweep to resume the trunk and then them")


def trunk_dir(spec: RunSpec) -> Path:
    """The run dir of a branch's trunk."""
    return branch.trunk_dir(spec.cfg.out, spec.cfg.trunk_run)


def submit_slurm(todo: list, placement: dict, layout: tuple[int, int], gpu_request: int,
                 sweep_dir: Path, dry_run: bool, claims) -> int:
    """Trunks as one array, then the branches whose checkpoint exists as one more, and each
    trunk's waiting branches as an array that depends on it (launchers.submit.submit_after)."""
    trunks = [p for p in todo if p.spec.cfg.trunk_run is None]
    if trunks:
        submit_array(trunks, placement, layout, gpu_request, sweep_dir, dry_run, claims)
    job_of = upstream_job(ready, trunk_dir, dry_run, "TRUNK_JOB")
    left = submit_after([p for p in todo if p.spec.cfg.trunk_run is not None], job_of,
                        placement, layout, gpu_request, sweep_dir, dry_run, claims)
    if left:
        print(f"{len(left)} branch(es) wait for a trunk that has no job: "
              f"{', '.join(sorted(p.spec.run_id for p in left))}"
              "; rerun the sweep (with --resubmit-failed if the trunk failed)")
    return 0

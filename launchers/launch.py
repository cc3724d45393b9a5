"""A sweep invocation: validate everything, plan, then submit to SLURM or run locally."""

from __future__ import annotations

import argparse
import contextlib
import shlex
from functools import partial
from pathlib import Path

from launchers import branching, finetune_runs, slurm
from launchers.checks import plan_warnings
from launchers.defaults import (
    Choice,
    cuda_devices,
    default_preset,
    pick_cluster,
    resolve_data,
    with_builtin_fewshot,
)
from launchers.grid import GridOptions, build_grid, node_layout, parse_list, parse_overrides
from launchers.local import log_tail, run_gated, run_local
from launchers.plan import PlannedRun, classify, other_world_sizes, set_aside_final
from launchers.presets import Preset
from launchers.progress import SweepProgress
from launchers.runs import Claims, claim_holder
from launchers.status import format_table
from launchers.submit import submit_array
from scaling.results import EXIT_DIVERGED, EXIT_OK, EXIT_PREEMPTED

PLAN_COLUMNS = ("run", "size", "budget", "seed", "lr", "ranks", "steps", "state", "action")
DEFAULTS = {"gpus_per_node": 8, "max_requeues": 3, "signal": "USR2@90"}


def placement_settings(args: argparse.Namespace, preset: Preset) -> dict:
    """Where and how the runs are placed (SLURM settings, runs at a time, requeues): defaults <
    preset < --slurm-config YAML < flags."""
    merged = {**DEFAULTS, **preset.slurm}
    if args.slurm_config:
        merged.update(slurm.load_slurm_yaml(args.slurm_config))
    for key in ("partition", "account", "qos", "time", "gpus_per_node", "cpus_per_task",
                "max_parallel", "max_requeues", "signal"):
        if getattr(args, key) is not None:
            merged[key] = getattr(args, key)
    for key in ("time", "gpus_per_node", "cpus_per_task", "max_parallel"):
        if merged.get(key) is not None and int(merged[key]) < 1:
            raise ValueError(f"--{key.replace('_', '-')} {merged[key]} must be >= 1")
    if int(merged["max_requeues"]) < 0:
        raise ValueError(f"--max-requeues {merged['max_requeues']} must be >= 0")
    slurm.check_timing(merged)  # the signal, its lead against --time
    return merged


def grid_options(args: argparse.Namespace, preset: Preset, world_size: int) -> GridOptions:
    """The grid the flags ask for, preset values where a flag is absent (an empty list, `''`
    or `,`, is an error: it must not silently mean the preset's grid, or no grid)."""
    return GridOptions(
        sizes=parse_list(args.sizes, str, "--sizes") if args.sizes is not None
        else preset.sizes,
        budgets=parse_list(args.budgets, float, "--budgets") if args.budgets is not None
        else preset.budgets,
        seeds=parse_list(args.seeds, int, "--seeds"),
        lrs=parse_list(args.lrs, float, "--lrs") if args.lrs is not None else None,
        batch_size=args.batch_size, budget_kind=args.budget_kind, world_size=world_size,
        overrides=parse_overrides(args.set))


def run_here(todo: list[PlannedRun], placement: dict, sweep_dir: Path, dry_run: bool,
             claims: Claims | None, runner=run_local) -> int:
    """Run the runs on this machine (launchers.local), `max_parallel` at a time; 1 if any
    failed. Stopped by Ctrl-C (or SIGTERM, or a closed stdout), the runs checkpoint and the sweep
    raises KeyboardInterrupt (exit 130 / 143 / 141)."""
    if dry_run:
        for p in todo:
            print(f"# {p.spec.run_id} ({p.spec.world_size} process(es)): "
                  f"{shlex.join(slurm.train_command(p.spec.cfg))}")
        return 0
    parallel = int(placement.get("max_parallel") or 1)
    progress = SweepProgress([p.spec for p in todo], parallel)
    codes, stopped = runner([p.spec for p in todo], sweep_dir.name, parallel, claims=claims,
                               progress=progress)
    # after a stop, a checkpointed run (75) or one killed before it could catch the signal
    # (-N) is interrupted, not failed: the next sweep resumes it
    bad = {run: rc for run, rc in codes.items() if rc not in (EXIT_OK, EXIT_DIVERGED)
           and not (stopped and (rc == EXIT_PREEMPTED or rc < 0))}
    for run, rc in bad.items():
        print(f"\n{run} exited {rc}; last lines of its log:\n{log_tail(sweep_dir / run)}")
    if stopped:
        raise KeyboardInterrupt(stopped)
    print(progress.summary(sweep_dir.parent))
    return 1 if bad else 0


def claim_runs(planned: list[PlannedRun], claims: Claims, resubmit_failed: bool
               ) -> list[PlannedRun]:
    """Claim every run this sweep would submit, then classify those again: a run another sweep
    claimed first is left to it, one it submitted (or finished) meanwhile is skipped."""
    lost = {}
    for p in planned:
        if p.submits:
            holder = claims.take(p.spec.run_dir, sweep=p.spec.run_dir.parent.name,
                                 model=p.spec.model, budget=p.spec.budget,
                                 budget_kind=p.spec.budget_kind)
            if holder is not None:
                lost[p.spec.run_id] = holder
    mine = [p.spec for p in planned if p.submits and p.spec.run_id not in lost]
    again = {q.spec.run_id: q for q in classify(mine, resubmit_failed)} if mine else {}
    for q in again.values():
        if not q.submits:
            claims.release(q.spec.run_dir)
    return [PlannedRun(p.spec, "queued", "skip (claimed)") if p.spec.run_id in lost
            else again.get(p.spec.run_id, p) for p in planned]


def show_plan(planned: list[PlannedRun]) -> list[PlannedRun]:
    """Print the plan table and what needs a person; the runs to submit."""
    print(format_table([p.row() for p in planned], PLAN_COLUMNS))
    for p in planned:
        holder = claim_holder(p.spec.run_dir) if p.state == "queued" else None
        if holder:
            print(f"{p.spec.run_id} is claimed by another sweep (pid {holder.get('pid')} on "
                  f"{holder.get('host')}, since {holder.get('since')}): left to it")
        if p.action == "report":
            print(f"{p.spec.run_id} is {p.state}: see {p.spec.run_dir}; rerun with "
                  "--resubmit-failed to train it again")
    return [p for p in planned if p.submits]


def world_size(args: argparse.Namespace, preset: Preset, cluster: str,
               choice: Choice | None) -> tuple[int, int | None]:
    """(ranks per run, CUDA GPUs here or None when not probed): --gpus, else the preset's,
    capped at this machine's GPUs for a GPU preset run locally."""
    if preset.device != "cuda" or cluster != "local":
        return (args.gpus if args.gpus is not None else preset.gpus), None
    here = choice.local_gpus if choice is not None else cuda_devices()
    if args.gpus is not None:
        return args.gpus, here
    return (min(preset.gpus, here) if here else preset.gpus), here


def run_sweep(args: argparse.Namespace) -> int:
    """Validate, plan, claim, and submit (or run) what the plan says; nothing is submitted on
    bad input, and of two sweeps at once only one submits each run."""
    cluster, why = pick_cluster(args.cluster, args.dry_run)
    preset, choice = default_preset(args, cluster, why)  # says which and why when defaulted
    placement = placement_settings(args, preset)
    world, local_gpus = world_size(args, preset, cluster, choice)
    layout = node_layout(world, int(placement["gpus_per_node"]))
    options = grid_options(args, preset, world)  # flag errors before any data is made
    info, placeholder = resolve_data(args, preset)
    preset = with_builtin_fewshot(args, preset)  # the preset's downstream sets, made once
    sweep_dir = Path(args.results).resolve() / (args.name or preset.name)
    tree = branching.build_tree(preset, options, info, sweep_dir) if args.branching else None
    specs = tree.specs if tree else build_grid(preset, options, info, sweep_dir)
    if not tree:  # a partly done run started on another --gpus (launchers.plan)
        specs = other_world_sizes(specs, args.allow_world_size_change)
    if args.finetune:  # one fine-tune per run, after it (launchers.finetune_runs)
        if tree:
            raise ValueError("--finetune with --branching is not supported yet")
        specs = [*specs, *finetune_runs.finetune_specs(args, specs, sweep_dir)]
    planned = classify(specs, args.resubmit_failed)
    print(f"sweep {sweep_dir.name}: preset {preset.name}, {len(specs)} run(s), {world} rank(s) "
          f"each = {layout[0]} node(s) x {layout[1]} task(s), cluster {cluster}")
    if tree:
        print(tree.describe())
    for warning in plan_warnings(preset, specs, info, cluster, placement,
                                 placeholder=placeholder, local_gpus=local_gpus):
        print(f"warning: {warning}")
    with contextlib.nullcontext() if args.dry_run else Claims() as claims:
        if claims is not None:
            planned = claim_runs(planned, claims, args.resubmit_failed)
        todo = show_plan(planned)
        if not todo:
            print("nothing to submit")
            return 0
        if not args.dry_run:
            for p in todo:
                if p.action == "resubmit":
                    set_aside_final(p.spec.run_dir)
        gated = branching if tree else finetune_runs if args.finetune else None  # wait for others
        if cluster == "slurm":
            submit = gated.submit_slurm if gated else submit_array
            return submit(todo, placement, layout, preset.device == "cuda", sweep_dir,
                          args.dry_run, claims)
        return run_here(todo, placement, sweep_dir, args.dry_run, claims,
                        runner=partial(run_gated, ready=gated.ready, waiting=gated.WAITING)
                        if gated else run_local)

"""A sweep invocation: validate everything, plan, then submit to SLURM or run locally."""

from __future__ import annotations

import contextlib
import shlex
from functools import partial
from pathlib import Path

from launchers import branching, finetune_runs, slurm
from launchers.checks import plan_warnings
from launchers.cli import SweepOptions
from launchers.defaults import (
    Choice,
    cuda_devices,
    default_preset,
    pick_cluster,
    resolve_data,
    with_builtin_fewshot,
)
from launchers.grid import GridOptions, build_grid, gpu_request, node_layout, parse_overrides
from launchers.local import log_tail, run_gated, run_local
from launchers.plan import PlannedRun, classify, set_aside_final
from launchers.presets import Preset
from launchers.progress import SweepProgress
from launchers.runs import Claims, claim_holder
from launchers.slurm_config import load_slurm_yaml
from launchers.status import format_table
from launchers.submit import submit_array
from scaling.checks import check_run
from scaling.results import EXIT_DIVERGED, EXIT_OK, EXIT_PREEMPTED

PLAN_COLUMNS = ("run", "size", "budget", "seed", "lr", "ranks", "steps", "state", "action")
DEFAULTS = {"gpus_per_node": 8, "max_requeues": 3, "signal": "USR2@90"}


def placement_settings(opts: SweepOptions, preset: Preset) -> dict:
    """Where and how the runs are placed (SLURM settings, runs at a time, requeues): defaults <
    preset < --slurm-config YAML < flags."""
    merged = {**DEFAULTS, **preset.slurm}
    if opts.slurm_config:
        merged.update(load_slurm_yaml(opts.slurm_config))
    for key in ("partition", "account", "qos", "time", "gpus_per_node", "cpus_per_task",
                "max_parallel", "max_requeues", "signal"):
        if getattr(opts, key) is not None:
            merged[key] = getattr(opts, key)
    for key in ("time", "gpus_per_node", "cpus_per_task", "max_parallel"):
        if merged.get(key) is not None and int(merged[key]) < 1:
            raise ValueError(f"--{key.replace('_', '-')} {merged[key]} must be >= 1")
    if int(merged["max_requeues"]) < 0:
        raise ValueError(f"--max-requeues {merged['max_requeues']} must be >= 0")
    slurm.check_timing(merged)  # the signal, its lead against --time
    return merged


def grid_options(opts: SweepOptions, preset: Preset, world_size: int) -> GridOptions:
    """The grid the flags ask for, preset values where a flag is absent (an empty list, `''`
    or `,`, is an error of launchers.cli: it must not silently mean the preset's grid)."""
    return GridOptions(
        sizes=opts.sizes if opts.sizes is not None else preset.sizes,
        budgets=opts.budgets if opts.budgets is not None else preset.budgets,
        seeds=opts.seeds, lrs=opts.lrs, batch_size=opts.batch_size,
        budget_kind=opts.budget_kind, world_size=world_size,
        overrides=parse_overrides(list(opts.sets)))


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
    run_dirs = {p.spec.run_id: p.spec.run_dir for p in todo}  # a fine-tune's is not in sweep_dir
    for run, rc in bad.items():
        print(f"\n{run} exited {rc}; last lines of its log:\n{log_tail(run_dirs[run])}")
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


def check_runs(planned: list[PlannedRun], cluster: str, dry_run: bool) -> None:
    """scaling.checks.check_run, training's own up-front checks, for every run this sweep
    would submit or start, before any claim or submission (the data, the environment and the
    few-shot sets once each); ValueError naming the first bad run."""
    cache: dict = {}
    for p in planned:
        if not p.submits:
            continue
        try:
            check_run(p.spec.cfg, p.spec.world_size, cache=cache, here=cluster == "local",
                      planned=True, run_dir=not dry_run)
        except ValueError as e:
            raise ValueError(f"run {p.spec.run_id}: {e}; nothing was started") from None


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


def world_size(opts: SweepOptions, preset: Preset, cluster: str,
               choice: Choice | None) -> tuple[int, int | None]:
    """(devices = ranks per run, CUDA GPUs here or None when not probed): --gpus, else the
    preset's, capped at this machine's GPUs for a GPU preset run locally."""
    if preset.device != "cuda" or cluster != "local":
        return (opts.devices if opts.devices is not None else preset.gpus), None
    here = choice.local_gpus if choice is not None else cuda_devices()
    if opts.devices is not None:
        return opts.devices, here
    return (min(preset.gpus, here) if here else preset.gpus), here


def run_sweep(opts: SweepOptions) -> int:
    """Validate, plan, claim, and submit (or run) what the plan says; nothing is submitted on
    bad input, and of two sweeps at once only one submits each run."""
    cluster, why = pick_cluster(opts.cluster, opts.dry_run)
    preset, choice = default_preset(opts, cluster, why)  # says which and why when defaulted
    placement = placement_settings(opts, preset)
    world, local_gpus = world_size(opts, preset, cluster, choice)
    layout = node_layout(world, int(placement["gpus_per_node"]))
    options = grid_options(opts, preset, world)  # flag errors before any data is made
    info, placeholder = resolve_data(opts, preset)
    preset = with_builtin_fewshot(opts, preset)  # the preset's downstream sets, made once
    sweep_dir = Path(opts.results).resolve() / (opts.name or preset.name)
    tree = branching.build_tree(preset, options, info, sweep_dir) if opts.branching else None
    specs = tree.specs if tree else build_grid(preset, options, info, sweep_dir)
    if opts.finetune:  # one fine-tune per run, after it (launchers.finetune_runs)
        if tree:
            raise ValueError("--finetune with --branching is not supported yet")
        specs = [*specs, *finetune_runs.finetune_specs(opts, specs, sweep_dir)]
    planned = classify(specs, opts.resubmit_failed)
    if not placeholder:  # what each run would check at its start, checked here first
        check_runs(planned, cluster, opts.dry_run)
    gpus = gpu_request(layout, preset.device)  # what each node of a SLURM job asks for
    kind = "GPU(s)" if preset.device == "cuda" else "CPU process(es)"
    print(f"sweep {sweep_dir.name}: preset {preset.name}, {len(specs)} run(s), {world} device(s) "
          f"per run ({kind}) = {layout[0]} node(s) x {layout[1]} task(s), cluster {cluster}"
          + (f", SLURM request {gpus} GPU(s) per node" if cluster == "slurm" else ""))
    if tree:
        print(tree.describe())
    for warning in plan_warnings(preset, specs, info, cluster, placement,
                                 placeholder=placeholder, local_gpus=local_gpus):
        print(f"warning: {warning}")
    with contextlib.nullcontext() if opts.dry_run else Claims() as claims:
        if claims is not None:
            planned = claim_runs(planned, claims, opts.resubmit_failed)
        todo = show_plan(planned)
        if not todo:
            print("nothing to submit")
            return 0
        if not opts.dry_run:
            for p in todo:
                if p.action == "resubmit":
                    set_aside_final(p.spec.run_dir)
        gated = branching if tree else finetune_runs if opts.finetune else None  # wait for others
        if cluster == "slurm":
            submit = gated.submit_slurm if gated else submit_array
            return submit(todo, placement, layout, gpus, sweep_dir, opts.dry_run, claims)
        return run_here(todo, placement, sweep_dir, opts.dry_run, claims,
                        runner=partial(run_gated, ready=gated.ready, waiting=gated.WAITING)
                        if gated else run_local)

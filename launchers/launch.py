"""A sweep invocation: validate everything, plan, then submit to SLURM or run locally."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
from pathlib import Path

from launchers import slurm
from launchers.grid import GridOptions, build_grid, node_layout, parse_list, parse_overrides
from launchers.local import log_tail, run_local
from launchers.plan import Planned, plan, set_aside_final
from launchers.presets import Preset, default_preset_name, get_preset
from launchers.runs import record_submission
from launchers.status import format_table
from scaling.data import DatasetInfo, load_dataset_info, make_builtin_shards
from scaling.results import EXIT_DIVERGED, EXIT_OK

PLAN_COLUMNS = ("run", "size", "budget", "seed", "lr", "ranks", "steps", "state", "action")
DEFAULTS = {"gpus_per_node": 8, "max_requeues": 3, "signal": "USR2@90"}


def settings(args: argparse.Namespace, preset: Preset) -> dict:
    """SLURM / placement settings: defaults < preset < --slurm-config YAML < flags."""
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
    slurm.parse_signal(merged["signal"])
    return merged


def resolve_data(args: argparse.Namespace, preset: Preset) -> DatasetInfo:
    """--data, or the preset's built-in shards (made once in a cache dir)."""
    if args.data:
        return load_dataset_info(args.data, verify="size")  # DataError names the problem
    if not preset.builtin_data:
        raise ValueError(f"preset {preset.name!r} needs --data DIR (shards with dataset.json, "
                         "from python -m scaling.data.make_shards)")
    tag = "-".join([preset.builtin_data] + [f"{k}{v}" for k, v in sorted(
        preset.data_args.items())])
    out = Path(os.environ.get("VIT_SCALING_DATA", "data")) / tag
    print(f"built-in data: {out} ({preset.builtin_data}; made once, then reused)")
    return make_builtin_shards(preset.builtin_data, out, **preset.data_args)


def pick_cluster(choice: str, dry_run: bool) -> str:
    """slurm or local; auto means SLURM where sbatch exists and sinfo answers."""
    if choice != "auto":
        return choice
    if shutil.which("sbatch") is None:
        return "local"
    if dry_run:
        return "slurm"
    try:
        subprocess.run(["sinfo", "-h"], capture_output=True, timeout=15, check=True)
        return "slurm"
    except (OSError, subprocess.SubprocessError):
        print("sbatch exists but SLURM does not answer (sinfo failed): running locally")
        return "local"


def grid_options(args: argparse.Namespace, preset: Preset, world_size: int) -> GridOptions:
    """The grid the flags ask for, preset values where a flag is absent."""
    return GridOptions(
        sizes=tuple(s for s in (args.sizes or ",".join(preset.sizes)).split(",") if s.strip()),
        budgets=parse_list(args.budgets, float, "--budgets") if args.budgets else preset.budgets,
        seeds=parse_list(args.seeds, int, "--seeds"),
        lrs=parse_list(args.lrs, float, "--lrs") if args.lrs else None,
        batch_size=args.batch_size, budget_kind=args.budget_kind, world_size=world_size,
        overrides=parse_overrides(args.set))


def submit_slurm(todo: list[Planned], s: dict, layout: tuple[int, int], gpus: bool,
                 sweep_dir: Path, dry_run: bool) -> int:
    """Submit the runs as one array (or print its sbatch script)."""
    folder = sweep_dir / "_submitit" / "%j"
    params = slurm.executor_parameters(s, nodes=layout[0], tasks_per_node=layout[1], gpus=gpus,
                                       name=f"vit-{sweep_dir.name}", count=len(todo))
    if dry_run:
        script = slurm.sbatch_script(params, folder, len(todo))
        print(f"\n# sbatch script ({len(todo)} run(s)):\n{script}")
        for i, p in enumerate(todo):
            print(f"# task {i}: {shlex.join(slurm.train_command(p.spec.cfg.to_args()))}")
        return 0
    sig = slurm.parse_signal(s["signal"])[0]
    jobs = [slurm.TrainJob(str(p.spec.run_dir), p.spec.cfg.to_args(), signal_name=sig,
                           max_requeues=int(s["max_requeues"])) for p in todo]
    ids = slurm.submit(jobs, params, folder, int(s["max_requeues"]))
    for p, job_id in zip(todo, ids):
        record_submission(p.spec.run_dir, p.spec.record(), sweep_dir.name, "slurm", job_id,
                          submitit_folder=str(folder.parent))
    print(f"submitted {len(ids)} run(s) to SLURM: {', '.join(ids)}")
    print(f"follow with: python launchers/sweep.py status --results {sweep_dir.parent}")
    return 0


def run_locally(todo: list[Planned], s: dict, sweep_dir: Path, dry_run: bool) -> int:
    """Run the runs here, `max_parallel` at a time; 1 if any failed."""
    if dry_run:
        for p in todo:
            print(f"# {p.spec.run_id} ({p.spec.world_size} process(es)): "
                  f"{shlex.join(slurm.train_command(p.spec.cfg.to_args()))}")
        return 0
    codes = run_local([p.spec for p in todo], sweep_dir.name, int(s.get("max_parallel") or 1))
    bad = {run: rc for run, rc in codes.items() if rc not in (EXIT_OK, EXIT_DIVERGED)}
    for run, rc in bad.items():
        print(f"\n{run} exited {rc}; last lines of its log:\n{log_tail(sweep_dir / run)}")
    return 1 if bad else 0


def run_sweep(args: argparse.Namespace) -> int:
    """Validate, plan, and submit (or run) what the plan says; nothing is submitted on error."""
    preset = get_preset(args.preset or default_preset_name())
    s = settings(args, preset)
    world = args.gpus if args.gpus is not None else preset.gpus
    layout = node_layout(world, int(s["gpus_per_node"]))
    info = resolve_data(args, preset)
    sweep_dir = Path(args.results).resolve() / (args.name or preset.name)
    specs = build_grid(preset, grid_options(args, preset, world), info, sweep_dir)
    cluster = pick_cluster(args.cluster, args.dry_run)
    planned = plan(specs, args.resubmit_failed)
    print(f"sweep {sweep_dir.name}: preset {preset.name}, {len(specs)} run(s), {world} rank(s) "
          f"each = {layout[0]} node(s) x {layout[1]} task(s), cluster {cluster}")
    print(format_table([p.row() for p in planned], PLAN_COLUMNS))
    for p in planned:
        if p.action == "report":
            print(f"{p.spec.run_id} is {p.state}: see {p.spec.run_dir}; rerun with "
                  "--resubmit-failed to train it again")
    todo = [p for p in planned if p.submits]
    if not todo:
        print("nothing to submit")
        return 0
    if not args.dry_run:
        for p in todo:
            if p.action == "resubmit":
                set_aside_final(p.spec.run_dir)
    if cluster == "slurm":
        return submit_slurm(todo, s, layout, preset.device == "cuda", sweep_dir, args.dry_run)
    return run_locally(todo, s, sweep_dir, args.dry_run)

"""Flags of `launchers/sweep.py` (kept apart from the entry point to keep both small)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from scaling.clihelp import DefaultsHelpFormatter

CLUSTERS = ("auto", "slurm", "local")
GONE = {"--allow-world-size-change": "a run's id no longer depends on --gpus, so a partly done "
                                     "run continues on any --gpus without it: drop the flag"}


@dataclass(frozen=True)
class SweepOptions:
    """The sweep's flags, typed, built once from argparse's Namespace (`parse_args`) and passed
    below cli.py; None means the preset's (or the documented) default."""

    preset: str | None = None
    name: str | None = None
    sizes: tuple[str, ...] | None = None
    budgets: tuple[float, ...] | None = None
    budget_kind: str | None = None
    seeds: tuple[int, ...] = (0,)
    lrs: tuple[float, ...] | None = None  # base learning rates at global batch 512
    batch_size: int | None = None
    sets: tuple[str, ...] = ()  # --set FIELD=VALUE as given (launchers.grid.parse_overrides)
    devices: int | None = None  # --gpus: devices (ranks) per run, GPUs or CPU processes
    gpus_per_node: int | None = None  # GPUs a node has (how runs are laid out on nodes)
    data: str | None = None
    results: str = "results"
    cluster: str = "auto"
    # SLURM: where and how long jobs run, and how they survive (docs/sweeps.md)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: int | None = None
    cpus_per_task: int | None = None
    max_parallel: int | None = None
    max_requeues: int | None = None
    signal: str | None = None
    slurm_config: str | None = None
    resubmit_failed: bool = False
    # runs that start from others: branches of a trunk, fine-tunes of finished runs
    branching: str | None = None
    finetune: str | None = None
    finetune_image_size: int | None = None
    finetune_steps: int | None = None
    finetune_lr: float | None = None
    dry_run: bool = False


def parse_list(text: str, kind: type, flag: str) -> tuple:
    """'1e15,3e15' -> (1e15, 3e15); a bad item raises ValueError naming the flag and item."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"{flag}: empty list {text!r}")
    out = []
    for item in items:
        try:
            value = kind(float(item)) if kind is int and "e" in item.lower() else kind(item)
        except ValueError:
            raise ValueError(f"{flag}: {item!r} is not a valid {kind.__name__}") from None
        out.append(value)
    return tuple(out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python launchers/sweep.py",
        description="Train a grid of ViTs (sizes x budgets x seeds x lrs) on SLURM or locally. "
                    "`python launchers/sweep.py status` prints the state of every run.",
        formatter_class=DefaultsHelpFormatter)
    add = parser.add_argument
    add("--preset", help="recipe: demo (CPU, built-in data), cifar, imagenet (default: by where "
                         "the runs execute: imagenet on SLURM or a local CUDA GPU, else demo)")
    add("--name", help="sweep name: runs go to RESULTS/NAME/RUN_ID (default: the preset's name)")
    add("--sizes", help="comma list of sizes, with or without patch: S,B or S/16,B/32 "
                        "(default: the preset's)")
    add("--budgets", help="comma list of compute budgets in FLOPs, e.g. 1e18,3e18 (in steps, "
                          "epochs or samples with --budget-kind; default: the preset's)")
    add("--budget-kind", choices=("flops", "steps", "epochs", "samples"),
        help="unit of --budgets (default: the preset's, flops)")
    add("--seeds", default="0", help="comma list of seeds (default: 0)")
    add("--lrs", help="comma list of base learning rates at global batch 512; the run's lr is "
                      "base x batch / 512 (DeiT); default: the preset's")
    add("--batch-size", type=int, help="global batch size (default: the preset's)")
    add("--set", action="append", default=[], metavar="FIELD=VALUE",
        help="any other TrainConfig field for every run, e.g. --set eval_every=50 (repeatable)")
    add("--gpus", type=int, help="devices per run (= ranks, one task each): GPUs on a GPU "
                                 "preset, CPU processes on a CPU preset (default: the preset's)")
    add("--gpus-per-node", type=int, help="GPUs a node has; runs of more devices take whole "
                                          "nodes (default 8)")
    add("--data", help="shard dir with dataset.json (default: demo makes its built-in data "
                       "under $VIT_SCALING_DATA or ./data; imagenet/cifar take "
                       "$VIT_SCALING_DATA_<PRESET>, else 'data: {PRESET: DIR}' in "
                       "./vit-scaling.yaml or ~/.config/vit-scaling/config.yaml)")
    add("--results", default="results", help="results root (default: results)")
    add("--cluster", choices=CLUSTERS, default="auto",
        help="slurm, local processes, or auto: slurm where sbatch exists and sinfo answers")
    _add_cluster_flags(add)
    _add_mode_flags(add)
    return parser


def _add_cluster_flags(add) -> None:
    """Where and how the runs are submitted (SLURM settings, requeues, resubmission)."""
    add("--partition", help="SLURM partition")
    add("--account", help="SLURM account")
    add("--qos", help="SLURM QOS")
    add("--time", type=int, help="SLURM time limit per job in minutes (default: the preset's)")
    add("--cpus-per-task", type=int, help="CPUs per rank (default: the preset's)")
    add("--max-parallel", type=int,
        help="runs at a time: the SLURM array's %%limit, or local runs in parallel (default: "
             "the preset's, else all on SLURM, 1 locally)")
    add("--max-requeues", type=int, help="requeues after preemption / time limit (default 3)")
    add("--signal", help="signal SLURM sends before the time limit, NAME[@SECONDS] "
                         "(default USR2@90)")
    add("--slurm-config", help="YAML with SLURM settings (keys as these flags, with _; flags win)")
    add("--resubmit-failed", action="store_true",
        help="also resubmit failed and diverged runs (their final.json is kept, renamed)")
    for flag in GONE:  # removed flags: one line saying why, not argparse's usage dump
        add(flag, action="store_true", help=argparse.SUPPRESS)


def _add_mode_flags(add) -> None:
    """Sweep modes beyond a plain grid (branching, fine-tuning) and the dry run."""
    add("--branching", choices=("cooldown",),
        help="cooldown: one trunk per size, lr and seed at a constant/rsqrt lr, and each budget "
             "a branch that trains only its cooldown from the trunk's checkpoint "
             "(launchers/branching.py; docs/sweeps.md, 'Branching sweeps')")
    add("--finetune", metavar="DIR",
        help="also fine-tune every pre-training run on this shard dir once it has finished "
             "(scaling.finetune; runs in RESULTS/NAME-finetune, rows in the pre-training "
             "runs' transfer.jsonl; launchers/finetune_runs.py)")
    add("--finetune-image-size", type=int, help="fine-tune resolution (default: the data's)")
    add("--finetune-steps", type=int, help="fine-tune steps (default 100)")
    add("--finetune-lr", type=float, help="fine-tune SGD learning rate (default 0.01)")
    add("--dry-run", action="store_true",
        help="print the grid and the sbatch script; submit nothing")


def parse_args(argv: list[str]) -> SweepOptions:
    """Sweep flags as SweepOptions; an empty value (`--sizes ''`) is an error, never "the
    default"; so is a bad list item or a removed flag (ValueError, one line)."""
    parser = _parser()
    args = parser.parse_args(argv)
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if isinstance(value, str) and not value.strip() and action.option_strings:
            flag = action.option_strings[0]
            raise ValueError(f"{flag} {value!r} is empty: give a value or leave {flag} out")
        if value is True and action.option_strings[:1] and action.option_strings[0] in GONE:
            flag = action.option_strings[0]
            raise ValueError(f"{flag} is gone: {GONE[flag]}")
    name = args.name
    if name is not None and ("/" in name or name.strip() in (".", "..")):
        raise ValueError(f"--name {name!r} must be a plain directory name (no '/', '.', '..')")
    return options(args)


def options(args: argparse.Namespace) -> SweepOptions:
    """SweepOptions of parsed flags (comma lists split and typed)."""
    lists = {"sizes": str, "budgets": float, "seeds": int, "lrs": float}
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SweepOptions)
             if hasattr(args, f.name)}
    for key, kind in lists.items():
        if given[key] is not None:
            given[key] = parse_list(given[key], kind, f"--{key}")
    return SweepOptions(**given, sets=tuple(args.set), devices=args.gpus)


def parse_status_args(argv: list[str]) -> argparse.Namespace:
    """`status` flags."""
    parser = argparse.ArgumentParser(prog="python launchers/sweep.py status",
                                     description="State of every run under a results dir.")
    parser.add_argument("--results", default="results", help="results root (default: results)")
    parser.add_argument("--watch", nargs="?", type=float, const=10.0, metavar="SECONDS",
                        help="refresh the table every SECONDS (default 10) with an ETA per "
                             "running run, until Ctrl-C")
    return parser.parse_args(argv)

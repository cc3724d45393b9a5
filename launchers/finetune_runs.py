"""`sweep.py --finetune DIR [--finetune-image-size N] [--finetune-steps N] [--finetune-lr LR]`:
one fine-tune run (scaling.finetune) per pre-training run of the grid, started after it.

A fine-tune is an ordinary, idempotent run in the sibling sweep dir `RESULTS/<sweep>-finetune/`;
its result is a row of the pre-training run's transfer.jsonl. Its id, and when it starts locally
and on SLURM: docs/sweeps.md ("Fine-tuning transfer").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from launchers.cli import SweepOptions
from launchers.grid import RunSpec, data_fingerprint, run_id
from launchers.submit import submit_after, submit_array, upstream_job
from scaling import finetune, results
from scaling.checks import check_data
from scaling.config import resolve_plan

RUNTIME = ("num_workers", "log_every", "progress", "tensorboard", "in_memory",
           "stop_poll_every")  # taken from the pre-training run: how, not what, it trains
DEFAULT_STEPS = 100


def sweep_dir_of(sweep_dir: Path) -> Path:
    """Where a sweep's fine-tune runs lie: RESULTS/<sweep>-finetune."""
    return sweep_dir.parent / f"{sweep_dir.name}-finetune"


def finetune_spec(pre: RunSpec, info, out_root: Path, *, image_size: int | None, steps: int,
                  lr: float | None) -> RunSpec:
    """The fine-tune run of pre-training run `pre` on downstream data `info`."""
    given = {k: getattr(pre.cfg, k) for k in RUNTIME}
    given.update(data=str(info.root), out=str(out_root / "_pending"), steps=steps,
                 image_size=image_size, lr=lr, seed=pre.seed)
    cfg = finetune.fine_tune_config(pre.cfg.to_dict(), init_from=str(pre.run_dir), **given)
    plan = resolve_plan(cfg, info, pre.world_size)
    rid = run_id([pre.run_id, f"ft{plan.image_size}"], cfg, data_fingerprint(info), out_root,
                 unhashed=("init_from",))  # the upstream run is in the id already
    cfg = dataclasses.replace(cfg, out=str(out_root / rid))
    return RunSpec(run_id=rid, model=pre.model, budget=steps, budget_kind="steps",
                   seed=pre.seed, base_lr=cfg.lr, world_size=pre.world_size,
                   total_steps=plan.total_steps, cfg=cfg, macs_per_image=plan.macs_per_image)


def finetune_specs(opts: SweepOptions, specs: list[RunSpec], sweep_dir: Path) -> list[RunSpec]:
    """One fine-tune per pre-training spec; ValueError (one line) for bad --finetune flags."""
    try:
        info = check_data(opts.finetune)  # training's check of a data dir (scaling.checks)
    except ValueError as e:
        raise ValueError(f"--finetune {opts.finetune}: {e}") from None
    steps = opts.finetune_steps if opts.finetune_steps is not None else DEFAULT_STEPS
    out_root = sweep_dir_of(sweep_dir)
    try:
        return [finetune_spec(s, info, out_root, image_size=opts.finetune_image_size,
                              steps=steps, lr=opts.finetune_lr) for s in specs]
    except ValueError as e:
        raise ValueError(f"--finetune: {e}") from None


def ready(spec: RunSpec) -> bool:
    """A pre-training run may start now; a fine-tune once its pre-training run finished ok."""
    if spec.cfg.init_from is None:
        return True
    final = results.read_final(spec.cfg.init_from)
    return final is not None and final["status"] == results.STATUS_OK


# what a local sweep says of the fine-tunes left waiting (launchers.local.run_gated)
WAITING = ("{n} fine-tune(s) wait for a pre-training run that did not finish ok: {runs}; "
           "rerun the sweep")


def submit_slurm(todo: list, placement: dict, layout: tuple[int, int], gpu_request: int,
                 sweep_dir: Path, dry_run: bool, claims) -> int:
    """Pre-training runs as one array, then the fine-tunes: those of finished runs as one
    array, the others one array per pre-training job, each `afterok` on it
    (launchers.submit.submit_after)."""
    pre = [p for p in todo if p.spec.cfg.init_from is None]
    if pre:
        submit_array(pre, placement, layout, gpu_request, sweep_dir, dry_run, claims)
    job_of = upstream_job(ready, lambda spec: spec.cfg.init_from, dry_run, "PRETRAIN_JOB")
    left = submit_after([p for p in todo if p.spec.cfg.init_from is not None], job_of,
                        placement, layout, gpu_request, sweep_dir_of(sweep_dir), dry_run, claims)
    if left:
        print(f"{len(left)} fine-tune(s) wait for a pre-training run without a job: "
              f"{', '.join(p.spec.run_id for p in left)}; rerun the sweep")
    return 0

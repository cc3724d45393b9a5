"""What a run's config resolves to on a dataset and a world size (`resolve_plan` -> `TrainPlan`,
plan.json) and over its steps (warmup, cooldown, evaluation steps, the learning rate): the one
place a run's numbers are worked out. The sweep's table and job.json (launchers.grid), training
(scaling.train) and the loaders (through scaling.loop) all read it. scaling.config re-exports
these names; a config is passed in (TrainConfig, duck-typed: no import of scaling.config here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scaling import schedule as sched
from scaling.flops import forward_macs, images_for_flops, param_count
from scaling.schedule import STABLE

if TYPE_CHECKING:
    from scaling.config import TrainConfig
    from scaling.data import DatasetInfo

EVALS_PER_DECADE = 4


def batch_layout(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro batch per rank, accumulation steps) with micro x accum x world = global batch."""
    if cfg.batch_size % world_size:
        raise ValueError(f"global batch size {cfg.batch_size} is not divisible by the world "
                         f"size {world_size}; use a multiple of {world_size}")
    per_rank = cfg.batch_size // world_size
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise ValueError(f"per-rank batch {per_rank} (= {cfg.batch_size} / {world_size} ranks) "
                         f"is not a multiple of micro_batch_size {micro}")
    return micro, per_rank // micro


def resolve_steps(cfg: TrainConfig, num_train_samples: int, macs_per_image: int | None = None
                  ) -> int:
    """Turn any budget into optimizer steps (the one place this happens)."""
    kind, amount = cfg.budget
    if kind == "steps":
        steps = int(amount)
    else:
        if kind == "epochs":
            images = amount * (cfg.samples_per_epoch or num_train_samples)
        elif kind == "samples":
            images = amount
        else:
            if macs_per_image is None:
                raise ValueError("a FLOPs budget needs the model's MACs per image")
            images = images_for_flops(amount, macs_per_image)
        steps = math.floor(images / cfg.batch_size + 1e-9)
    if steps < 1:
        raise ValueError(f"budget --{kind} {amount:g} is less than one step of "
                         f"{cfg.batch_size} images; raise the budget or lower --batch-size")
    return steps


@dataclass(frozen=True)
class TrainPlan:
    """What a config resolves to on a dataset and a world size (plan.json): `resolve_plan`."""

    total_steps: int
    world_size: int
    micro_batch: int  # per rank
    accumulation: int  # micro-batches per optimizer step and rank
    steps_per_epoch: int
    samples_per_epoch: int
    params: int
    macs_per_image: int  # forward MACs (scaling.flops)
    num_classes: int
    image_size: int


def resolve_plan(cfg: TrainConfig, data_info: DatasetInfo, world_size: int) -> TrainPlan:
    """The run's numbers on `data_info` (a scaling.data.DatasetInfo) and `world_size` ranks;
    ValueError (one line) for a batch that does not split over the ranks or a budget under one
    step. An epoch is samples_per_epoch (default: the train split) in whole global batches,
    the last one filled up (at least one step)."""
    if world_size < 1:
        raise ValueError(f"world size {world_size}: must be >= 1")
    micro, accum = batch_layout(cfg, world_size)
    vit_cfg = cfg.vit(num_classes=data_info.num_classes, image_size=data_info.image_size)
    macs = forward_macs(vit_cfg)
    train_samples = data_info.split("train").num_samples
    per_epoch = cfg.samples_per_epoch or train_samples
    total = resolve_steps(cfg, train_samples, macs)
    check_schedule(cfg, total)
    return TrainPlan(total_steps=total,
                     world_size=world_size, micro_batch=micro, accumulation=accum,
                     steps_per_epoch=max(1, -(-per_epoch // cfg.batch_size)),
                     samples_per_epoch=per_epoch, params=param_count(vit_cfg),
                     macs_per_image=macs, num_classes=data_info.num_classes,
                     image_size=vit_cfg.image_size)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """Warmup length: warmup_steps if given, else warmup_fraction of the run."""
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return round(cfg.warmup_fraction * total_steps)


def eval_steps(cfg: TrainConfig, total_steps: int) -> set[int]:
    """Steps after which a run evaluates, besides the last one (always evaluated).

    "log" spacing puts the evaluations evenly on a log axis, which is where error-vs-compute
    frontiers are read, and costs O(log steps) evaluations instead of O(steps).
    """
    if not cfg.eval_every:
        return set()
    if cfg.eval_spacing == "linear":
        return set(range(cfg.eval_every, total_steps, cfg.eval_every))
    steps, k = set(), 0
    while (step := round(cfg.eval_every * 10 ** (k / EVALS_PER_DECADE))) < total_steps:
        steps.add(step)
        k += 1
    return steps


def cooldown_steps(cfg: TrainConfig, total_steps: int) -> int:
    """Cooldown length of a constant/rsqrt run: cooldown_steps if given, else cooldown_fraction
    of the run (0 for cosine/linear, which decay to the end)."""
    if cfg.schedule not in STABLE:
        return 0
    return sched.cooldown_length(total_steps, cfg.cooldown_steps, cfg.cooldown_fraction)


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then the decay, or the
    stable rate and its cooldown (scaling.schedule.lr_at, the formulas).

    The ViT paper pre-trained with linear decay after a 10k-step warmup (Appendix B.1); DeiT
    uses cosine decay (Touvron et al. 2021, Table 9).
    """
    return sched.lr_at(step, total=total_steps, lr=cfg.lr, min_lr=cfg.min_lr,
                       schedule=cfg.schedule, warmup=warmup_steps(cfg, total_steps),
                       cooldown=cooldown_steps(cfg, total_steps),
                       cooldown_shape=cfg.cooldown_shape, timescale=cfg.rsqrt_timescale)


def check_schedule(cfg: TrainConfig, total_steps: int) -> None:
    """ValueError (one line) when the schedule does not fit a run of total_steps: a cooldown
    that starts inside the warmup, a branch step after the cooldown starts, a --ckpt-at step
    beyond the run."""
    warm, cool = warmup_steps(cfg, total_steps), cooldown_steps(cfg, total_steps)
    start = sched.cooldown_start(total_steps, cool)
    if cool and start < warm:
        raise ValueError(f"the cooldown ({cool} steps) starts at step {start}, inside the "
                         f"{warm}-step warmup of this {total_steps}-step run")
    if cfg.branch_step is not None and cfg.branch_step > start:
        raise ValueError(f"--branch-step {cfg.branch_step} is after this run's cooldown start "
                         f"{start} ({total_steps} steps, cooldown {cool})")
    late = [s for s in cfg.ckpt_at_steps if s > total_steps]
    if late:
        raise ValueError(f"--ckpt-at {late} beyond the run's {total_steps} steps")

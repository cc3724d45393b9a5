"""Learning-rate schedules as pure functions of the step (no torch, no config object): warmup,
then cosine / linear decay or a constant / rsqrt rate with a linear or 1-sqrt cooldown
(big_vision's schedules; Hägele et al. 2024 for 1-sqrt). A constant or rsqrt rate does not
depend on the run's length before its cooldown, which is what lets a branching sweep train the
shared prefix once. Formulas and citations: docs/sweeps.md ("Branching sweeps", Schedules).
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant", "rsqrt")
STABLE = ("constant", "rsqrt")  # schedules that take a cooldown
COOLDOWN_SHAPES = ("linear", "1-sqrt")


def cooldown_length(total: int, steps: int | None, fraction: float) -> int:
    """Cooldown steps of a run of `total` steps: `steps` when given, else round(fraction x
    total), at most the whole run."""
    n = steps if steps is not None else round(fraction * total)
    return max(0, min(int(n), total))


def cooldown_start(total: int, cooldown: int) -> int:
    """The first step of the cooldown (= total without one)."""
    return total - cooldown


def stable_lr(step: int, lr: float, schedule: str, warmup: int, timescale: float) -> float:
    """The rate of a constant or rsqrt schedule after warmup and before any cooldown."""
    if schedule == "constant":
        return lr
    return lr / math.sqrt(1 + (step - warmup) / timescale)


def cooldown_factor(step: int, total: int, cooldown: int, shape: str) -> float:
    """The cooldown's multiplier at `step` (1 before it starts)."""
    start = cooldown_start(total, cooldown)
    if cooldown <= 0 or step < start:
        return 1.0
    if shape == "linear":
        return min(1.0, (total - step) / cooldown)
    return 1.0 - math.sqrt((step - start) / cooldown)


def decay_lr(step: int, total: int, warmup: int, lr: float, min_lr: float, schedule: str
             ) -> float:
    """Cosine or linear decay from lr to min_lr after warmup (the original formula)."""
    t = (step - warmup) / max(total - warmup, 1)
    shape = 0.5 * (1 + math.cos(math.pi * t)) if schedule == "cosine" else 1 - t
    return min_lr + (lr - min_lr) * shape


def lr_at(step: int, *, total: int, lr: float, min_lr: float = 0.0, schedule: str = "cosine",
          warmup: int = 0, cooldown: int = 0, cooldown_shape: str = "linear",
          timescale: float = 10_000) -> float:
    """Learning rate of optimizer step `step` (0-based) of a run of `total` steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule not in STABLE:
        if total <= warmup:
            return lr
        return decay_lr(step, total, warmup, lr, min_lr, schedule)
    stable = stable_lr(step, lr, schedule, warmup, timescale)
    factor = cooldown_factor(step, total, cooldown, cooldown_shape)
    if factor == 1.0:
        return stable
    return min_lr + (stable - min_lr) * factor

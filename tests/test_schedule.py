"""Learning-rate schedules (scaling.schedule) and their TrainConfig fields: pure math, no run."""

import itertools
import math
import re

import pytest

from scaling import schedule as S
from scaling.config import TrainConfig, check_schedule, cooldown_steps, lr_at, pinned_steps

BASE = dict(model="mu/4", data="d", out="o", steps=100, lr=1e-2, warmup_steps=10)


def cfg(**kw):
    return TrainConfig(**{**BASE, **kw})


def old_lr_at(c, step, total):
    """The formula lr_at had before scaling.schedule existed (cosine/linear/constant)."""
    warm = min(c.warmup_steps, total) if c.warmup_steps is not None else round(
        c.warmup_fraction * total)
    if step < warm:
        return c.lr * (step + 1) / warm
    if c.schedule == "constant" or total <= warm:
        return c.lr
    t = (step - warm) / max(total - warm, 1)
    shape = 0.5 * (1 + math.cos(math.pi * t)) if c.schedule == "cosine" else 1 - t
    return c.min_lr + (c.lr - c.min_lr) * shape


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warm", [{"warmup_steps": 10}, {"warmup_steps": None,
                                                         "warmup_fraction": 0.07}])
def test_the_old_schedules_are_unchanged_bit_for_bit(schedule, warm):
    c = cfg(schedule=schedule, min_lr=1e-4, **warm)
    for total in (1, 7, 100, 1001):
        assert [lr_at(c, s, total) for s in range(total)] == \
               [old_lr_at(c, s, total) for s in range(total)]


def test_rsqrt_is_big_visions_formula():
    c = cfg(schedule="rsqrt", rsqrt_timescale=50)
    assert lr_at(c, 9, 100) == pytest.approx(1e-2)  # end of warmup
    for step in (10, 35, 99):
        assert lr_at(c, step, 100) == pytest.approx(1e-2 / math.sqrt(1 + (step - 10) / 50))


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_cooldown_shapes(shape):
    c = cfg(schedule="constant", cooldown_steps=20, cooldown_shape=shape)
    lrs = [lr_at(c, s, 100) for s in range(100)]
    assert lrs[10:81] == [1e-2] * 71  # stable up to and including the cooldown's first step
    for step in range(80, 100):
        f = (100 - step) / 20 if shape == "linear" else 1 - math.sqrt((step - 80) / 20)
        assert lrs[step] == pytest.approx(1e-2 * f)
    assert all(a > b for a, b in itertools.pairwise(lrs[80:]))  # strictly falling
    assert 0 < lrs[-1] < 1e-3


def test_cooldown_fraction_and_min_lr():
    c = cfg(schedule="rsqrt", cooldown_fraction=0.2, min_lr=1e-3)
    assert cooldown_steps(c, 100) == 20 and cooldown_steps(c, 1000) == 200
    stable = 1e-2 / math.sqrt(1 + (90 - 10) / 10_000)
    f = 1 - 10 / 20  # linear, step 90 of a 20-step cooldown from 80
    assert lr_at(c, 90, 100) == pytest.approx(1e-3 + (stable - 1e-3) * f)


def test_the_prefix_does_not_depend_on_the_run_length():
    """What branching rests on: before a run's cooldown starts, its rate is the trunk's."""
    for schedule in ("constant", "rsqrt"):
        trunk = cfg(schedule=schedule, steps=400)
        for total in (100, 250, 400):
            branch = cfg(schedule=schedule, steps=total, cooldown_fraction=0.2,
                         cooldown_shape="1-sqrt")
            start = total - cooldown_steps(branch, total)
            assert [lr_at(branch, s, total) for s in range(start + 1)] == \
                   [lr_at(trunk, s, 400) for s in range(start + 1)]


@pytest.mark.parametrize("kw, message", [
    ({"schedule": "cosine", "cooldown_steps": 5}, "need --schedule constant or rsqrt"),
    ({"schedule": "constant", "cooldown_fraction": 1.0}, "must be in [0, 1)"),
    ({"cooldown_shape": "cosine"}, "cooldown_shape='cosine'"),
    ({"rsqrt_timescale": 0}, "rsqrt_timescale=0"),
    ({"ckpt_at": "10,x"}, "--ckpt-at"),
    ({"ckpt_at": "10,10"}, "distinct"),
    ({"trunk_run": "t"}, "go together"),
    ({"trunk_run": "t", "branch_step": 5, "warmup_steps": None}, "needs --warmup-steps"),
])
def test_bad_schedule_fields_are_one_line_errors(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cfg(**kw)


def test_schedule_checks_against_the_run_length():
    with pytest.raises(ValueError, match="inside the 10-step warmup"):
        check_schedule(cfg(schedule="constant", cooldown_steps=95), 100)
    with pytest.raises(ValueError, match="after this run's cooldown start 80"):
        check_schedule(cfg(schedule="constant", cooldown_steps=20, trunk_run="t",
                           branch_step=81), 100)
    with pytest.raises(ValueError, match=r"--ckpt-at \[120\] beyond"):
        check_schedule(cfg(ckpt_at="50,120"), 100)
    check_schedule(cfg(schedule="constant", cooldown_steps=20, trunk_run="t", branch_step=80),
                   100)
    assert pinned_steps(cfg(ckpt_at="50, 20")) == {20, 50} and pinned_steps(cfg()) == set()


def test_new_fields_round_trip_as_flags():
    c = cfg(schedule="rsqrt", cooldown_steps=7, cooldown_shape="1-sqrt", rsqrt_timescale=99,
            ckpt_at="3,9", trunk_run="x_trunk", branch_step=9)
    assert TrainConfig.from_args(c.to_args()) == c
    assert S.cooldown_length(10, None, 0.25) == 2 and S.cooldown_length(10, 50, 0) == 10

"""scaling.config: flags round-trip, the evaluation schedule."""

from __future__ import annotations

import pytest

from scaling.config import TrainConfig, eval_steps

BASE = ["--model", "mu/4", "--data", "d", "--out", "o"]


def test_flags_round_trip_including_data_and_eval_options():
    cfg = TrainConfig.from_args([*BASE, "--steps", "10", "--in-memory", "off",
                                 "--eval-spacing", "log", "--eval-every", "3"])
    assert (cfg.in_memory, cfg.eval_spacing, cfg.eval_every) == ("off", "log", 3)
    assert TrainConfig.from_args(cfg.to_args()) == cfg
    assert TrainConfig.from_args([*BASE, "--steps", "1"]).in_memory == "auto"


@pytest.mark.parametrize("flag, value", [("--in-memory", "yes"), ("--eval-spacing", "exp")])
def test_bad_choices_exit_2(flag, value):
    with pytest.raises(SystemExit) as e:
        TrainConfig.from_args([*BASE, "--steps", "1", flag, value])
    assert e.value.code == 2


def _cfg(**kw):
    return TrainConfig(model="mu/4", data="d", out="o", steps=1, **kw)


def test_linear_eval_steps():
    assert eval_steps(_cfg(eval_every=25), 100) == {25, 50, 75}  # 100 is the final eval
    assert eval_steps(_cfg(eval_every=0), 100) == set()


def test_log_eval_steps_are_four_per_decade():
    steps = sorted(eval_steps(_cfg(eval_every=25, eval_spacing="log"), 3000))
    assert steps == [25, 44, 79, 141, 250, 445, 791, 1406, 2500]
    # a decade of steps holds EVALS_PER_DECADE evaluations, however long the run
    assert len([s for s in steps if 25 <= s < 250]) == 4
    assert len(eval_steps(_cfg(eval_every=1, eval_spacing="log"), 10**6)) == 24

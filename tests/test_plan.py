"""scaling.config.resolve_plan: a run's numbers, worked out once, for the sweep and training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from launchers.grid import GridOptions, build_grid
from launchers.presets import get_preset
from scaling.config import TrainConfig, TrainPlan, resolve_plan
from scaling.data import DatasetInfo, SplitInfo, load_dataset_info, make_train_loader
from scaling.data.memory import make_memory_train_loader
from scaling.flops import forward_macs, param_count
from scaling.model import vit_config
from scaling.train import prepare

# the built-in digits with 30 % val: 1258 train images of 8x8, 10 classes
DIGITS = DatasetInfo(root=Path("/data/digits"), source="digits", image_size=8,
                     image_format="png", classes=tuple(str(i) for i in range(10)),
                     splits={"train": SplitInfo("train", 1258, ()),
                             "val": SplitInfo("val", 539, ())})


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"model": "mu/4", "data": "d", "out": "o", "batch_size": 64, **kw})


def test_steps_budget_with_accumulation_over_ranks():
    plan = resolve_plan(_cfg(steps=30, micro_batch_size=8), DIGITS, world_size=2)
    vit_cfg = vit_config("mu/4", image_size=8, num_classes=10)
    assert plan == TrainPlan(total_steps=30, world_size=2, micro_batch=8, accumulation=4,
                             steps_per_epoch=20, samples_per_epoch=1258,
                             params=param_count(vit_cfg), macs_per_image=forward_macs(vit_cfg),
                             num_classes=10, image_size=8)
    # micro x accumulation x world = the global batch
    assert plan.micro_batch * plan.accumulation * plan.world_size == 64


def test_epochs_samples_and_flops_budgets():
    macs = forward_macs(vit_config("mu/4", image_size=8, num_classes=10))
    assert resolve_plan(_cfg(epochs=2.0), DIGITS, 1).total_steps == 2 * 1258 // 64  # 39
    assert resolve_plan(_cfg(samples=1000), DIGITS, 1).total_steps == 15
    flops = 3e9
    assert resolve_plan(_cfg(flops=flops), DIGITS, 1).total_steps == \
        math.floor(flops / (6 * macs) / 64) == 108
    # an epoch of a given length: budget and epoch length both follow it
    plan = resolve_plan(_cfg(epochs=1.5, samples_per_epoch=640), DIGITS, 4)
    assert (plan.total_steps, plan.steps_per_epoch, plan.samples_per_epoch) == (15, 10, 640)
    assert (plan.micro_batch, plan.accumulation) == (16, 1)
    assert resolve_plan(_cfg(steps=3, image_size=16), DIGITS, 1).image_size == 16


@pytest.mark.parametrize("kw, world, message", [
    ({"steps": 5}, 3, "global batch size 64 is not divisible by the world size 3"),
    ({"steps": 5, "micro_batch_size": 32}, 4,
     "per-rank batch 16 (= 64 / 4 ranks) is not a multiple of micro_batch_size 32"),
    ({"samples": 63}, 1, "budget --samples 63 is less than one step of 64 images"),
    ({"flops": 1e3}, 1, "less than one step of 64 images"),
    ({"steps": 5}, 0, "world size 0: must be >= 1"),
])
def test_bad_layouts_and_budgets_are_one_clear_error(kw, world, message):
    with pytest.raises(ValueError) as e:
        resolve_plan(_cfg(**kw), DIGITS, world)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kind, budgets, world_size", [
    ("flops", (3e9, 3e10), 1), ("epochs", (0.5, 3.0), 2), ("samples", (1000,), 4),
    ("steps", (7,), 2)])
def test_the_sweep_plans_what_training_resolves(digits_data, tmp_path, kind, budgets,
                                                world_size):
    """Both code paths: the sweep's grid (job.json's total_steps) and train.prepare."""
    opts = GridOptions(sizes=("mu", "m1"), budgets=budgets, budget_kind=kind,
                       world_size=world_size)
    data_info = load_dataset_info(digits_data)
    specs = build_grid(get_preset("demo"), opts, data_info, tmp_path)
    assert len(specs) == 2 * len(budgets)
    for spec in specs:
        _, vit_cfg, plan, _ = prepare(spec.cfg, spec.world_size)
        assert plan == resolve_plan(spec.cfg, data_info, world_size)
        assert spec.record()["total_steps"] == spec.total_steps == plan.total_steps
        assert (spec.world_size, spec.macs_per_image) == (plan.world_size, plan.macs_per_image)
        assert spec.train_flops == 6 * forward_macs(vit_cfg) * plan.total_steps * 64


def test_loaders_take_the_plans_epoch_length(digits_data):
    kw = dict(image_size=8, batch_size=16, rank=0, world_size=2, seed=0)
    assert make_train_loader(digits_data, num_workers=0, **kw).steps_per_epoch == 51  # 1617/32
    streamed = make_train_loader(digits_data, num_workers=0, steps_per_epoch=3, **kw)
    assert streamed.steps_per_epoch == 3 and len(list(streamed.epoch(0))) == 3
    in_memory = make_memory_train_loader(digits_data, steps_per_epoch=5, **kw)
    assert len(list(in_memory.epoch(1))) == 5
    with pytest.raises(ValueError, match="not both"):
        make_train_loader(digits_data, steps_per_epoch=3, samples_per_epoch=96, **kw)
    with pytest.raises(ValueError, match="steps_per_epoch=0"):
        make_memory_train_loader(digits_data, steps_per_epoch=0, **kw)

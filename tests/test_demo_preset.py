"""The CPU demo preset (launchers.presets.demo): cheap properties of its grid and its data, not
the sweep itself (about 2 minutes on 2 cores; its measured table is in docs/sweeps.md)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from launchers.grid import GridOptions, build_grid
from launchers.presets import LR_REFERENCE_BATCH, get_preset
from launchers.sweep import main
from scaling.data import make_builtin_shards
from scaling.data.info import DatasetInfo
from scaling.data.shapes import CANONICAL_BG, CANONICAL_FG, CLASSES, make_sample

DEMO = get_preset("demo")
FEW = 40  # images of the stand-in for the demo's data: same args but num_samples


@pytest.fixture(scope="module")
def small_demo_data(tmp_path_factory) -> DatasetInfo:
    """The demo's built-in data as its preset asks for it, but FEW images (its step counts do
    not depend on the number of images, only its run ids do)."""
    out = tmp_path_factory.mktemp("data") / "demo"
    return make_builtin_shards(DEMO.builtin_data, out, **{**DEMO.data_args, "num_samples": FEW})


def grid(info: DatasetInfo, tmp_path, **opts):
    return build_grid(DEMO, GridOptions(sizes=DEMO.sizes, budgets=DEMO.budgets, **opts), info,
                      tmp_path)


def test_the_data_it_asks_for_builds(small_demo_data):
    info = small_demo_data
    assert DEMO.builtin_data == "shapes" and info.source == "shapes"
    assert info.args["difficulty"] == DEMO.data_args["difficulty"] < 1  # not the full shapes
    assert info.num_classes == len(CLASSES) and info.image_size == 16
    assert (info.image_size // DEMO.patch) ** 2 == 4  # tokens per image (+ the class token)
    val = round(DEMO.data_args["num_samples"] * DEMO.data_args["val_fraction"])
    assert val >= 2000  # the full data: val intervals of about +-2 points at 30 % error
    assert info.split("val").num_samples == round(FEW * DEMO.data_args["val_fraction"])


def test_an_isoflop_grid_of_flops_budgets_with_enough_steps_per_run(small_demo_data, tmp_path):
    specs = grid(small_demo_data, tmp_path)
    # analysis.isoflop: >= 3 sizes per budget and >= 3 budgets with a vertex inside the sizes;
    # the smallest budget's vertex lies below mu, so 4 budgets leave 3
    assert len(DEMO.sizes) >= 3 and len(DEMO.budgets) >= 4
    assert DEMO.budget_kind == "flops" and all(s.cfg.flops == s.budget for s in specs)
    assert {(s.size, s.budget) for s in specs} == {(z, b) for z in DEMO.sizes for b in DEMO.budgets}
    steps = {(s.size, s.budget): s.total_steps for s in specs}
    assert min(steps.values()) >= 16  # m2 at 1e10: warmup and decay still have steps
    assert steps[("mu", 3e11)] == 4324 and steps[("m2", 1e10)] == 16
    for budget in DEMO.budgets:  # a smaller model takes more steps of the same compute
        assert steps[("mu", budget)] > steps[("m1", budget)] > steps[("m2", budget)]
    assert all(s.cfg.eval_every and s.cfg.eval_spacing == "log" for s in specs)


def test_the_grid_stays_the_size_that_was_timed(small_demo_data, tmp_path):
    """The demo was timed at 8,813 steps and 1.3e12 training FLOPs (docs/sweeps.md): more
    compute needs a new measurement of the main command, not just a new number."""
    specs = grid(small_demo_data, tmp_path)
    assert sum(s.total_steps for s in specs) <= 9000
    assert sum(s.train_flops for s in specs) <= 1.35e12
    assert DEMO.slurm["max_parallel"] == 2 and DEMO.slurm["cpus_per_task"] == 1


def test_the_global_batch_is_fixed_for_every_world_size(small_demo_data, tmp_path):
    one, two = grid(small_demo_data, tmp_path), grid(small_demo_data, tmp_path, world_size=2)
    assert [s.total_steps for s in one] == [s.total_steps for s in two]
    assert {s.cfg.batch_size for s in one + two} == {DEMO.batch_size}
    assert one[0].cfg.lr == pytest.approx(DEMO.base_lr * DEMO.batch_size / LR_REFERENCE_BATCH)


def test_a_dry_run_plans_the_grid(small_demo_data, tmp_path, capsys):
    rc = main(["--preset", "demo", "--cluster", "local", "--data", str(small_demo_data.root),
               "--results", str(tmp_path / "results"), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "preset demo, 12 run(s)" in out
    for model, budget, steps in (("mu8", "1e10", 144), ("mu8", "3e11", 4324),
                                 ("m1-8", "3e11", 1203), ("m2-8", "1e10", 16)):
        assert any(line.startswith(f"{model}_{budget}_") and f"0/{steps} " in line
                   for line in out.splitlines()), f"{model} {budget} {steps} not in:\n{out}"
    assert not (tmp_path / "results" / "demo").exists() or not any(
        (tmp_path / "results" / "demo").glob("*/final.json"))


def shapes_digest(**kw) -> str:
    h = hashlib.sha256()
    for i in range(20):
        for split in ("train", "val"):
            h.update(np.asarray(make_sample(i, seed=0, split=split, size=16, **kw)[0]).tobytes())
    return h.hexdigest()[:16]


def test_difficulty_1_draws_the_shapes_of_before_the_knob_and_0_the_canonical_ones(tmp_path):
    # e341d48c3b9f7189: these 40 images as scaling/data/shapes.py drew them before `difficulty`
    assert shapes_digest() == shapes_digest(difficulty=1.0) == "e341d48c3b9f7189"
    plain = np.asarray(make_sample(3, seed=0, split="train", size=16, difficulty=0.0)[0])
    assert (plain[..., 0] == plain[..., 1]).all() and (plain[..., 1] == plain[..., 2]).all()
    assert {int(plain.min()), int(plain.max())} == {round(255 * CANONICAL_BG),
                                                    round(255 * CANONICAL_FG)}
    quarter = np.asarray(make_sample(3, seed=0, split="train", size=16, difficulty=0.25)[0])
    full = np.asarray(make_sample(3, seed=0, split="train", size=16)[0])
    assert (quarter != plain).any() and (quarter != full).any()
    with pytest.raises(ValueError, match="difficulty"):
        make_sample(0, seed=0, split="train", size=16, difficulty=1.5)
    with pytest.raises(ValueError, match="only applies to shapes"):
        make_builtin_shards("digits", tmp_path / "digits", difficulty=0.5)
    default = make_builtin_shards("shapes", tmp_path / "s", image_size=8, num_samples=4,
                                  difficulty=1.0)
    assert "difficulty" not in default.args  # datasets made before the knob are reused

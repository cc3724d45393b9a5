"""The `demo-full` preset (launchers.presets.demo_full) and the shapes `difficulty` knob it uses:
cheap properties of its grid and its data, not the sweep itself (about 20 minutes on 2 cores;
its measured table and law are in docs/sweeps.md, "demo-full")."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from launchers.grid import GridOptions, build_grid
from launchers.presets import get_preset
from launchers.sweep import main
from scaling.data import make_builtin_shards
from scaling.data.info import DatasetInfo
from scaling.data.make_shards import main as make_shards_main
from scaling.data.shapes import CANONICAL_BG, CANONICAL_FG, CLASSES, make_sample

FULL = get_preset("demo-full")
FEW = 40  # images of the stand-in for its data: the same args but num_samples


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> DatasetInfo:
    """demo-full's built-in data as the preset asks for it, but FEW images (step counts depend
    only on the model and the budget, not on the number of images)."""
    out = tmp_path_factory.mktemp("data") / "demo-full"
    return make_builtin_shards(FULL.builtin_data, out, **{**FULL.data_args, "num_samples": FEW})


def grid(info: DatasetInfo, tmp_path, **opts):
    return build_grid(FULL, GridOptions(sizes=FULL.sizes, budgets=FULL.budgets, **opts), info,
                      tmp_path)


def test_the_data_it_asks_for_builds(small_data):
    info = small_data
    assert FULL.builtin_data == "shapes" and info.source == "shapes"
    assert info.args["difficulty"] == FULL.data_args["difficulty"] < 1  # not the full shapes
    assert info.num_classes == len(CLASSES) and info.image_size == 16
    assert (info.image_size // FULL.patch) ** 2 == 16  # tokens per image (+ the class token)
    val = round(FULL.data_args["num_samples"] * FULL.data_args["val_fraction"])
    assert val >= 4000  # the full data: 95 % intervals of about +-1.5 points at 50 % error
    assert info.split("val").num_samples == round(FEW * FULL.data_args["val_fraction"])


def test_an_isoflop_grid_the_analysis_can_fit(small_data, tmp_path):
    specs = grid(small_data, tmp_path)
    # analysis.fit.isoflop: >= 3 sizes per budget, and >= 3 budgets with a vertex inside the sizes
    assert len(FULL.sizes) >= 3 and len(FULL.budgets) >= 5
    assert FULL.budget_kind == "flops" and all(s.cfg.flops == s.budget for s in specs)
    assert {(s.size, s.budget) for s in specs} == {(z, b) for z in FULL.sizes
                                                   for b in FULL.budgets}
    steps = {(s.size, s.budget): s.total_steps for s in specs}
    assert min(steps.values()) >= 90  # the largest size at the smallest budget still learns
    assert steps[("mu", 1e13)] == 99987 and steps[("m2", 1e11)] == 96
    for budget in FULL.budgets:  # a smaller model takes more steps of the same compute
        per_size = [steps[(z, budget)] for z in FULL.sizes]
        assert per_size == sorted(per_size, reverse=True)
    assert all(s.cfg.eval_every and s.cfg.eval_spacing == "log" for s in specs)
    assert not FULL.fewshot_builtin  # no downstream set: the demo's mirrors digits


def test_the_grid_stays_the_size_that_was_timed(small_data, tmp_path):
    """demo-full was timed at the step and FLOP totals below (docs/sweeps.md): more compute
    needs a new measurement, not just a new number."""
    specs = grid(small_data, tmp_path)
    assert sum(s.total_steps for s in specs) <= 193_500
    assert sum(s.train_flops for s in specs) <= 4.35e13
    assert FULL.slurm["max_parallel"] == 2 and FULL.slurm["cpus_per_task"] == 1


def test_a_dry_run_plans_it_without_touching_the_demo(small_data, tmp_path, capsys):
    rc = main(["--preset", "demo-full", "--cluster", "local", "--data", str(small_data.root),
               "--results", str(tmp_path / "results"), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0, out
    n = len(FULL.sizes) * len(FULL.budgets)
    assert f"sweep demo-full: preset demo-full, {n} run(s)" in out
    assert any(line.startswith("m2-4_1e13_") for line in out.splitlines()), out
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.json"))
    assert get_preset("demo").builtin_data == "digits"  # the 3-minute demo is unchanged


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
    half = np.asarray(make_sample(3, seed=0, split="train", size=16, difficulty=0.5)[0])
    full = np.asarray(make_sample(3, seed=0, split="train", size=16)[0])
    assert (half != plain).any() and (half != full).any()
    with pytest.raises(ValueError, match="difficulty"):
        make_sample(0, seed=0, split="train", size=16, difficulty=1.5)
    with pytest.raises(ValueError, match="only applies to shapes"):
        make_builtin_shards("digits", tmp_path / "digits", difficulty=0.5)
    default = make_builtin_shards("shapes", tmp_path / "s", image_size=8, num_samples=4,
                                  difficulty=1.0)
    assert "difficulty" not in default.args  # datasets made before the knob are reused


def test_a_bad_difficulty_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    rc = make_shards_main(["--from", "shapes", "--out", str(tmp_path / "x"), "--num-samples",
                           "4", "--difficulty", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "difficulty=2.0; expected 0 <= D <= 1" in err[0], err
    assert not (tmp_path / "x").exists()


def test_data_that_differs_only_in_difficulty_or_seed_gets_other_run_ids(tmp_path):
    """Run ids fingerprint the data by size and shape, and by the builder arguments that change
    its content at the same size: otherwise a sweep on difficulty-0.5 shapes would find the
    difficulty-1 runs of the same name 'done' and reuse their results."""
    def ids(**kw):
        info = make_builtin_shards("shapes", tmp_path / "-".join(f"{k}{v}" for k, v in kw.items()),
                                   image_size=8, num_samples=20, **kw)
        return [s.run_id for s in build_grid(FULL, GridOptions(sizes=("mu",), budgets=(1e11,)),
                                             info, tmp_path / "r")]
    plain = ids()
    assert ids(difficulty=1.0) == plain  # the default is the data made before the knob
    assert ids(difficulty=0.5) != plain and ids(seed=1) != plain
    assert ids(difficulty=0.5) != ids(difficulty=0.25)

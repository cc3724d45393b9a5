"""The sweep builds TrainConfigs as data: pinned run ids, typed --set values, model names via
scaling.model.split_name, child processes that find the package where the sweep found it, and
a sweep whose stdout reader goes away (`| head`) ending quietly."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launchers import slurm
from launchers.grid import (
    GridOptions,
    build_grid,
    data_fingerprint,
    field_value,
    model_token,
    parse_overrides,
    recipe_payload,
    resolve_size,
)
from launchers.legacy import legacy_hash
from launchers.local import LocalRun
from launchers.presets import get_preset
from scaling.config import TrainConfig
from scaling.data import DatasetInfo, SplitInfo

REPO = Path(__file__).resolve().parents[1]
SWEEP = [sys.executable, str(REPO / "launchers" / "sweep.py")]


def dataset(source: str, image_size: int, classes: int, train: int, val: int) -> DatasetInfo:
    """A dataset's identity without its shards (all a run id depends on)."""
    return DatasetInfo(root=Path("/data") / source, source=source, image_size=image_size,
                       image_format="png", classes=tuple(str(i) for i in range(classes)),
                       splits={"train": SplitInfo("train", train, ()),
                               "val": SplitInfo("val", val, ())})


# the demo preset's built-in data (digits, 30 % val), and the placeholders of a dry run
DIGITS = dataset("digits", 8, 10, 1258, 539)
IMAGENET = dataset("placeholder:ImageNet-1k", 224, 1000, 1_281_167, 50_000)
CIFAR = dataset("placeholder:CIFAR-10", 32, 10, 50_000, 10_000)

# (run id, the id made before run ids left the world size out, steps): the second column was
# computed by the sweep before it built configs as data (flags parsed back by TrainConfig's
# parser) and names existing run dirs, which launchers.legacy finds by it; the first is the id
# of the same recipe at any --gpus (docs/sweeps.md, "Run ids made before the world size left
# them"), and both must never change
PINNED = [
    ("demo", DIGITS, GridOptions(sizes=("mu", "m1", "m2"), budgets=(3e9, 3e11)),
     [("mu4_3e9_42747d", "mu4_3e9_33a22f", 108),
      ("mu4_3e11_699f97", "mu4_3e11_c81a38", 10865),
      ("m1-4_3e9_92ac6d", "m1-4_3e9_a7c58b", 26),
      ("m1-4_3e11_5784fb", "m1-4_3e11_c75a7f", 2630),
      ("m2-4_3e9_2e6244", "m2-4_3e9_29aac1", 10),
      ("m2-4_3e11_1c413c", "m2-4_3e11_ced512", 1013)]),
    ("demo", DIGITS, GridOptions(sizes=("mu", "m1/2"), budgets=(1e10,), seeds=(0, 1),
                                 lrs=(1e-2, 3.2e-2)),
     [("mu4_1e10_c687a2", "mu4_1e10_4c8c04", 362),
      ("mu4_1e10_6e26dc", "mu4_1e10_e804b0", 362),
      ("mu4_1e10_9d75e0", "mu4_1e10_bb442f", 362),
      ("mu4_1e10_668476", "mu4_1e10_5d16e0", 362),
      ("m1-2_1e10_edbda3", "m1-2_1e10_86ffdb", 25),
      ("m1-2_1e10_18f156", "m1-2_1e10_c0c7a6", 25),
      ("m1-2_1e10_8da9ba", "m1-2_1e10_d8fc95", 25),
      ("m1-2_1e10_5a8d70", "m1-2_1e10_d8b63a", 25)]),
    ("demo", DIGITS, GridOptions(sizes=("mu",), budgets=(8, 16), budget_kind="steps",
                                 overrides=parse_overrides(["log_every=4", "weight_decay=0",
                                                            "hflip=true",
                                                            "min_crop_scale=0.5"])),
     [("mu4_8st_fcb219", "mu4_8st_90033a", 8),
      ("mu4_16st_fc7a23", "mu4_16st_6f7eaf", 16)]),
    ("demo", DIGITS, GridOptions(sizes=("m1",), budgets=(3e9,), world_size=2, batch_size=32),
     [("m1-4_3e9_bb5627", "m1-4_3e9_6399bd", 52)]),
    ("demo", DIGITS, GridOptions(sizes=("mu",), budgets=(0.5, 2), budget_kind="epochs"),
     [("mu4_0.5ep_b4eae4", "mu4_0.5ep_0e1337", 9),
      ("mu4_2ep_35714f", "mu4_2ep_390ef4", 39)]),
    ("demo", DIGITS, GridOptions(sizes=("mu",), budgets=(1000,), budget_kind="samples"),
     [("mu4_1000im_258125", "mu4_1000im_fbf251", 15)]),
    ("imagenet", IMAGENET, GridOptions(sizes=("Ti", "S", "B/32"), budgets=(1e18,),
                                       world_size=16),
     [("Ti16_1e18_074f7e", "Ti16_1e18_8cc08d", 129338),
      ("S16_1e18_bf056e", "S16_1e18_d4ddbc", 35318),
      ("B32_1e18_dd303f", "B32_1e18_d53d8c", 36873)]),
    ("cifar", CIFAR, GridOptions(sizes=("m3", "S"), budgets=(1e15,),
                                 overrides=parse_overrides(["precision=fp32", "zero=2"])),
     [("m3-4_1e15_8dd5cf", "m3-4_1e15_e531ef", 9992),
      ("S4_1e15_5b3790", "S4_1e15_d8b0b3", 228)]),
]


@pytest.mark.parametrize("preset, info, opts, expected", PINNED,
                         ids=[f"{p[0]}-{i}" for i, p in enumerate(PINNED)])
def test_run_ids_of_grid_points_are_those_of_existing_run_dirs(preset, info, opts, expected,
                                                                tmp_path):
    specs = build_grid(get_preset(preset), opts, info, tmp_path)
    assert [(s.run_id, s.total_steps) for s in specs] == [(i, n) for i, _, n in expected]
    assert all(s.run_dir == tmp_path / s.run_id for s in specs)
    # the old ids hashed the world size too: launchers.legacy still computes them
    payloads = [recipe_payload(s.cfg, data_fingerprint(info)) for s in specs]
    assert [f"{s.run_id.rsplit('_', 1)[0]}_{legacy_hash(p, opts.world_size)}"
            for s, p in zip(specs, payloads)] == [old for _, old, _ in expected]
    # and the id is the recipe's alone: the same grid at another world size has the same ids
    other = dataclasses.replace(opts, world_size=2 * opts.world_size)
    assert [s.run_id for s in build_grid(get_preset(preset), other, info, tmp_path)] == [
        s.run_id for s in specs]


def test_a_grid_point_is_a_train_config_that_round_trips_its_flags(tmp_path):
    (spec,) = build_grid(get_preset("demo"), PINNED[2][2], DIGITS, tmp_path)[:1]
    cfg = spec.cfg
    assert isinstance(cfg, TrainConfig) and cfg.out == str(tmp_path / "mu4_8st_fcb219")
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.log_every) == (8, 64, 0.004, 4)
    assert type(cfg.weight_decay) is float and cfg.hflip is True  # typed by TrainConfig
    assert TrainConfig.from_args(cfg.to_args()) == cfg
    assert cfg.to_args() == [
        "--model", "mu/4", "--data", "/data/digits", "--out", cfg.out, "--steps", "8",
        "--batch-size", "64", "--lr", "0.004", "--warmup-fraction", "0.1", "--weight-decay",
        "0.0", "--min-crop-scale", "0.5", "--hflip", "--eval-every", "25", "--eval-spacing",
        "log", "--log-every", "4", "--num-workers", "0", "--no-progress"]
    assert "train_args" not in spec.record()  # a command line only where a run is started
    assert slurm.train_command(cfg) == [sys.executable, "-m", "scaling.train", *cfg.to_args()]


def test_a_preset_value_is_typed_like_a_flag_so_the_run_id_does_not_depend_on_it(tmp_path):
    """An int written for a float field (weight_decay 0 vs 0.0) is the same run."""
    demo = get_preset("demo")
    opts = GridOptions(sizes=("mu",), budgets=(3e9,))
    as_int = demo.replace(train={**demo.train, "weight_decay": 0, "warmup_fraction": 0.1})
    as_float = demo.replace(train={**demo.train, "weight_decay": 0.0})
    ids = [build_grid(p, opts, DIGITS, tmp_path)[0].run_id for p in (as_int, as_float)]
    assert ids[0] == ids[1]
    broken = demo.replace(train={**demo.train, "no_such_field": 1})
    with pytest.raises(ValueError, match="preset demo: unknown training field 'no_such_field'"):
        build_grid(broken, opts, DIGITS, tmp_path)
    with pytest.raises(ValueError, match="--eval-every takes an int, not 2.5"):
        build_grid(demo.replace(train={"eval_every": 2.5}), opts, DIGITS, tmp_path)


@pytest.mark.parametrize("pair, value", [
    ("weight_decay=0.1", 0.1), ("weight_decay=0", 0.0), ("eval_every=50", 50),
    ("hflip=TRUE", True), ("progress=false", False), ("pool=gap", "gap"),
    ("eval-spacing= log ", "log"),
])
def test_set_values_take_the_type_of_their_field(pair, value):
    ((name, got),) = parse_overrides([pair])
    assert got == value and type(got) is type(value) and name == pair.split("=")[0].strip(
        ).replace("-", "_")


@pytest.mark.parametrize("pair, named", [
    ("eval_every=abc", "--eval-every takes an int, not 'abc'"),
    ("eval_every=2.5", "--eval-every takes an int"),
    ("hflip=yes", "--hflip takes true or false, not 'yes'"),
    ("min_lr=true", "--min-lr takes a float"),
    ("lr=0.1", "FIELD one of"),  # the grid's own field: --lrs sets it
    ("nope=1", "FIELD one of"),
    ("weight_decay", "FIELD one of"),
])
def test_a_bad_set_value_names_the_flag(pair, named):
    with pytest.raises(ValueError, match="--set") as e:
        parse_overrides([pair])
    assert named in str(e.value)


def test_field_value_keeps_none_only_for_optional_fields():
    assert field_value("image_size", None) is None
    with pytest.raises(ValueError, match="--lr takes a float"):
        field_value("lr", None)


def test_model_names_are_read_by_split_name():
    assert resolve_size("S", 16) == "S/16" and resolve_size(" m1/2 ", 4) == "m1/2"
    assert resolve_size("B/032", 16) == "B/32"  # one grid point, one spelling
    assert model_token("m1/2") == "m1-2" and model_token("B/16") == "B16"
    for bad in ("XL", "S/x", "S/"):
        with pytest.raises(ValueError, match="--sizes") as e:
            resolve_size(bad, 16)
        assert "'mu'" in str(e.value) and "'B'" in str(e.value)  # the valid sizes


# -- child processes find the package where the sweep found it --------------------------------

def test_children_of_a_checkout_get_it_on_pythonpath(monkeypatch):
    """This checkout is where the tests import the package from (editable install or not)."""
    assert slurm.package_paths() == [str(REPO)]
    env = slurm.child_env({"PYTHONPATH": os.pathsep.join(["/x", str(REPO)])}, cpus=3)
    assert env["PYTHONPATH"] == os.pathsep.join([str(REPO), "/x"])  # ours first, once
    assert env["OMP_NUM_THREADS"] == "3" and env["PYTHONUNBUFFERED"] == "1"
    params = slurm.executor_parameters({"time": 5}, nodes=1, tasks_per_node=1, gpu_request=0,
                                       name="t", count=1)
    assert f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}" in params["setup"]


def test_children_of_an_installed_package_get_no_path(monkeypatch):
    """An installed package lies in a site-packages dir, which every child searches."""
    monkeypatch.setattr(slurm.site, "getsitepackages", lambda: [str(REPO)])
    assert slurm.package_paths() == []
    assert "PYTHONPATH" not in slurm.child_env({}, cpus=None)
    assert slurm.child_env({"PYTHONPATH": "/x"}, cpus=None)["PYTHONPATH"] == "/x"
    params = slurm.executor_parameters({"time": 5}, nodes=1, tasks_per_node=1, gpu_request=0,
                                       name="t", count=1)
    assert not [line for line in params["setup"] if "PYTHONPATH" in line]


class FakeServer:
    """Records what a LocalRun asks the fork server to start."""

    def __init__(self):
        self.calls = []

    def spawn(self, argv, *, env, cwd, log):
        self.calls.append({"argv": argv, "env": env, "cwd": cwd, "log": log})
        return subprocess.Popen([sys.executable, "-c", "pass"])


def test_local_ranks_run_in_the_sweeps_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (spec,) = build_grid(get_preset("demo"), PINNED[2][2], DIGITS, tmp_path / "res")[:1]
    spec = dataclasses.replace(spec, world_size=2)
    server = FakeServer()
    LocalRun(spec, "demo", 1, server).start()
    assert [c["cwd"] for c in server.calls] == [str(tmp_path)] * 2
    assert all(c["argv"] == spec.cfg.to_args() for c in server.calls)
    assert server.calls[1]["env"]["RANK"] == "1"
    assert server.calls[0]["env"]["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)
    job = json.loads((spec.run_dir / "job.json").read_text())
    assert job["train_args"] == spec.cfg.to_args() and job["run_id"] == spec.run_id


def test_a_checkout_runs_its_sweep_file_without_an_install(tmp_path):
    """`python launchers/sweep.py` with the editable install hidden: the file's own checkout
    is put on sys.path (only in that case)."""
    code = ("import runpy, sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"
            "sys.path_hooks[:] = [h for h in sys.path_hooks if 'ditable' not in repr(h)]\n"
            "sys.path[:] = [p for p in sys.path if 'editable' not in p]\n"
            "sys.path_importer_cache.clear()\n"
            "import importlib.util\n"
            "assert importlib.util.find_spec('launchers') is None, 'still installed'\n"
            f"sys.argv = [{str(REPO / 'launchers' / 'sweep.py')!r}, 'status', '--results', '.']\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0 and "no runs under" in out.stdout, out.stderr[-2000:]


# -- `sweep.py ... | head` ----------------------------------------------------------------------

def run_with_closed_stdout(args: list[str], buffered: bool) -> subprocess.CompletedProcess:
    """The sweep with a stdout whose reader has already exited (a `| head` that is done).
    Unbuffered, the first print fails; buffered (a pipe's default), the first flush."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update({} if buffered else {"PYTHONUNBUFFERED": "1"}, VIT_SCALING_FORK_SERVER="0")
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([*SWEEP, *map(str, args)], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=300, check=False, env=env)
    finally:
        os.close(write)


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("command", ["status", "dry-run", "local"])
def test_a_closed_pipe_ends_the_sweep_quietly(command, buffered, digits_data, tmp_path):
    """Exit 141 without a traceback; a local sweep whose first line fails to go out (its
    output is buffered until a run starts) stops as on Ctrl-C, before that run starts."""
    grid = ["--preset", "demo", "--sizes", "mu", "--budget-kind", "steps", "--budgets", "8",
            "--data", digits_data, "--results", tmp_path]
    args = {"status": ["status", "--results", tmp_path],
            "dry-run": [*grid, "--cluster", "slurm", "--dry-run"],
            "local": [*grid, "--cluster", "local"]}[command]
    out = run_with_closed_stdout(args, buffered)
    assert out.returncode == 141, out.stderr
    stopped = command == "local" and buffered
    assert out.stderr.strip() == ("sweep: interrupted; rerun to resume" if stopped else "")
    assert not list(tmp_path.rglob(".claim*")) and not list(tmp_path.rglob("job.json"))

"""The default preset follows where the runs execute; the GPU study's data defaults; warnings.

The three places: "SLURM answers, no local GPU" is this machine (its local SLURM cluster);
"no SLURM, no GPU" is a sweep subprocess whose PATH has no sbatch/sinfo; "local CUDA" can only
be shown by handing the choosing function the probe's answer (its `cuda` parameter).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launchers.checks import partitions
from launchers.cli import SweepOptions
from launchers.defaults import choose_preset, data_default, default_preset
from launchers.launch import world_size
from launchers.presets import get_preset
from launchers.sweep import main

REPO = Path(__file__).resolve().parents[1]
SWEEP = [sys.executable, str(REPO / "launchers" / "sweep.py")]
LAPTOP_FIX = "python launchers/sweep.py --preset demo --cluster local"


def sweep(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture
def no_data_defaults(tmp_path, monkeypatch):
    """No data env var and no config file (cwd and XDG_CONFIG_HOME are empty dirs)."""
    for name in ("IMAGENET", "CIFAR"):
        monkeypatch.delenv(f"VIT_SCALING_DATA_{name}", raising=False)
    (tmp_path / "cwd").mkdir()
    (tmp_path / "xdg").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return tmp_path


def laptop(tmp_path: Path, *argv, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """The sweep CLI where there is neither SLURM (no sbatch, no sinfo on PATH) nor a GPU."""
    empty = tmp_path / "bin"
    empty.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIT_SCALING_DATA")}
    env.update(PATH=str(empty), VIT_SCALING_DATA=str(tmp_path / "cache"),
               XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    return subprocess.run([*SWEEP, *map(str, argv)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300, check=False)


def plan_rows(out: str) -> list[list[str]]:
    """The rows of the plan table (below its `run size budget ...` header)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:3] == ["run", "size",
                                                                           "budget"])
    rows = []
    for line in lines[start + 1:]:
        if not line.strip() or line.startswith(("#", "warning", "sweep", "\n")):
            break
        rows.append(line.split())
    return rows


def test_the_preset_follows_where_the_runs_execute():
    """The choosing function, with the CUDA probe's answer handed in (never a mock of torch)."""
    on_slurm = choose_preset("slurm", "sbatch found", cuda=0)
    assert (on_slurm.preset, on_slurm.runs_on) == ("imagenet", "slurm")
    assert "SLURM" in on_slurm.reason and "sbatch found" in on_slurm.reason
    gpu_box = choose_preset("local", "no sbatch on PATH", cuda=2)
    assert (gpu_box.preset, gpu_box.runs_on, gpu_box.local_gpus) == ("imagenet", "local-gpu", 2)
    assert "2 CUDA GPU(s)" in gpu_box.reason
    cpu = choose_preset("local", "no sbatch on PATH", cuda=0)
    assert (cpu.preset, cpu.runs_on) == ("demo", "cpu") and "no CUDA GPU" in cpu.reason
    # local GPU runs of the GPU study use this machine's GPUs, not the preset's 8
    args = SweepOptions(sizes=("S", "B"))
    assert world_size(args, get_preset("imagenet"), "local", gpu_box) == (2, 2)
    args = SweepOptions(sizes=("S", "B"), devices=1)
    assert world_size(args, get_preset("imagenet"), "local", gpu_box) == (1, 2)
    assert world_size(args, get_preset("imagenet"), "slurm", on_slurm)[0] == 1
    preset, choice = default_preset(SweepOptions(sizes=("S", "B"), devices=8),
                                    "local", "no sbatch on PATH", cuda=1)
    assert preset.name == "imagenet" and choice.local_gpus == 1  # a GPU box: no refusal


def test_slurm_here_plans_s16_b16_on_one_node_of_8_gpus(slurm, no_data_defaults, capsys):
    """The headline command on a login node without a GPU (this machine): the GPU study,
    planned with a marked placeholder of ImageNet's size since no data is given."""
    results = no_data_defaults / "results"
    rc = sweep("--sizes", "S,B", "--gpus", 8, "--dry-run", "--results", results)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "preset imagenet (default): the runs go to SLURM (sbatch found)" in out
    assert {row[1] for row in plan_rows(out)} == {"S/16", "B/16"}
    assert ("8 device(s) per run (GPU(s)) = 1 node(s) x 8 task(s), cluster slurm, SLURM "
            "request 8 GPU(s) per node") in out
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --gpus-per-node=8"):
        assert line in out, f"{line!r} missing from:\n{out}"
    assert "placeholder of ImageNet-1k" in out and "--data '<DATA>'" in out
    assert "VIT_SCALING_DATA_IMAGENET" in out  # how to give the data for the real run
    assert "budget" not in capsys.readouterr().err
    assert not list(results.rglob("job.json"))


def test_a_dry_run_warns_of_a_partition_without_gpus(slurm, no_data_defaults, capsys):
    found = partitions()
    default = next(p for p in found if p.endswith("*"))
    if any("gpu" in g for g in found[default]):
        pytest.skip(f"this cluster's partition {default} has GPUs")
    rc = sweep("--sizes", "S", "--budgets", "1e18", "--dry-run", "--results", no_data_defaults)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"warning: partition {default.rstrip('*')!r} has no GPUs" in out, out
    rc = sweep("--sizes", "S", "--budgets", "1e18", "--dry-run", "--partition", "nosuchpart",
               "--results", no_data_defaults)
    out = capsys.readouterr().out
    assert rc == 0 and "warning: sinfo lists no partition 'nosuchpart'" in out, out
    # a CPU preset requests no GPUs: nothing to warn about
    rc = sweep("--preset", "demo", "--sizes", "mu", "--budgets", "1e10", "--cluster", "slurm",
               "--dry-run", "--results", no_data_defaults)
    out = capsys.readouterr().out
    assert rc == 0 and "warning" not in out, out


def test_a_224px_recipe_on_8px_images_warns(slurm, digits_data, no_data_defaults, capsys):
    args = ["--sizes", "S", "--budgets", "1e18", "--dry-run", "--results", no_data_defaults]
    assert sweep(*args, "--preset", "imagenet", "--data", digits_data) == 0
    out = capsys.readouterr().out
    assert re.search(r"warning: the imagenet recipe trains at 224 px but \S+ holds 8 px "
                     r"images \(28x upscaled", out), out
    assert sweep(*args, "--preset", "demo", "--data", digits_data, "--sizes", "mu") == 0
    assert "upscaled" not in capsys.readouterr().out  # the demo recipe is made for them


def test_gpu_study_data_from_flag_env_or_config_else_exit_2(digits_data, no_data_defaults,
                                                            monkeypatch, capsys):
    results = no_data_defaults / "results"
    args = ["--sizes", "S", "--budgets", "1e18", "--cluster", "slurm", "--results", results]
    assert sweep(*args) == 2  # a real run without data: nothing is submitted
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for way in ("--data DIR", "VIT_SCALING_DATA_IMAGENET=DIR", "./vit-scaling.yaml",
                "~/.config/vit-scaling/config.yaml"):
        assert way in err, f"{way!r} not in {err}"
    assert not results.exists()
    user = no_data_defaults / "xdg" / "vit-scaling" / "config.yaml"  # the user's config dir
    user.parent.mkdir()
    user.write_text(f"data:\n  imagenet: {digits_data}\n")
    assert data_default("imagenet") == (str(Path(digits_data).resolve()), str(user))
    here = no_data_defaults / "cwd" / "vit-scaling.yaml"  # the working dir's file wins
    here.write_text("data:\n  imagenet: ../elsewhere\n")
    assert data_default("imagenet")[0] == str(no_data_defaults / "elsewhere")
    assert sweep(*args) == 2 and "elsewhere" in capsys.readouterr().err
    monkeypatch.setenv("VIT_SCALING_DATA_IMAGENET", digits_data)  # the variable wins
    assert sweep(*args, "--dry-run") == 0
    out = capsys.readouterr().out
    assert f"data: {digits_data} (from VIT_SCALING_DATA_IMAGENET)" in out
    assert f"--data {Path(digits_data).resolve()}" in out and "placeholder" not in out
    here.write_text("data: [oops]\n")
    monkeypatch.delenv("VIT_SCALING_DATA_IMAGENET")
    assert sweep(*args, "--dry-run") == 2
    assert str(here) in capsys.readouterr().err


def test_laptop_says_no_gpu_and_names_the_command_that_works(tmp_path):
    """No SLURM, no GPU: the headline command is not a budget error; it stops before any work
    with the command that works here, and that command does."""
    done = laptop(tmp_path, "--sizes", "S,B", "--gpus", 8, "--results", tmp_path / "r")
    assert done.returncode == 2, done
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "budget" not in err, err
    assert "no GPU here" in err and "no sbatch on PATH" in err and "--sizes S,B --gpus 8" in err
    assert LAPTOP_FIX in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "cache").exists()
    for asked in (["--gpus", "2"], ["--sizes", "B/16", "--dry-run"]):
        other = laptop(tmp_path, *asked, "--results", tmp_path / "r")
        assert other.returncode == 2 and LAPTOP_FIX in other.stderr, other
    fix = laptop(tmp_path, *LAPTOP_FIX.split()[2:], "--dry-run", "--results", tmp_path / "r")
    assert fix.returncode == 0, fix
    assert "cluster local" in fix.stdout and len(plan_rows(fix.stdout)) == 15


def test_laptop_default_is_the_cpu_demo_and_says_why(tmp_path):
    done = laptop(tmp_path, "--sizes", "mu", "--budgets", "1e10", "--dry-run",
                  "--results", tmp_path / "r")
    assert done.returncode == 0, done
    assert ("preset demo (default): no CUDA GPU here and the runs are local (no sbatch on "
            "PATH), so the CPU demo") in done.stdout
    assert [row[1] for row in plan_rows(done.stdout)] == ["mu/4"]
    # an explicit CPU preset keeps --gpus N as N processes per run
    done = laptop(tmp_path, "--preset", "demo", "--sizes", "mu", "--budgets", "1e10",
                  "--gpus", 2, "--dry-run", "--results", tmp_path / "r")
    assert done.returncode == 0, done
    assert "2 device(s) per run (CPU process(es))" in done.stdout, done

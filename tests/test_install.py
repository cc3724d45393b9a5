"""A non-editable install runs a tiny demo sweep and its plot from outside the checkout, through
the console entry points (vit-sweep, vit-plot): nothing assumes a source tree."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_installed_package_runs_a_sweep_and_plot_outside_the_checkout(tmp_path):
    venv = tmp_path / "venv"
    # The venv sees this interpreter's packages (torch, DeepSpeed, ...) but gets its own,
    # non-editable copy of this project: a plain install, as a user would do it. No pip of its
    # own: the outer pip and setuptools build and install into it, offline.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)],
                   check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
           "--no-build-isolation", "--no-index", str(REPO)]
    subprocess.run(pip, check=True, timeout=600, cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1")
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import launchers, scaling; print(scaling.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert str(venv) in where and str(REPO) not in where  # the installed copy, not the tree
    sweep = subprocess.run(["vit-sweep", "--preset", "demo", "--cluster", "local", "--sizes",
                            "mu", "--budgets", "3e9,1e10", "--results", "res"], cwd=work,
                           env=env, capture_output=True, text=True, timeout=600, check=False)
    assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr[-2000:]
    finals = sorted((work / "res" / "demo").glob("*/final.json"))
    assert len(finals) == 2
    plot = subprocess.run(["vit-plot", "--results", "res", "--out", "figs"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert plot.returncode == 0, plot.stderr[-2000:]
    assert (work / "figs" / "summary.json").is_file()
    assert (work / "figs" / "error_vs_flops.png").is_file()

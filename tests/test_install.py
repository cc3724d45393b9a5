"""A non-editable install runs a tiny demo sweep and its plot from outside the checkout, through
the console entry points (vit-sweep, vit-plot): nothing assumes a source tree."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_installed_package_runs_a_sweep_and_plot_outside_the_checkout(tmp_path):
    venv = tmp_path / "venv"
    # The venv sees the packages of the environment running the tests (torch, DeepSpeed, pip,
    # ...) but gets its own, non-editable copy of this project: a plain install, as a user would
    # do it. `--system-site-packages` alone would show it the base interpreter's packages only,
    # so when the tests run inside a virtual environment (README), a .pth adds that one's too.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)],
                   check=True, timeout=300)
    see_active_environment(venv)
    # Built as `pip install .` builds it (an isolated build env, setuptools from the index pip
    # is configured with, as the README's install needed): the active environment's own build
    # tools may be too old to build a wheel (a venv's bundled setuptools 65 without `wheel`).
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(REPO)]
    subprocess.run(pip, check=True, timeout=600, cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1")
    work = tmp_path / "elsewhere"
    work.mkdir()
    probe = "import launchers, scaling, torch; print(scaling.__file__); print(torch.__file__)"
    where = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.split()
    assert str(venv) in where[0] and str(REPO) not in where[0]  # the installed copy, not the tree
    active = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    assert any(where[1].startswith(site) for site in active), (where, active)  # this env's torch
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


def see_active_environment(venv: Path) -> None:
    """Make `venv` see this interpreter's site-packages (with their .pth files, as
    --system-site-packages does for the base interpreter's), after its own."""
    if sys.prefix == sys.base_prefix:
        return  # not in a virtual environment: --system-site-packages shows this one's already
    sites = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
    inner = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    lines = [f"import site; site.addsitedir({site!r})" for site in sites]
    (Path(inner) / "active_environment.pth").write_text("\n".join(lines) + "\n")

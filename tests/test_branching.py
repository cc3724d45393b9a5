"""Branch runs (scaling.branch) and branching sweeps (launchers/branching.py), under real
DeepSpeed on CPU: trunk checkpoints, exact continuation, SIGTERM, a killed trunk, reruns."""

import json
import subprocess
import sys

import pytest
from conftest import REPO, train_env
from safetensors.torch import load_file

from analysis.fit.compute import sweep_compute
from analysis.load import load_results
from scaling import results
from scaling.config import TrainConfig, cooldown_steps

COMMON = ["--model", "mu/4", "--batch-size", "32", "--num-workers", "0", "--lr", "4e-3",
          "--schedule", "constant", "--warmup-steps", "5", "--eval-every", "10",
          "--log-every", "5", "--no-progress", "--in-memory", "on"]
BRANCH = ["--steps", "30", "--cooldown-steps", "6", "--cooldown-shape", "1-sqrt"]


def train(args, faults=None, code=0):
    proc = subprocess.run([sys.executable, "-m", "scaling.train", *args], env=train_env(faults),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == code, proc.stderr[-3000:]
    return proc


def complete_steps(run_dir):
    root = run_dir / results.CHECKPOINT_DIR
    return sorted(int(d.name[4:]) for d in root.glob("step*") if (d / "COMPLETE").is_file())


def evals(run_dir):
    return [(r["step"], r["top1"], r["loss"], r["flops_seen"])
            for r in results.read_metrics(run_dir) if r["kind"] == "eval"]


def weights(run_dir):
    return load_file(str(run_dir / results.EXPORT_FILE))


def same_weights(a, b):
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_branch_continues_its_trunk_exactly_also_after_sigterm(digits_data, tmp_path):
    """Trunk with pinned checkpoints under rotation; a branch equals a run trained from
    scratch with its schedule, and a branch stopped by SIGTERM and resumed equals both."""
    base = [*COMMON, "--data", digits_data]
    trunk = tmp_path / "trunk"
    train([*base, "--out", str(trunk), "--steps", "40", "--ckpt-at", "24,40",
           "--ckpt-every", "10", "--keep-ckpts", "1"])
    assert complete_steps(trunk) == [24, 30, 40]  # 10 and 20 rotated away, 24 and 40 pinned
    whole = tmp_path / "scratch"
    train([*base, *BRANCH, "--out", str(whole)])
    branch = [*base, *BRANCH, "--trunk-run", "trunk", "--branch-step", "24"]
    a, b = tmp_path / "a", tmp_path / "b"
    seeded = train([*branch, "--out", str(a)])
    assert "seeded from" in seeded.stderr
    train([*branch, "--out", str(b)], faults="sigterm@27", code=results.EXIT_PREEMPTED)
    resumed = train([*branch, "--out", str(b)])
    assert "seeded earlier" in resumed.stderr and "resumed from step00000027" in resumed.stderr
    assert evals(a) == evals(whole) == evals(b)  # bitwise, prefix rows (the trunk's) included
    assert same_weights(weights(a), weights(whole)) and same_weights(weights(a), weights(b))
    fa, fw = results.read_final(a), results.read_final(whole)
    assert fa["total_flops"] == fw["total_flops"] and fa["steps"] == 30  # the whole curve's x
    assert json.loads((a / "config.json").read_text())["branch_step"] == 24
    assert results.read_final(trunk)["steps"] == 40  # the trunk itself untouched


def test_a_branch_refuses_a_missing_point_or_another_recipe(digits_data, tmp_path):
    base = [*COMMON, "--data", digits_data]
    (tmp_path / "trunk").mkdir()
    cfg = TrainConfig.from_args([*base, "--steps", "40", "--out", str(tmp_path / "trunk")])
    results.write_json(tmp_path / "trunk" / "config.json", {**cfg.to_dict(), "lr": 1e-3})
    out = train([*base, *BRANCH, "--trunk-run", "trunk", "--branch-step", "24",
                 "--out", str(tmp_path / "b")], code=results.EXIT_BAD_INPUT)
    assert "another recipe (lr: 0.001 vs 0.004)" in out.stderr
    results.write_json(tmp_path / "trunk" / "config.json", cfg.to_dict())
    out = train([*base, *BRANCH, "--trunk-run", "trunk", "--branch-step", "24",
                 "--out", str(tmp_path / "b")], code=results.EXIT_BAD_INPUT)
    assert "no complete checkpoint of step 24 yet" in out.stderr
    assert not (tmp_path / "b" / "config.json").exists()


def sweep(tmp_path, data, *extra, faults=None):
    cmd = [sys.executable, str(REPO / "launchers" / "sweep.py"), "--preset", "demo",
           "--cluster", "local", "--data", data, "--results", str(tmp_path / "res"),
           "--sizes", "mu", "--budget-kind", "steps", "--budgets", "30,60,120",
           "--branching", "cooldown", "--set", "eval_every=20", "--set", "eval_spacing=linear",
           *extra]
    return subprocess.run(cmd, env=train_env(faults), capture_output=True, text=True,
                          timeout=900, check=False, cwd=tmp_path)


def runs_of(res):
    runs = {d.name: d for d in results.iter_run_dirs(res)}
    trunk = next(d for name, d in runs.items() if "_trunk" in name)
    branches = {json.loads((d / "config.json").read_text())["steps"]: d
                for name, d in runs.items() if d != trunk}
    return trunk, branches


def test_branching_sweep_killed_trunk_rerun_and_idempotence(digits_data, tmp_path):
    """A trunk killed (SIGKILL, inside its save at the second branch point) leaves the later
    branches pending; the rerun resumes it and runs them; a third run submits nothing."""
    first = sweep(tmp_path, digits_data, faults="kill_in_save@48")
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    assert "compute: " in first.stdout and "(0.6" in first.stdout  # 96 + 6 + 12 + 24 of 210
    assert "2 branch(es) wait for their trunk's checkpoint" in first.stdout
    res = tmp_path / "res" / "demo"
    pending = [d for d in res.iterdir() if d.is_dir() and not (d / "config.json").exists()
               and not d.name.startswith(("_", "."))]
    assert len(pending) == 2 and not any((d / "job.json").exists() for d in pending)
    status = subprocess.run([sys.executable, str(REPO / "launchers" / "sweep.py"), "status",
                             "--results", str(tmp_path / "res")], capture_output=True,
                            text=True, timeout=120, check=False)
    assert "failed" not in status.stdout.replace("0 failed", ""), status.stdout

    second = sweep(tmp_path, digits_data)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    trunk, branches = runs_of(res)
    cfg = TrainConfig(**json.loads((trunk / "config.json").read_text()))
    starts = []
    for steps, d in sorted(branches.items()):
        b = TrainConfig(**json.loads((d / "config.json").read_text()))
        starts.append(steps - cooldown_steps(b, steps))
        assert b.branch_step == starts[-1] and results.read_final(d)["steps"] == steps
    assert starts == [24, 48, 96] and cfg.ckpt_at == "24,48,96" and cfg.steps == 96
    assert complete_steps(trunk) == [24, 48, 96]
    jobs = {d: (d / "job.json").read_text() for d in [trunk, *branches.values()]}

    third = sweep(tmp_path, digits_data)
    assert third.returncode == 0 and "nothing to submit" in third.stdout, third.stdout[-2000:]
    assert jobs == {d: (d / "job.json").read_text() for d in jobs}
    per_step = results.read_final(trunk)["total_flops"] / 96
    got = sweep_compute(load_results(tmp_path / "res"))  # trunk and branches, read once
    assert got["compute_spent"] == pytest.approx(per_step * (96 + 6 + 12 + 24), rel=1e-12)
    assert got["compute_independent"] == pytest.approx(per_step * (30 + 60 + 120), rel=1e-12)


def test_slurm_dry_run_makes_waiting_branches_depend_on_their_trunk(digits_data, tmp_path):
    out = sweep(tmp_path, digits_data, "--dry-run", "--cluster", "slurm")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "#SBATCH --dependency=afterok:TRUNK_JOB" in out.stdout
    assert "#SBATCH --kill-on-invalid-dep=yes" in out.stdout
    assert out.stdout.count("--trunk-run") == 3

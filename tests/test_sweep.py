"""The sweep launcher without SLURM: grid and run ids, dry-run, bad input, status, local runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launchers.grid import GridOptions, budget_token, build_grid, model_token, node_layout
from launchers.presets import PRESETS, get_preset
from launchers.runs import update_job
from launchers.status import status
from launchers.sweep import main
from scaling.data import load_dataset_info
from scaling.results import FINAL_KEYS, read_final, write_json

REPO = Path(__file__).resolve().parents[1]
MU = ["--sizes", "mu", "--budget-kind", "steps", "--set", "log_every=4"]


def sweep(*argv: str) -> int:
    """The CLI in-process (same code path as `python launchers/sweep.py`)."""
    return main([str(a) for a in argv])


def test_grid_ids_are_stable_and_follow_the_config(digits_data, tmp_path):
    info, preset = load_dataset_info(digits_data), get_preset("demo")
    opts = GridOptions(sizes=("mu", "m1/2"), budgets=(1e10, 3e10), seeds=(0, 1))
    a = build_grid(preset, opts, info, tmp_path)
    assert [s.run_id for s in a] == [s.run_id for s in build_grid(preset, opts, info, tmp_path)]
    assert len({s.run_id for s in a}) == 8
    assert {s.model for s in a} == {"mu/4", "m1/2"}  # demo's patch is 4; an explicit one wins
    assert a[0].run_id.startswith("mu4_1e10_") and a[-1].run_id.startswith("m1-2_3e10_")
    assert all(s.run_dir == tmp_path / s.run_id for s in a)
    other = build_grid(preset, GridOptions(sizes=("mu",), budgets=(1e10,), lrs=(1e-2,)), info,
                       tmp_path)
    assert other[0].run_id != a[0].run_id and other[0].cfg.lr == pytest.approx(1e-2 * 64 / 512)
    imagenet = build_grid(get_preset("imagenet"), GridOptions(sizes=("S",), budgets=(1e18,),
                                                              world_size=16), info, tmp_path)
    assert imagenet[0].model == "S/16" and imagenet[0].cfg.lr == pytest.approx(1e-3)
    assert budget_token(3.5e10, "flops") == "3.5e10" and budget_token(8, "steps") == "8st"
    assert model_token("B/16") == "B16" and node_layout(16, 8) == (2, 8)
    assert set(PRESETS) == {"demo", "demo-full", "cifar", "imagenet"}


def test_dry_run_shows_sbatch_directives_for_16_gpus(digits_data, tmp_path, capsys):
    results = tmp_path / "results"
    rc = sweep("--preset", "imagenet", "--sizes", "B", "--budgets", "1e18", "--gpus", 16,
               "--gpus-per-node", 8, "--partition", "gpu", "--time", 600, "--cluster", "slurm",
               "--data", digits_data, "--results", results, "--dry-run")
    out = capsys.readouterr().out
    assert rc == 0, out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=600", "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@90",
                 "#SBATCH --requeue", "#SBATCH --cpus-per-task=10"):
        assert line in out, f"{line!r} missing from:\n{out}"
    assert "-m scaling.train --model B/16" in out and "2 node(s) x 8 task(s)" in out
    assert not list(results.rglob("job.json")), "a dry run must not touch run dirs"


def test_slurm_yaml_settings_and_flags_override_them(digits_data, tmp_path, capsys):
    config = tmp_path / "slurm.yaml"
    config.write_text("partition: big\naccount: vision\nqos: high\ntime: 77\nsignal: USR1@120\n"
                      "max_parallel: 3\n")
    rc = sweep("--preset", "demo", *MU, "--budgets", "4,8,12,16", "--data", digits_data,
               "--results", tmp_path, "--slurm-config", config, "--time", 99,
               "--cluster", "slurm", "--dry-run")
    out = capsys.readouterr().out
    assert rc == 0, out
    for line in ("--partition=big", "--account=vision", "--qos=high", "--time=99",
                 "--signal=USR1@120", "--array=0-3%3", "SUBMITIT_PREEMPT_SIGNAL=USR1"):
        assert line in out, f"{line!r} missing from:\n{out}"
    assert "--gpus-per-node" not in out  # a CPU preset requests no GPUs
    config.write_text("partitoin: big\n")
    assert sweep("--data", digits_data, "--slurm-config", config, "--dry-run") == 2
    assert "partitoin" in capsys.readouterr().err


@pytest.mark.parametrize("flags, names", [
    (["--sizes", "XL"], ["'XL'", "mu", "B"]),
    (["--gpus", "12", "--gpus-per-node", "8"], ["--gpus 12", "8"]),
    (["--data", "/nonexistent/shards"], ["/nonexistent/shards"]),
    (["--budgets", "1e3"], ["1000", "one step"]),
    (["--set", "zero=7"], ["zero", "7"]),
    (["--preset", "tiny"], ["'tiny'", "demo"]),
    (["--signal", "USR9"], ["USR9"]),
])
def test_bad_input_fails_before_anything_is_submitted(flags, names, digits_data, tmp_path,
                                                      capsys):
    args = ["--preset", "demo", "--sizes", "mu", "--budgets", "1e10", "--data", digits_data,
            "--results", tmp_path / "results", "--cluster", "local"]
    rc = sweep(*args, *flags)
    err = capsys.readouterr().err
    assert rc == 2, err
    for name in names:
        assert name in err, f"{name!r} not named in: {err}"
    assert not (tmp_path / "results").exists(), "nothing may be created on bad input"


def test_status_reports_every_state(tmp_path, capsys):
    sweep_dir = tmp_path / "s"
    finals = {"a_done": "ok", "b_failed": "failed", "c_diverged": "diverged"}
    for name, st in finals.items():
        (sweep_dir / name).mkdir(parents=True)
        write_json(sweep_dir / name / "config.json", {"model": "mu/2", "steps": 8, "flops": None})
        write_json(sweep_dir / name / "final.json",
                   {**dict.fromkeys(FINAL_KEYS), "status": st})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, exit_code in (("d_preempted", 75), ("e_crashed", 1)):
        update_job(sweep_dir / name, model="mu/2", budget=8, budget_kind="steps",
                   total_steps=8, cluster="local", job_id="local-1", pids=[[dead.pid, None]],
                   attempt={"job_id": "local-1"}, attempt_end={"exit": exit_code})
        (sweep_dir / name / "metrics.jsonl").write_text(json.dumps(
            {"kind": "eval", "step": 4, "epoch": 0.1, "images_seen": 256, "flops_seen": 1.0,
             "wall_s": 1.0, "loss": 2.0, "top1": 0.25, "top5": 0.5, "num_samples": 180}) + "\n")
    update_job(sweep_dir / "f_running", model="mu/2", budget=8, budget_kind="steps",
               total_steps=8, cluster="local", job_id="local-2", pids=[[os.getpid(), None]])
    assert sweep("status", "--results", tmp_path) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    states = {run.split("/")[1]: row[3] for run, row in rows.items() if "/" in run}
    assert states == {"a_done": "done", "b_failed": "failed", "c_diverged": "diverged",
                      "d_preempted": "preempted", "e_crashed": "failed", "f_running": "running"}
    assert rows["s/d_preempted"][4:6] == ["4/8", "0.2500"]
    assert status(tmp_path).endswith("6 runs: 1 diverged, 1 done, 2 failed, 1 preempted, "
                                     "1 running")


@pytest.mark.slow
def test_local_demo_preset_end_to_end_and_idempotent(tmp_path, monkeypatch, capsys):
    """`--preset demo` with no --data makes its built-in shards and trains locally."""
    monkeypatch.setenv("VIT_SCALING_DATA", str(tmp_path / "cache"))
    args = ["--preset", "demo", "--sizes", "mu,m1", "--budgets", "1e9", "--cluster", "local",
            "--max-parallel", "2", "--results", tmp_path / "results"]
    assert sweep(*args) == 0, capsys.readouterr()
    assert len(list((tmp_path / "cache").glob("digits-val*/dataset.json"))) == 1
    assert (tmp_path / "cache" / "digits-mirror" / "dataset.json").is_file()  # downstream set
    runs = sorted((tmp_path / "results" / "demo").glob("*/final.json"))
    assert len(runs) == 2
    finals = [read_final(p.parent) for p in runs]
    assert all(f["status"] == "ok" and f["final_top1"] is not None for f in finals)
    capsys.readouterr()
    assert sweep(*args) == 0
    out = capsys.readouterr().out
    assert "nothing to submit" in out and out.count(" done ") == 2


@pytest.mark.multiproc
@pytest.mark.parametrize("fork_server", ["1", "0"])
def test_local_run_with_two_ranks(digits_data, tmp_path, capsys, monkeypatch, fork_server):
    """Both ways of starting ranks: forked by launchers/zygote.py, or `python -m`."""
    monkeypatch.setenv("VIT_SCALING_FORK_SERVER", fork_server)
    rc = sweep("--preset", "demo", *MU, "--budgets", "8", "--gpus", "2", "--cluster", "local",
               "--data", digits_data, "--results", tmp_path)
    assert rc == 0, capsys.readouterr()
    (run,) = (tmp_path / "demo").glob("mu4_8st_*")
    final = read_final(run)
    assert final["status"] == "ok" and final["world_size"] == 2 and final["steps"] == 8
    assert (run / "logs" / "rank1.log").is_file()
    job = json.loads((run / "job.json").read_text())
    assert job["attempts"][-1]["exit"] == 0 and len(job["pids"]) == 2
    assert (tmp_path / "demo" / "fork_server.log").exists() == (fork_server == "1")


def test_sweep_runs_without_a_fork_server_that_cannot_start(digits_data, tmp_path, capsys,
                                                            monkeypatch):
    """A server that cannot start (e.g. CUDA initialised by an import, which a fork cannot
    inherit) is reported, and the ranks start as processes."""
    from launchers import zygote

    def refuse(log):
        raise RuntimeError("the fork server did not start (exit 3)")

    monkeypatch.setattr(zygote, "ForkServer", refuse)
    rc = sweep("--preset", "demo", *MU, "--budgets", "8", "--cluster", "local", "--data",
               digits_data, "--results", tmp_path)
    out = capsys.readouterr().out
    assert rc == 0 and "no fork server (the fork server did not start (exit 3))" in out
    (run,) = (tmp_path / "demo").glob("mu4_8st_*")
    assert read_final(run)["status"] == "ok"


def test_script_entry_point_runs_as_a_file(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "launchers" / "sweep.py"), "status",
                          "--results", str(tmp_path)], capture_output=True, text=True, check=False,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and "no runs under" in out.stdout, out.stderr


@pytest.mark.slow
def test_diverged_run_is_reported_and_retrained_only_on_request(digits_data, tmp_path,
                                                                  monkeypatch, capsys):
    args = ["--preset", "demo", *MU, "--budgets", "8", "--cluster", "local", "--data",
            digits_data, "--results", tmp_path]
    monkeypatch.setenv("VIT_SCALING_FAULTS", "nan@3")  # the train CLI's fault injection
    assert sweep(*args) == 0  # a diverged run is a result, not a launcher failure
    (run,) = (tmp_path / "demo").glob("mu4_8st_*")
    assert read_final(run)["status"] == "diverged"
    monkeypatch.delenv("VIT_SCALING_FAULTS")
    capsys.readouterr()
    assert sweep(*args) == 0
    out = capsys.readouterr().out
    assert "diverged" in out and "--resubmit-failed" in out and "nothing to submit" in out
    assert sweep(*args, "--resubmit-failed") == 0
    assert read_final(run)["status"] == "ok"
    kept = list(run.glob("final.*.json"))  # the diverged final.json is kept, renamed
    assert len(kept) == 1 and json.loads(kept[0].read_text())["status"] == "diverged"


def test_strict_mode_turns_a_skipped_slurm_test_into_a_failure(tmp_path):
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tmp_path / "test_marked.py").write_text(
        "import pytest\n\n@pytest.mark.slurm\ndef test_needs_slurm():\n"
        "    pytest.skip('no cluster')\n\ndef test_plain():\n    pytest.skip('fine')\n")
    env = {k: v for k, v in os.environ.items() if k != "VIT_SCALING_STRICT"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)]
    lax = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tmp_path,
                         env=env, timeout=120)
    assert lax.returncode == 0 and "2 skipped" in lax.stdout, lax.stdout
    strict = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tmp_path,
                            env={**env, "VIT_SCALING_STRICT": "1"}, timeout=120)
    assert strict.returncode == 1 and "1 failed, 1 skipped" in strict.stdout, strict.stdout
    assert "must not skip" in strict.stdout

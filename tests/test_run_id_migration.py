"""Run dirs named by the ids made before run ids left the world size out (launchers.legacy):
real runs of a real local sweep, renamed to the ids the old sweep gave them, are found by a
rerun at any --gpus: the finished one is skipped, the unfinished one resumes in its own dir, no
second dir is made, and the analysis reads one run per recipe."""

import json
import subprocess
import sys

import pytest

from analysis.load import load_results
from launchers.grid import GridOptions, build_grid, data_fingerprint, recipe_payload
from launchers.legacy import legacy_hash
from launchers.presets import get_preset
from launchers.sweep import main
from scaling import results
from scaling.data import load_dataset_info

STOP = 8  # the unfinished run is stopped (SIGTERM, checkpointed) after this step


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """8 px shapes shards made by the real CLI."""
    out = tmp_path_factory.mktemp("data") / "shapes8"
    subprocess.run([sys.executable, "-m", "scaling.data.make_shards", "--from", "shapes",
                    "--out", str(out), "--image-size", "8", "--num-samples", "600"],
                   check=True, capture_output=True, timeout=300)
    return str(out)


def sweep_args(data, root, seed):
    return ["--preset", "demo", "--sizes", "mu", "--budgets", "20", "--budget-kind", "steps",
            "--seeds", str(seed), "--set", "log_every=5", "--cluster", "local", "--data", data,
            "--results", str(root), "--name", "legacy"]


def as_legacy(run_dir, data, world_size):
    """Rename a run dir made by this sweep to the id the sweep gave it before (the same recipe
    hashed with `world_size`), job.json's run_id with it; the dir it becomes."""
    info = load_dataset_info(data)
    seed = json.loads((run_dir / "config.json").read_text())["seed"]
    (spec,) = build_grid(get_preset("demo"), GridOptions(
        sizes=("mu",), budgets=(20,), budget_kind="steps", seeds=(seed,),
        overrides=(("log_every", 5),)), info, run_dir.parent)
    assert spec.run_id == run_dir.name
    old = f"{spec.run_id.rsplit('_', 1)[0]}_" \
          f"{legacy_hash(recipe_payload(spec.cfg, data_fingerprint(info)), world_size)}"
    assert old != spec.run_id
    target = run_dir.rename(run_dir.parent / old)
    job = json.loads((target / "job.json").read_text())
    (target / "job.json").write_text(json.dumps({**job, "run_id": old}))
    return target


@pytest.mark.slow
def test_runs_made_under_the_old_ids_are_found_at_any_gpus(shapes, tmp_path, capsys,
                                                           monkeypatch):
    sweep_dir = tmp_path / "legacy"
    assert main(sweep_args(shapes, tmp_path, 0)) == 0, capsys.readouterr()
    (made,) = sweep_dir.glob("mu4_20st_*")
    done = as_legacy(made, shapes, 1)
    final_before = (done / "final.json").read_text()
    monkeypatch.setenv("VIT_SCALING_FAULTS", f"sigterm@{STOP}")  # the train CLI's faults
    main(sweep_args(shapes, tmp_path, 1))  # stops at step STOP, checkpointed (exit 75)
    monkeypatch.delenv("VIT_SCALING_FAULTS")
    (made,) = set(sweep_dir.glob("mu4_20st_*")) - {done}
    assert results.read_final(made) is None
    part = as_legacy(made, shapes, 1)
    capsys.readouterr()

    # planned at another --gpus: both old dirs are the grid points' runs (a dry run changes
    # nothing)
    assert main([*sweep_args(shapes, tmp_path, "0,1"), "--gpus", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith("mu4_20st_")}
    assert set(rows) == {done.name, part.name}, out
    assert rows[done.name][-2:] == ["done", "skip"] and rows[part.name][-2:] == [
        "preempted", "resume"], out

    # run: the finished run is not trained again, the unfinished one resumes in its dir
    assert main(sweep_args(shapes, tmp_path, "0,1")) == 0, capsys.readouterr()
    assert sorted(sweep_dir.glob("mu4_20st_*")) == sorted([done, part])
    assert (done / "final.json").read_text() == final_before
    final = results.read_final(part)
    assert final["status"] == "ok" and final["steps"] == 20
    assert [(s["start_step"], s["end_step"]) for s in final["segments"]] == [(0, STOP),
                                                                              (STOP, 20)]

    # and a rerun finds both done; the analysis reads one run per recipe
    capsys.readouterr()
    assert main([*sweep_args(shapes, tmp_path, "0,1"), "--gpus", "2"]) == 0
    assert "nothing to submit" in capsys.readouterr().out
    runs = load_results(tmp_path, workers=1).runs
    assert sorted(runs["run_id"]) == sorted([done.name, part.name])
    assert sorted(runs["seed"]) == [0, 1] and set(runs["status"]) == {"ok"}

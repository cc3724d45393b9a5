"""A run checkpointed at N ranks continues at M ranks (2 -> 1 for ZeRO 0-3, 1 -> 2 for ZeRO 3)
under real DeepSpeed and real signals: with --data-order global its loss curve equals the
uninterrupted run's, which holds only if the weights, the AdamW moments and step, the param
groups' settings and the LR schedule all carried over (scaling.engine, universal checkpoints)."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import train_env

from scaling import engine, results
from scaling.data import make_builtin_shards

# log every 2 steps and stop at step 3: the resumed run's first row (step 4) averages a step
# taken at the old world size with one at the new one
ARGS = ["--model", "mu/4", "--image-size", "8", "--batch-size", "16", "--num-workers", "0",
        "--no-progress", "--lr", "3e-3", "--warmup-steps", "2", "--steps", "6",
        "--log-every", "2", "--data-order", "global", "--precision", "fp32"]
STOP = 3
# the same math on 1 or 2 ranks, only the order of fp32 reductions differs (tests/test_train.py)
RTOL = 1e-5

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return str(make_builtin_shards("digits", tmp_path_factory.mktemp("data") / "digits").root)


def train(data, out, nproc, zero, faults=None):
    cmd = [sys.executable, "-m", "scaling.train", *ARGS, "--zero", str(zero), "--data", data,
           "--out", str(out)]
    if nproc > 1:
        cmd[1:3] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "scaling.train"]
    return subprocess.run(cmd, env=train_env(faults), capture_output=True, text=True,
                          timeout=600, check=False)


def curve(out):
    """(kind, step, loss) of every metrics row."""
    return [(r["kind"], r["step"], r["loss"]) for r in results.read_metrics(out)]


def assert_same_curve(got, want):
    assert [(k, s) for k, s, _ in got] == [(k, s) for k, s, _ in want]
    assert [loss for *_, loss in got] == pytest.approx([loss for *_, loss in want], rel=RTOL)


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    """The uninterrupted run on one rank (every stage and world size gives this curve)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = train(digits, out, 1, 0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = curve(out)
    assert len({loss for *_, loss in ref}) == len(ref) == 4  # train 2, 4, 6 and the eval: moving
    return ref


def interrupted(digits, out, nproc, zero):
    """A run stopped by a real SIGTERM after step STOP, checkpointed there."""
    proc = train(digits, out, nproc, zero, faults=f"sigterm@{STOP}")
    assert proc.returncode in (results.EXIT_PREEMPTED, 1), proc.stderr[-3000:]  # torchrun: 1
    assert [s for s, _ in engine.complete_checkpoints(out / "checkpoints")] == [STOP]
    assert engine.saved_world_size(out / "checkpoints", f"step{STOP:08d}") == nproc


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("zero, before, after", [(0, 2, 1), (1, 2, 1), (2, 2, 1), (3, 2, 1),
                                                 (3, 1, 2)])
def test_resume_on_another_world_size_continues_the_curve(digits, reference, tmp_path, zero,
                                                          before, after):
    out = tmp_path / "run"
    interrupted(digits, out, before, zero)
    proc = train(digits, out, after, zero)
    assert proc.returncode == 0, proc.stderr[-3000:]
    how = "universal checkpoint" if zero else "ZeRO 0"
    assert (f"resuming step {STOP} saved at world size {before} on world size {after} ({how}"
            in proc.stderr)
    assert_same_curve(curve(out), reference)
    # ZeRO 1-3 went through a universal conversion, kept beside the checkpoint it came from
    tag = out / "checkpoints" / f"step{STOP:08d}"
    assert (tag / engine.UNIVERSAL / "zero" / "optimizer_state.pt").is_file() == (zero > 0)
    final = results.read_final(out)
    assert final["status"] == "ok" and final["world_size"] == after
    segments = final["segments"]
    assert [(s["world_size"], s["start_step"], s["end_step"]) for s in segments] == [
        (before, 0, STOP), (after, STOP, 6)]
    assert final["device_hours"] == pytest.approx(sum(s["device_hours"] for s in segments))
    assert segments[1]["device_hours"] > 0


@pytest.mark.multiproc
@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_converted_is_refused_in_one_line(digits, tmp_path):
    """A ZeRO-2 checkpoint missing a rank's optimizer partition loads at no world size but its
    own; at another, the run stops with one line naming the stage and the reason, exit 2, before
    it touches the metrics or writes a final.json (a rerun on 2 ranks still resumes)."""
    out = tmp_path / "run"
    interrupted(digits, out, 2, 2)
    tag = out / "checkpoints" / f"step{STOP:08d}"
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"")
    before = (out / results.METRICS_FILE).read_text()
    proc = train(digits, out, 1, 2)
    assert proc.returncode == results.EXIT_BAD_INPUT, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "ZeRO 2, saved at world size 2) on world size 1" in errors[0]
    assert "ds_to_universal" in errors[0] and "rerun on 2 ranks" in errors[0]
    assert not (out / results.FINAL_FILE).exists()
    assert (out / results.METRICS_FILE).read_text() == before
    assert not (tag / engine.UNIVERSAL).exists()


def test_segments_of_a_checkpoint_from_before_they_were_saved(tmp_path):
    """A checkpoint without `segments` in its client state is one segment from step 0 at the
    world size its COMPLETE marker (or, older, its RNG files) says."""
    from scaling.segments import Segments

    tag = tmp_path / "step00000040"
    tag.mkdir()
    (tag / engine.COMPLETE).write_text(json.dumps({"step": 40}) + "\n")
    for rank in range(4):
        (tag / f"rng_rank{rank:05d}.pt").write_bytes(b"")
    assert engine.saved_world_size(tmp_path, tag.name) == 4
    client = {"step": 40, "meter": {"wall": 7200.0, "op_build": 0.0}}
    seg = Segments.resume(client, 4, 2)
    shutil.rmtree(tag)
    parts = seg.upto(50, 7200.0 + 1800.0, 0.0)
    assert [(s["world_size"], s["start_step"], s["end_step"]) for s in parts] == [
        (4, 0, 40), (2, 40, 50)]
    assert [s["device_hours"] for s in parts] == pytest.approx([8.0, 1.0])


@pytest.mark.multiproc
@pytest.mark.slow
def test_the_sweep_continues_a_partly_done_run_on_another_gpus(digits_data, tmp_path, capsys,
                                                                monkeypatch):
    """A run's id is its recipe, not its world size: a rerun with another --gpus continues the
    partly done run in its own dir, and final.json records a segment per world size. The
    removed --allow-world-size-change is one line and exit 2."""
    from launchers.sweep import main

    args = ["--preset", "demo", "--sizes", "mu", "--budget-kind", "steps", "--budgets", "8",
            "--set", "log_every=4", "--cluster", "local", "--data", digits_data, "--results",
            str(tmp_path)]
    monkeypatch.setenv("VIT_SCALING_FAULTS", f"sigterm@{STOP}")  # the train CLI's faults
    main([*args, "--gpus", "2"])  # the run checkpoints at step 3 and exits 75
    monkeypatch.delenv("VIT_SCALING_FAULTS")
    (run,) = (tmp_path / "demo").glob("mu4_8st_*")
    assert [s for s, _ in engine.complete_checkpoints(run / "checkpoints")] == [STOP]
    capsys.readouterr()
    assert main([*args, "--gpus", "1", "--allow-world-size-change"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--allow-world-size-change is gone" in err[0], err
    assert main([*args, "--gpus", "1"]) == 0, capsys.readouterr()
    final = results.read_final(run)
    assert final["status"] == "ok" and final["steps"] == 8 and final["world_size"] == 1
    assert [(s["world_size"], s["start_step"], s["end_step"]) for s in final["segments"]] == [
        (2, 0, STOP), (1, STOP, 8)]
    assert [d.name for d in (tmp_path / "demo").glob("mu4_8st_*")] == [run.name]

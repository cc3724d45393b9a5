"""The stop flag is checked every stop_poll_every steps (and at eval / checkpoint steps), and a
signal between two checks still checkpoints and resumes exactly; step timing (scaling.loop)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import train_env

from scaling import results
from scaling.config import TrainConfig
from scaling.data import make_builtin_shards
from scaling.loop import GPU_STOP_POLL, is_stop_boundary, stop_poll_every
from scaling.meter import Meter, StepClock

FAST = ["--model", "mu/4", "--image-size", "8", "--batch-size", "32", "--num-workers", "0",
        "--no-progress", "--steps", "24", "--log-every", "3", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return str(make_builtin_shards("digits", tmp_path_factory.mktemp("data") / "digits").root)


def train(data, out, *extra, faults=None):
    cmd = [sys.executable, "-m", "scaling.train", *FAST, "--data", data, "--out", str(out),
           *extra]
    return subprocess.run(cmd, env=train_env(faults), capture_output=True, text=True,
                          timeout=600, check=False)


def checkpoints(out):
    return sorted(p.name for p in (out / results.CHECKPOINT_DIR).iterdir() if p.is_dir())


def comparable(out):
    """Every logged figure except timings."""
    timing = set(results.TIMING_KEYS)
    return [{k: v for k, v in r.items() if k not in timing} for r in results.read_metrics(out)]


def _cfg(**kw):
    return TrainConfig(model="mu/4", data="d", out="o", steps=10, **kw)


def test_poll_interval_defaults_to_every_step_on_a_cpu_only():
    assert stop_poll_every(_cfg(), torch.device("cpu")) == 1
    assert stop_poll_every(_cfg(), torch.device("cuda")) == GPU_STOP_POLL == 10
    assert stop_poll_every(_cfg(stop_poll_every=4), torch.device("cuda")) == 4
    with pytest.raises(ValueError, match="stop_poll_every=-1"):
        _cfg(stop_poll_every=-1)
    assert TrainConfig.from_args(_cfg(stop_poll_every=4).to_args()).stop_poll_every == 4


def test_stop_boundaries_are_multiples_evals_checkpoints_and_the_end():
    hits = [s for s in range(1, 31) if is_stop_boundary(s, 4, {6, 25}, 7, 30)]
    assert hits == [4, 6, 7, 8, 12, 14, 16, 20, 21, 24, 25, 28, 30]
    assert [s for s in range(1, 6) if is_stop_boundary(s, 1, set(), 0, 5)] == [1, 2, 3, 4, 5]


def test_cpu_step_clock_and_meter_count_wall_time():
    meter = Meter()
    meter.use_device(torch.device("cpu"))
    assert not meter.clock.cuda
    meter.start_step()
    sum(range(200_000))
    meter.end_step(skipped=2)
    assert meter.compute_s > 0 and meter.skipped == 2
    assert StepClock().drain() == 0.0  # nothing pending off a GPU
    assert meter.state()["compute"] == meter.compute_s


@pytest.mark.parametrize("extra, stopped_at", [
    ([], 8),  # the next multiple of 4 after the signal at step 5
    (["--eval-every", "6"], 6),  # an eval step comes first: saved before evaluating it
    (["--ckpt-every", "7"], 7),  # a checkpoint step comes first
])
def test_sigterm_between_checks_saves_at_the_next_boundary(digits, tmp_path, extra, stopped_at):
    out = tmp_path / "run"
    first = train(digits, out, "--stop-poll-every", "4", *extra, faults="sigterm@5")
    assert first.returncode == results.EXIT_PREEMPTED, first.stderr[-3000:]
    assert checkpoints(out) == [f"step{stopped_at:08d}"]
    assert not (out / results.FINAL_FILE).exists()
    assert max(r["step"] for r in results.read_metrics(out)) <= stopped_at


def test_resume_after_a_polled_stop_equals_an_uninterrupted_run(digits, tmp_path):
    args = ("--eval-every", "10", "--drop-path", "0.1", "--mixup-alpha", "0.2")
    ref = train(digits, tmp_path / "ref", *args)  # polls every step (the CPU default)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "run"
    first = train(digits, out, *args, "--stop-poll-every", "4", faults="sigterm@13")
    assert first.returncode == results.EXIT_PREEMPTED, first.stderr[-3000:]
    assert checkpoints(out) == ["step00000016"]
    resumed = train(digits, out, *args)  # stop_poll_every may change on a resume
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step00000016" in resumed.stderr
    assert comparable(out) == comparable(tmp_path / "ref")
    a, b = results.read_final(out), results.read_final(tmp_path / "ref")
    keys = ("status", "steps", "final_top1", "final_loss", "total_flops")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}

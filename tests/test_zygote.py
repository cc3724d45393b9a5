"""launchers.zygote: the fork server that local sweeps start their ranks from."""

from __future__ import annotations

import os
import signal
import time

import pytest

from launchers.zygote import ForkServer
from scaling.results import EXIT_BAD_INPUT, EXIT_OK, EXIT_PREEMPTED, read_final, read_metrics


def _wait(proc, timeout=180):
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < deadline, "child did not end"
        time.sleep(0.05)
    return proc.poll()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ForkServer(tmp_path_factory.mktemp("fork") / "fork_server.log")
    yield s
    s.close()


def _argv(data, out, steps):
    return ["--model", "mu/4", "--data", data, "--out", str(out), "--steps", str(steps),
            "--batch-size", "16", "--num-workers", "0", "--log-every", "5", "--no-progress"]


def test_child_trains_like_the_command_and_reports_its_exit_code(server, digits_data,
                                                                   tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = tmp_path / "rank0.log"
    proc = server.spawn(_argv(digits_data, tmp_path / "run", 20), env=env, cwd=str(tmp_path),
                        log=str(log))
    assert proc.pid != os.getpid() and _wait(proc) == EXIT_OK
    final = read_final(tmp_path / "run")
    assert final["status"] == "ok" and final["steps"] == 20
    assert "eval step=20" in log.read_text()  # the child's logging went to its log file
    # bad input: the CLI's exit code 2 and its message, through the server
    bad = server.spawn(["--model", "X/4", *_argv(digits_data, tmp_path / "bad", 5)[2:]],
                       env=env, cwd=str(tmp_path), log=str(tmp_path / "bad.log"))
    assert _wait(bad) == EXIT_BAD_INPUT
    assert "unknown ViT name 'X'" in (tmp_path / "bad.log").read_text()


def test_child_checkpoints_on_sigterm_and_dies_on_sigkill(server, digits_data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2")  # a thread pool made after the fork
    out = tmp_path / "run"
    proc = server.spawn(_argv(digits_data, out, 100000), env=env, cwd=str(tmp_path),
                        log=str(tmp_path / "a.log"))
    deadline = time.monotonic() + 120
    while not any(r["kind"] == "train" for r in read_metrics(out)):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # the train CLI's handler: checkpoint, exit 75
    assert _wait(proc) == EXIT_PREEMPTED
    assert any((out / "checkpoints").glob("step*/COMPLETE"))
    killed = server.spawn(_argv(digits_data, tmp_path / "k", 100000), env=env,
                          cwd=str(tmp_path), log=str(tmp_path / "k.log"))
    time.sleep(1.0)
    killed.send_signal(signal.SIGKILL)
    assert _wait(killed) == -signal.SIGKILL  # as subprocess.Popen.returncode

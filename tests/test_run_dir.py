"""The run directory's rules (scaling/results.py), through the real train CLI and real faults:
restarts never count a row twice, a torn line is repaired, one process owns a run dir, a full
disk or a corrupt file stops with one clear line and keeps what was complete."""

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import train_env

from scaling import engine, lockfile, results
from scaling.data import make_builtin_shards
from scaling.train import main as train_main

FAST = ["--model", "mu/4", "--image-size", "8", "--batch-size", "32", "--num-workers", "0",
        "--no-progress"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return str(make_builtin_shards("digits", tmp_path_factory.mktemp("data") / "digits").root)


def _cmd(data, out, *extra):
    return [sys.executable, "-m", "scaling.train", *FAST, "--data", data, "--out", str(out),
            *extra]


def train(data, out, *extra, faults=None):
    return subprocess.run(_cmd(data, out, *extra), env=train_env(faults), capture_output=True,
                          text=True, timeout=600, check=False)


def start(data, out, *extra):
    return subprocess.Popen(_cmd(data, out, *extra), env=train_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_rows(out, n, proc, timeout=120):
    """Wait until metrics.jsonl has n lines (the process still running)."""
    path, t0 = out / results.METRICS_FILE, time.time()
    while not (path.exists() and path.read_text().count("\n") >= n):
        assert proc.poll() is None, f"exited {proc.returncode} early: {proc.stderr.read()}"
        assert time.time() - t0 < timeout, "no metrics rows in time"
        time.sleep(0.05)


def keys(out):
    """(kind, step) of every metrics row; every line must be valid JSON."""
    lines = (out / results.METRICS_FILE).read_text().splitlines()
    return [(json.loads(line)["kind"], json.loads(line)["step"]) for line in lines]


def assert_each_once(out, train_steps, eval_steps):
    found = keys(out)
    twice = [k for k, n in collections.Counter(found).items() if n > 1]
    assert not twice, f"rows counted twice: {twice}"
    assert [s for k, s in found if k == "train"] == list(train_steps)
    assert [s for k, s in found if k == "eval"] == list(eval_steps)


def test_kill9_before_any_checkpoint_and_torn_line_then_restart(digits, tmp_path):
    out = tmp_path / "run"
    args = ("--steps", "1500", "--log-every", "50", "--eval-every", "500")
    proc = start(digits, out, *args)
    wait_rows(out, 15, proc)
    proc.kill()
    proc.wait()
    assert not (out / results.CHECKPOINT_DIR).exists() or not os.listdir(
        out / results.CHECKPOINT_DIR)
    with open(out / results.METRICS_FILE, "a") as f:
        f.write('{"kind": "train", "st')  # a kill in the middle of an append
    run = train(digits, out, *args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "starting over" in run.stderr
    assert_each_once(out, range(50, 1501, 50), [500, 1000, 1500])


def test_kill_inside_first_checkpoint_save_then_restart(digits, tmp_path):
    out = tmp_path / "run"
    args = ("--steps", "200", "--log-every", "10", "--eval-every", "50", "--ckpt-every", "100")
    first = train(digits, out, *args, faults="kill_in_save@100")
    assert first.returncode == -signal.SIGKILL
    assert ("train", 100) in keys(out)
    run = train(digits, out, *args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_each_once(out, range(10, 201, 10), [50, 100, 150, 200])


def test_final_eval_failure_keeps_a_checkpoint_and_the_rerun_counts_it_once(digits, tmp_path):
    out = tmp_path / "run"
    args = ("--steps", "60", "--log-every", "10", "--eval-every", "30")
    first = train(digits, out, *args, faults="eval_error@60")
    assert first.returncode == results.EXIT_FAILED
    assert results.read_final(out)["status"] == "failed"
    assert (out / results.CHECKPOINT_DIR / "step00000060" / "COMPLETE").is_file()
    run = train(digits, out, *args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed from step00000060" in run.stderr
    assert results.read_final(out)["status"] == "ok"
    assert len(list(out.glob("final.failed.*.json"))) == 1  # the failed attempt's outcome kept
    assert_each_once(out, range(10, 61, 10), [30, 60])


def test_second_run_on_one_dir_is_refused_and_a_dead_holders_lock_is_not(digits, tmp_path):
    out = tmp_path / "run"
    args = ("--steps", "1000000", "--log-every", "50")
    first = start(digits, out, *args)
    wait_rows(out, 2, first)
    second = train(digits, out, *args)
    assert second.returncode == results.EXIT_BAD_INPUT
    error = second.stderr.strip().splitlines()[-1]
    assert error.startswith("error: run dir") and f"in use by PID {first.pid} on " in error
    assert "Traceback" not in second.stderr
    first.send_signal(signal.SIGTERM)  # checkpoints, exits 75, gives the lock back
    assert first.wait(timeout=120) == results.EXIT_PREEMPTED
    assert not (out / results.LOCK_FILE).exists()
    third = start(digits, out, *args)
    wait_rows(out, (out / results.METRICS_FILE).read_text().count("\n") + 2, third)
    third.kill()  # kill -9 leaves its lock behind; its pid is dead, so it is stale
    third.wait()
    assert (out / results.LOCK_FILE).exists()
    fourth = start(digits, out, *args)  # the stale lock does not stop it
    wait_rows(out, (out / results.METRICS_FILE).read_text().count("\n") + 2, fourth)
    fourth.send_signal(signal.SIGTERM)
    assert fourth.wait(timeout=120) == results.EXIT_PREEMPTED


def _holder(tmp_path, **fields):
    holder = {"host": "node-elsewhere", "pid": 1, "pid_start": 1, "slurm_job": None,
              "slurm_restart": "0", "since": "earlier", "token": "theirs", **fields}
    (tmp_path / results.LOCK_FILE).write_text(json.dumps(holder))
    return tmp_path / results.LOCK_FILE


def test_lock_staleness_rules(tmp_path, monkeypatch):
    path = _holder(tmp_path)  # another host, touched just now: alive
    with pytest.raises(results.RunDirInUse, match="in use by PID 1 on node-elsewhere"):
        results.RunLock(tmp_path).acquire()
    old = time.time() - lockfile.STALE_AFTER_S - 5
    os.utime(path, (old, old))  # no heartbeat for longer than STALE_AFTER_S: dead
    lock = results.RunLock(tmp_path).acquire()
    assert json.loads(path.read_text())["token"] == lock.me["token"]
    lock.release()
    assert not path.exists()
    # An earlier incarnation of this SLURM job (requeued: same id, next restart count) is dead
    # even on another host and freshly touched; the same incarnation is not.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _holder(tmp_path, slurm_job="4242", slurm_restart="0")
    results.RunLock(tmp_path).acquire().release()
    _holder(tmp_path, slurm_job="4242", slurm_restart="1")
    with pytest.raises(results.RunDirInUse):
        results.RunLock(tmp_path).acquire()


def test_lock_of_a_live_local_process_and_a_reused_pid(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        me = results.RunLock(tmp_path).me
        _holder(tmp_path, host=me["host"], pid=sleeper.pid,
                pid_start=lockfile.pid_start(sleeper.pid))
        with pytest.raises(results.RunDirInUse, match=f"PID {sleeper.pid}"):
            results.RunLock(tmp_path).acquire()
        # the same pid with another start time is a reused pid: its holder is gone
        _holder(tmp_path, host=me["host"], pid=sleeper.pid, pid_start=1)
        results.RunLock(tmp_path).acquire().release()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lock_heartbeat_notices_a_takeover_and_release_leaves_it(tmp_path, monkeypatch):
    monkeypatch.setattr(lockfile, "HEARTBEAT_S", 0.05)
    lock = results.RunLock(tmp_path).acquire()
    path = _holder(tmp_path)  # someone else took it over (it looked stale to them)
    t0 = time.time()
    while not lock.lost and time.time() - t0 < 5:
        time.sleep(0.05)
    assert lock.lost
    lock.release()
    assert json.loads(path.read_text())["token"] == "theirs"  # not ours to remove


@pytest.mark.parametrize("flags, message", [
    (["--lr", "inf"], "--lr inf: must be a finite number"),
    (["--beta1", "1.5"], "--beta1 1.5: must be in [0, 1)"),
    (["--label-smoothing", "2"], "--label-smoothing 2.0: must be in [0, 1)"),
    (["--warmup-fraction", "nan"], "--warmup-fraction nan: must be a finite number"),
    (["--min-lr", "1"], "--min-lr 1.0 is above the peak --lr"),
])
def test_bad_float_values_fail_before_training(digits, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    code = train_main([*FAST, "--data", digits, "--out", str(out), "--steps", "5", *flags])
    assert code == results.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_dataset_without_val_split_is_refused_up_front(digits, tmp_path, capsys):
    data = tmp_path / "noval"
    shutil.copytree(digits, data)
    info = json.loads((data / "dataset.json").read_text())
    del info["splits"]["val"]
    (data / "dataset.json").write_text(json.dumps(info))
    code = train_main([*FAST, "--data", str(data), "--out", str(tmp_path / "r"), "--steps", "5"])
    assert code == results.EXIT_BAD_INPUT
    assert "has no val split" in capsys.readouterr().err


def test_out_that_is_a_file_is_refused(digits, tmp_path, capsys):
    out = tmp_path / "a-file"
    out.write_text("x")
    code = train_main([*FAST, "--data", digits, "--out", str(out), "--steps", "5"])
    assert code == results.EXIT_BAD_INPUT
    assert "exists and is not a directory" in capsys.readouterr().err


@pytest.mark.mount
def test_read_only_out_is_refused(digits, tmpfs, capsys):
    out = tmpfs("64k", "ro") / "run"
    code = train_main([*FAST, "--data", digits, "--out", str(out), "--steps", "5"])
    assert code == results.EXIT_BAD_INPUT
    assert "is not writable (Read-only file system)" in capsys.readouterr().err


@pytest.mark.mount
def test_disk_full_in_checkpoint_keeps_the_last_complete_one(digits, tmpfs):
    # A mu/4 checkpoint is ~224 kB: the one of step 20 fits in 320 kB, the one of step 40 not.
    disk = tmpfs("320k")
    out = disk / "run"
    args = ("--steps", "60", "--ckpt-every", "20", "--log-every", "10")
    run = train(digits, out, *args)
    assert run.returncode == results.EXIT_FAILED
    assert "Traceback" not in run.stderr
    (error,) = [line for line in run.stderr.splitlines() if " ERROR " in line]
    assert "no space left on device (ENOSPC)" in error and str(out / "checkpoints") in error
    assert "step00000020 kept" in error
    assert [tag for _, tag in engine.complete_checkpoints(out / "checkpoints")] == [
        "step00000020"]
    assert results.read_final(out)["status"] == "failed"
    subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
    again = train(digits, out, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step00000020" in again.stderr
    assert_each_once(out, range(10, 61, 10), [60])


@pytest.mark.mount
def test_disk_full_in_metrics_append_names_the_file(tmpfs):
    disk = tmpfs("64k")
    with pytest.raises(OSError), open(disk / "filler", "wb") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    row = {"kind": "eval", "step": 1, "epoch": 0.1, "images_seen": 8, "flops_seen": 1.0,
           "wall_s": 1.0, "loss": 1.0, "top1": 0.5, "top5": 1.0, "num_samples": 9,
           "padding": "x" * 8192}
    with pytest.raises(OSError, match=rf"no space left on device \(ENOSPC\) appending to {disk}"):
        results.append_metrics(disk, row)


@pytest.mark.parametrize("damage", ["final", "metrics"])
def test_corrupt_results_file_stops_with_one_line_and_is_not_touched(digits, tmp_path, capsys,
                                                                       damage):
    out = tmp_path / "run"
    args = ["--steps", "20", "--log-every", "5"]
    assert train(digits, out, *args).returncode == 0
    if damage == "final":
        (out / results.FINAL_FILE).write_text("{not json")
    else:
        lines = (out / results.METRICS_FILE).read_text().splitlines(keepends=True)
        lines[1] = '{"kind": "train", "step": 10, "lo\n'
        (out / results.METRICS_FILE).write_text("".join(lines))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert train_main([*FAST, "--data", digits, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    name = results.FINAL_FILE if damage == "final" else results.METRICS_FILE + ":2"
    assert len(err) == 1 and err[0].startswith("error: ") and name in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def _row(kind, step):
    return {"kind": kind, "step": step, "epoch": 0.0, "images_seen": step, "flops_seen": 1.0,
            "wall_s": 0.0, "loss": 1.0, "lr": 0.1, "images_per_s": 1.0, "tflops": 0.0,
            "mfu": None, "mem_gb": 0.0, "skipped_samples": 0, "top1": 0.5, "top5": 1.0,
            "num_samples": 10}


def test_truncate_keeps_rows_saved_with_the_checkpoint_and_repairs_a_torn_line(tmp_path):
    for kind, step in [("train", 10), ("eval", 10), ("train", 20), ("eval", 20)]:
        results.append_metrics(tmp_path, _row(kind, step))
    with open(tmp_path / results.METRICS_FILE, "a") as f:
        f.write('{"kind": "tr')
    # checkpoint of step 20 saved after 3 rows: the eval row of step 20 came after the save
    assert results.truncate_metrics(tmp_path, 20, rows=3) == 1
    assert keys(tmp_path) == [("train", 10), ("eval", 10), ("train", 20)]
    assert results.truncate_metrics(tmp_path, 0) == 3
    assert (tmp_path / results.METRICS_FILE).read_text() == ""


def test_config_check_counts_a_missing_old_field_as_its_default(tmp_path):
    old = {"model": "mu/4", "lr": 0.1}
    results.write_json(tmp_path / results.CONFIG_FILE, old)
    defaults = {"model": None, "lr": 1e-3, "seed": 0}
    results.check_config(tmp_path, {**old, "seed": 0}, resumable=(), defaults=defaults)
    with pytest.raises(ValueError, match=r"seed: 0 -> 3"):
        results.check_config(tmp_path, {**old, "seed": 3}, resumable=(), defaults=defaults)
    results.check_config(tmp_path, {**old, "lr": 0.2}, resumable=("lr",), defaults=defaults)


def test_set_aside_final_keeps_every_outcome(tmp_path):
    assert results.set_aside_final(tmp_path) is None
    results.write_json(tmp_path / results.FINAL_FILE, {"status": "diverged"})
    kept = results.set_aside_final(tmp_path)
    assert kept.name.startswith("final.diverged.") and kept.name.endswith(f".{os.getpid()}.json")
    assert not (tmp_path / results.FINAL_FILE).exists()


def test_stop_signal_at_an_eval_step_loses_no_eval(digits, tmp_path):
    out = tmp_path / "run"
    args = ("--steps", "60", "--log-every", "10", "--eval-every", "30")
    first = train(digits, out, *args, faults="sigterm@30")  # saved before evaluating step 30
    assert first.returncode == results.EXIT_PREEMPTED
    assert ("eval", 30) not in keys(out)
    run = train(digits, out, *args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_each_once(out, range(10, 61, 10), [30, 60])


@pytest.mark.multiproc
def test_two_rank_run_on_a_locked_dir_stops_on_every_rank(digits, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        me = results.RunLock(out).me
        _holder(out, host=me["host"], pid=sleeper.pid, pid_start=lockfile.pid_start(sleeper.pid))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "scaling.train", *FAST, "--data", digits,
               "--out", str(out), "--steps", "5"]
        run = subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=300,
                             check=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert run.returncode != 0
    assert run.stderr.count(f"in use by PID {sleeper.pid}") == 1  # rank 0 names the holder
    assert "rank 0 could not take the run dir's lock" in run.stderr  # rank 1 stops too
    assert sorted(p.name for p in out.iterdir()) == [results.LOCK_FILE]  # nothing written


def test_data_corrupted_in_place_with_size_and_mtime_kept_is_refused(digits, tmp_path, capsys):
    data = tmp_path / "digits"
    shutil.copytree(digits, data)
    shard = data / "train-000001.tar"
    stat = shard.stat()
    with open(shard, "r+b") as f:  # garbage over a tar header in the middle, size unchanged
        f.seek(stat.st_size // 2 // 512 * 512)
        f.write(b"\xde\xad" * 256)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    code = train_main([*FAST, "--data", str(data), "--out", str(tmp_path / "r"), "--steps", "5"])
    assert code == results.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "train-000001.tar" in err and "sha256" in err
    assert not (tmp_path / "r" / results.METRICS_FILE).exists()


def test_a_run_whose_lock_was_taken_over_stops_without_writing(digits, tmp_path):
    out = tmp_path / "run"
    proc = start(digits, out, "--steps", "1000000", "--log-every", "50")
    wait_rows(out, 2, proc)
    _holder(out, host="node-elsewhere", pid=7, token="theirs")  # judged us dead, took over
    code = proc.wait(timeout=lockfile.HEARTBEAT_S * 3)  # noticed at the next heartbeat
    assert code == results.EXIT_BAD_INPUT
    assert "another process took over the lock" in proc.stderr.read()
    assert json.loads((out / results.LOCK_FILE).read_text())["token"] == "theirs"
    assert not (out / results.FINAL_FILE).exists()

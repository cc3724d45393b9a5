"""Live tracking (scaling/tracking.py) and checkpoint cost, through the real train CLI: the
TensorBoard event files hold metrics.jsonl's values at its steps, also across a kill and a
restart; checkpoints by wall time happen at log steps and resume; final.json counts their cost."""

import json
import signal
import struct
import subprocess
import sys
import zlib

import pytest
from conftest import train_env
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from scaling import results, tracking
from scaling.config import TrainConfig
from scaling.train import main as train_main

FAST = ["--model", "mu/4", "--image-size", "8", "--batch-size", "32", "--num-workers", "0",
        "--no-progress"]


def train(data, out, *extra, faults=None):
    cmd = [sys.executable, "-m", "scaling.train", *FAST, "--data", data, "--out", str(out),
           *extra]
    return subprocess.run(cmd, env=train_env(faults), capture_output=True, text=True,
                          timeout=600, check=False)


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard's loader reads RUN_DIR/tb (restart purges and
    out-of-order steps applied)."""
    acc = EventAccumulator(str(run_dir / tracking.TB_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(run_dir) -> dict[str, list[tuple[int, float]]]:
    """The same tags from metrics.jsonl."""
    want: dict[str, list] = {}
    for row in results.read_metrics(run_dir):
        tags = tracking.TRAIN_TAGS if row["kind"] == "train" else tracking.EVAL_TAGS
        for t in tags:
            if row.get(t) is not None:
                want.setdefault(f"{row['kind']}/{t}", []).append((row["step"], row[t]))
    return want


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_event_files_equal_metrics_across_a_kill_and_a_restart(digits_data, tmp_path):
    out = tmp_path / "run"
    args = ("--steps", "60", "--log-every", "5", "--eval-every", "20", "--ckpt-every", "20")
    first = train(digits_data, out, *args, faults="kill_in_save@40")  # step 20's is complete
    assert first.returncode == -signal.SIGKILL
    lost = scalars(out)
    assert max(s for s, _ in lost["train/loss"]) == 40  # the lost attempt's rows 25..40
    run = train(digits_data, out, *args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed from step00000020" in run.stderr
    assert len(list((out / tracking.TB_DIR).glob("events.out.tfevents.*"))) == 2  # a segment each
    got, want = scalars(out), expected(out)
    assert [s for s, _ in want["train/loss"]] == list(range(5, 61, 5))
    assert [s for s, _ in want["eval/top1"]] == [20, 40, 60]
    assert_same(got, want)
    final = results.read_final(out)
    ckpts = sorted((out / results.CHECKPOINT_DIR).glob("step*/COMPLETE"))
    assert final["checkpoints"] == 3  # steps 20 (first attempt), 40 (again) and 60
    assert 0 < final["checkpoint_s_max"] <= final["checkpoint_s_sum"]
    assert final["checkpoint_bytes"] == tracking.dir_bytes(ckpts[-1].parent)
    assert final["checkpoint_bytes"] > 1000


def wandb_records(path):
    """The protobuf records of a W&B transaction log (run-ID.wandb): wandb's own Record messages
    in LevelDB's log format (32 KiB blocks of 7-byte-headed chunks) behind a 7-byte W&B header.
    wandb 0.31 ships no Python reader of it (its datastore module is gone); a torn tail (a
    killed process) ends the list."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, parts = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header: padding
            pos += block - pos % block
            continue
        crc, size, kind = struct.unpack("<IHB", data[pos:pos + 7])
        body = data[pos + 7:pos + 7 + size]
        if kind == 0 or len(body) < size or zlib.crc32(bytes([kind]) + body) != crc:
            break  # zero padding, or a chunk cut short by the kill
        pos += 7 + size
        parts = body if kind in (1, 2) else parts + body  # FULL/FIRST start, MIDDLE/LAST add
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def wandb_history(path) -> tuple[dict, dict[str, list[tuple[int, float]]]]:
    """(run record's branch point as {run, step}, {tag: [(step, value)]}) of one offline file."""
    branch, got = {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run" and record.run.HasField("branch_point"):
            branch = {"run": record.run.branch_point.run,
                      "step": int(record.run.branch_point.value)}
        elif kind == "history":
            for item in record.history.item:
                tag = "/".join(item.nested_key) or item.key
                if not tag.startswith("_"):
                    got.setdefault(tag, []).append((record.history.step.num,
                                                    json.loads(item.value_json)))
    return branch, got


def test_wandb_offline_files_equal_metrics_across_a_kill_and_a_restart(digits_data, tmp_path):
    pytest.importorskip("wandb")  # in the test extra (pyproject.toml)
    out = tmp_path / "run"
    args = [*FAST, "--data", digits_data, "--out", str(out), "--steps", "60", "--log-every",
            "5", "--eval-every", "20", "--ckpt-every", "20", "--no-tensorboard", "--wandb",
            "vit-scaling-test"]
    wandb_env = dict(WANDB_MODE="offline", WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
                     WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
                     WANDB_DATA_DIR=str(tmp_path / "wandb-data"))  # nothing leaves tmp_path
    runs = [subprocess.run([sys.executable, "-m", "scaling.train", *args],
                           env=dict(train_env(faults), **wandb_env), capture_output=True,
                           text=True, timeout=600, check=False)
            for faults in ("kill_in_save@40", None)]  # step 20's checkpoint is complete
    assert runs[0].returncode == -signal.SIGKILL, runs[0].stderr[-3000:]
    assert runs[1].returncode == 0, runs[1].stderr[-3000:]
    assert "resumed from step00000020" in runs[1].stderr
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))  # by start time
    assert len(files) == 2 and files[0].name == files[1].name  # one W&B run, two segments
    (first_branch, _), (branch, got) = map(wandb_history, files)
    # The killed process's file may hold nothing (wandb writes it every 15 s; seen: its header
    # only), so the restart rewinds the W&B run to its start and logs every kept row again:
    # what W&B holds after `wandb sync` is the restart's file alone.
    assert first_branch == {}
    assert branch == {"run": files[0].stem[len("run-"):], "step": 0}  # the rewind
    want = expected(out)
    assert [s for s, _ in want["train/loss"]] == list(range(5, 61, 5))
    assert [s for s, _ in want["eval/top1"]] == [20, 40, 60]
    assert_same(got, want)


def test_checkpoints_by_wall_time_at_log_steps_then_resume(digits_data, tmp_path):
    out = tmp_path / "run"
    args = ("--steps", "240", "--log-every", "4", "--eval-every", "120", "--ckpt-every",
            "0.001m", "--keep-ckpts", "100", "--no-tensorboard")  # every 60 ms at the most
    first = train(digits_data, out, *args, faults="sigterm@150")
    assert first.returncode == results.EXIT_PREEMPTED, first.stderr[-3000:]
    steps = [int(p.parent.name[4:]) for p in (out / results.CHECKPOINT_DIR).glob("step*/COMPLETE")]
    timed = sorted(s for s in steps if s != 150)  # 150: the save on the signal
    assert len(timed) >= 2 and all(s % 4 == 0 for s in timed), steps
    run = train(digits_data, out, *args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed from step00000150" in run.stderr
    rows = [(r["kind"], r["step"]) for r in results.read_metrics(out)]
    assert rows == sorted(set(rows), key=rows.index)  # nothing twice
    assert [s for k, s in rows if k == "train"] == list(range(4, 241, 4))
    final = results.read_final(out)
    assert final["status"] == "ok" and final["checkpoints"] >= len(timed) + 2
    assert not (out / tracking.TB_DIR).exists()


@pytest.mark.parametrize("flags, message", [
    (["--ckpt-every", "5x"], "--ckpt-every '5x': expected steps (e.g. 500) or minutes"),
    (["--ckpt-every=-3m"], "--ckpt-every '-3m': expected steps"),
    (["--ckpt-every", "1.5"], "--ckpt-every '1.5': expected steps"),
    (["--wandb", "proj"], "--wandb proj needs the wandb package"),
])
def test_bad_tracking_and_checkpoint_flags_fail_before_training(digits_data, tmp_path, capsys,
                                                                monkeypatch, flags, message):
    if flags[0] == "--wandb":  # installed with the test extra: make it missing, as Python does
        monkeypatch.setitem(sys.modules, "wandb", None)  # (an import of it then fails)
    out = tmp_path / "run"
    code = train_main([*FAST, "--data", digits_data, "--out", str(out), "--steps", "5", *flags])
    assert code == results.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_fewshot_rows_are_logged_as_the_mean_over_draws(tmp_path):
    cfg = TrainConfig(model="mu/4", data="d", out=str(tmp_path), steps=1, fewshot_seeds=3)
    tracker = tracking.Tracker.open(cfg, tmp_path, 0)
    for step, tops in ((10, (0.2, 0.4, 0.6)), (20, (0.5, 0.7, 0.9))):
        for seed, top1 in enumerate(tops):
            tracker.log({"kind": "fewshot", "dataset": "pets", "shots": 5, "seed": seed,
                         "top1": top1, "step": step})
    tracker.log({"kind": "fewshot", "dataset": "pets", "shots": 10, "seed": 0, "top1": 0.3,
                 "step": 20})  # cut short: logged on close
    tracker.close()
    got = scalars(tmp_path)
    assert [s for s, _ in got["fewshot/pets/5shot"]] == [10, 20]
    assert [v for _, v in got["fewshot/pets/5shot"]] == pytest.approx([0.4, 0.7])
    assert got["fewshot/pets/10shot"] == [(20, pytest.approx(0.3))]


def test_config_json_keeps_the_tracking_fields_out_of_the_recipe():
    cfg = TrainConfig.from_args(["--model", "mu/4", "--data", "d", "--out", "o", "--steps", "1",
                                 "--no-tensorboard", "--ckpt-every", "30m"])
    args = cfg.to_args()
    assert "--no-tensorboard" in args and args[args.index("--ckpt-every") + 1] == "30m"
    assert json.loads(json.dumps(cfg.to_dict()))["ckpt_every"] == "30m"

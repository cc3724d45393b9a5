"""Issue 27, "Clear errors", the data path: each bad input through the real CLI gives one line
and exit 2 before work, or the right behaviour. Probe ids in the test names: T04b (old
dataset.json without label ranges), N29d/N29e (wrong --label-key / --image-key), N30f/N30g/N31f
(failing pipe: and http shards), N33e (parquet val label unseen in train), and two make_shards
into one --out."""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from scaling.data import DataError, load_dataset_info, make_eval_loader
from scaling.data.labels import CACHE_PREFIX, check_labels
from scaling.data.make_shards import make_shards
from scaling.data.writer import LOCK_SUFFIX

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
for _var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
    ENV.pop(_var, None)
ENV["NO_PROXY"] = "127.0.0.1"


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          env=ENV, timeout=timeout, check=False)


def make_shards_cli(*args: str) -> subprocess.CompletedProcess:
    return cli("-m", "scaling.data.make_shards", *args)


def one_line_error(run: subprocess.CompletedProcess) -> str:
    """The error line of a run that must exit 2 with no traceback or internal repr."""
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and " object at 0x" not in run.stderr, run.stderr
    return run.stderr


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """Built-in shapes shards (4 train shards of 10, 1 val shard): the shards indexed below."""
    out = tmp_path_factory.mktemp("shapes") / "s"
    make_shards("shapes", out, num_samples=50, image_size=8, shard_size=10, val_fraction=0.2)
    return out


# ---- T04b: dataset.json written before per-shard label ranges ----------------------------------

def test_T04b_old_dataset_json_out_of_range_label_stops_before_the_engine(shapes, tmp_path):
    data = tmp_path / "old"
    shutil.copytree(shapes, data)
    raw = json.loads((data / "dataset.json").read_text())
    for split in raw["splits"].values():
        for shard in split["shards"]:
            del shard["label_min"], shard["label_max"]  # as written by an older make_shards
    (data / "dataset.json").write_text(json.dumps(raw))
    check_labels(load_dataset_info(data))  # in range: accepted, and the scan is cached
    cache = json.loads((data / ".sha256-cache.json").read_text())
    assert cache[CACHE_PREFIX + "train-000000.tar"]["label_max"] <= 9
    raw["classes"], raw["num_classes"] = raw["classes"][:2], 2
    (data / "dataset.json").write_text(json.dumps(raw))
    for mode in ("on", "off"):  # in-memory and streaming alike
        run = cli("-m", "scaling.train", "--model", "mu/4", "--image-size", "8", "--data",
                  str(data), "--out", str(tmp_path / f"run-{mode}"), "--steps", "100",
                  "--num-workers", "0", "--in-memory", mode)
        err = one_line_error(run)
        assert "(split 'train') holds label" in err and "outside [0, 2) for 2 classes" in err
        assert not (tmp_path / f"run-{mode}").exists()  # nothing started


# ---- N29d, N29e: wrong keys said from the first shard, before a scan ---------------------------

@pytest.mark.parametrize("probe,flag,value,said", [
    ("N29d", "--label-key", "json:label", "a label 'json:label'"),
    ("N29e", "--image-key", "webp", "an image among ('webp',)"),
])
def test_N29d_N29e_wrong_key_is_said_before_scanning_the_split(shapes, tmp_path, probe, flag,
                                                               value, said):
    src = tmp_path / "wds"
    src.mkdir()
    shutil.copy(shapes / "train-000000.tar", src / "x-0.tar")
    for i in (1, 2, 3):  # a scan would stop here first: these are no tar files
        (src / f"x-{i}.tar").write_bytes(b"not a tar " * 100)
    run = make_shards_cli("--from", "webdataset", "--src", str(src / "x-{0..3}.tar"),
                          "--out", str(tmp_path / "o"), "--val-fraction", "0.25", flag, value)
    err = one_line_error(run)
    assert f"none of the first 10 samples has {said} (members seen: ['cls', 'png'])" in err
    assert "scanned" not in err and "unreadable" not in err


# ---- N30f, N30g, N31f: failing pipe: and http shards -------------------------------------------

def test_N30f_pipe_command_failing_at_once_is_said_in_words_and_not_retried(tmp_path):
    missing = tmp_path / "nowhere"
    start = time.monotonic()
    run = make_shards_cli("--from", "webdataset", "--src", f"pipe:cat {missing}/{{0..2}}.tar",
                          "--out", str(tmp_path / "o"), "--workers", "1")
    took = time.monotonic() - start
    err = one_line_error(run)
    assert f"unreadable shard: pipe:cat {missing}/0.tar: command exited 1 after 0 bytes" in err
    assert err.count(f"{missing}/0.tar: No such file") == 1  # cat ran once: no retries
    assert "ReadError" not in err and "empty file" not in err
    assert took < 60, took


def test_N30g_pipe_failing_mid_read_in_a_loader_names_the_exit_status(shapes, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shapes, copy)
    run = make_shards_cli("--from", "webdataset", "--out", str(tmp_path / "o"),
                          "--src", f"pipe:cat {copy}/train-{{000000..000003}}.tar",
                          "--val-src", f"pipe:cat {copy}/val-000000.tar")
    assert run.returncode == 0, run.stderr
    (copy / "val-000000.tar").unlink()
    start = time.monotonic()
    with pytest.raises(DataError, match=r"unreadable shard: pipe:cat .*val-000000\.tar: command "
                                        r"exited 1 after 0 bytes of output: cat .*, after 0 of "
                                        r"the 10 samples dataset\.json lists$"):
        list(make_eval_loader(tmp_path / "o", image_size=8, batch_size=4, rank=0,
                              world_size=1, num_workers=0))
    assert time.monotonic() - start < 1.0  # no back-off: 1 + 2 + 4 s before


def test_N31f_http_404_is_said_as_such_at_once(shapes, http_dir, tmp_path):
    root, base = http_dir
    for i in (0, 1, 3):  # shard 2 is absent: 404
        shutil.copy(shapes / f"train-00000{i}.tar", root / f"x-{i}.tar")
    start = time.monotonic()
    run = make_shards_cli("--from", "webdataset", "--src", f"{base}/x-{{0..3}}.tar",
                          "--out", str(tmp_path / "o"), "--val-fraction", "0.25")
    took = time.monotonic() - start
    err = one_line_error(run)
    assert f"unreadable shard: {base}/x-2.tar: HTTP 404 File not found" in err, err
    assert "empty file" not in err and "curl" not in err
    assert took < 60, took


# ---- N33e: a parquet val label that no training row has ----------------------------------------

def test_N33e_parquet_val_label_unseen_in_train_is_refused(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(buf, format="PNG")
    img = {"bytes": buf.getvalue(), "path": "a.png"}
    pq.write_table(pa.table({"image": [img] * 8, "label": [0, 1, 2, 3] * 2}),
                   tmp_path / "train.parquet")  # no hub metadata: classes from the labels
    pq.write_table(pa.table({"image": [img] * 3, "label": [1, 9, 3]}), tmp_path / "val.parquet")
    run = make_shards_cli("--from", "parquet", "--src", str(tmp_path / "train.parquet"),
                          "--val-src", str(tmp_path / "val.parquet"), "--out",
                          str(tmp_path / "o"))
    err = one_line_error(run)
    assert "labels [9] in 'label' are not training classes (0..3); pass --classes" in err
    assert not (tmp_path / "o").exists()


# ---- two make_shards into one --out ------------------------------------------------------------

def test_second_make_shards_on_one_out_says_it_waits_and_for_which_lock(tmp_path):
    out = tmp_path / "d"
    lock = tmp_path / f".d{LOCK_SUFFIX}"
    with open(lock, "a") as held:  # the other build, holding the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.Popen(
            [sys.executable, "-m", "scaling.data.make_shards", "--from", "shapes",
             "--num-samples", "20", "--image-size", "8", "--out", str(out)],
            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        killer = threading.Timer(240, proc.kill)
        killer.start()
        line = proc.stderr.readline()
        assert line == (f"make_shards: waiting for another build of {out} to finish (it holds "
                        f"the lock {lock})\n")
        assert proc.poll() is None and not out.exists()  # still waiting
        fcntl.flock(held, fcntl.LOCK_UN)
    _, stderr = proc.communicate(timeout=240)
    killer.cancel()
    assert proc.returncode == 0, stderr
    assert load_dataset_info(out).split("train").num_samples == 18

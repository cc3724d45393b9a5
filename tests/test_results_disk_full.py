"""A full disk under a run dir (scaling.writes.DiskFull): every write of the run dir's files ends
in one line naming ENOSPC and the file, never a traceback, through the real train CLI on a real
tmpfs that fills up (issue 27, T32s)."""

import os
import subprocess
import sys

import pytest
from conftest import train_env

from scaling import results
from scaling.data import make_builtin_shards

FAST = ["--model", "mu/4", "--image-size", "8", "--batch-size", "32", "--num-workers", "0",
        "--no-progress", "--no-tensorboard", "--steps", "5"]
PAGE = os.sysconf("SC_PAGESIZE")  # tmpfs counts whole pages: one small file takes one


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return str(make_builtin_shards("digits", tmp_path_factory.mktemp("data") / "digits").root)


def full_disk(tmpfs, free_pages: int = 0):
    """A 64 kB tmpfs filled up but for `free_pages` pages."""
    disk = tmpfs("64k")
    with pytest.raises(OSError), open(disk / "filler", "wb") as f:
        while True:
            f.write(b"\0" * PAGE)
            f.flush()
    os.truncate(disk / "filler", os.path.getsize(disk / "filler") - free_pages * PAGE)
    return disk


def train(data, out):
    return subprocess.run([sys.executable, "-m", "scaling.train", *FAST, "--data", data,
                           "--out", str(out)], env=train_env(), capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.mark.mount
def test_a_disk_full_before_the_run_is_refused_up_front(digits, tmpfs):
    out = full_disk(tmpfs) / "run"
    run = train(digits, out)
    assert run.returncode == results.EXIT_BAD_INPUT
    assert run.stderr.strip().splitlines()[-1] == (f"error: --out {out} is not writable (No "
                                                   "space left on device)")
    assert "Traceback" not in run.stderr
    assert list(out.iterdir()) == []


@pytest.mark.mount
@pytest.mark.parametrize("free, name", [(1, results.CONFIG_FILE), (2, results.PLAN_FILE)])
def test_disk_full_at_the_run_dirs_first_writes_is_one_line(digits, tmpfs, free, name):
    # One page takes the lock, the next config.json (written through a temporary file).
    out = full_disk(tmpfs, free) / "run"
    run = train(digits, out)
    assert run.returncode == results.EXIT_FAILED
    assert "Traceback" not in run.stderr and "During handling" not in run.stderr
    errors = [line.split(" ERROR ", 1)[1] for line in run.stderr.splitlines() if " ERROR " in line]
    assert errors[0] == f"no space left on device (ENOSPC) writing {out / name}"
    # final.json cannot be written either: said in one line as well
    final = out / results.FINAL_FILE
    assert errors[1:] == [f"could not write {final}: no space left on device (ENOSPC) writing "
                          + str(final)]
    assert not (out / results.LOCK_FILE).exists()  # released


@pytest.mark.mount
def test_every_run_dir_writer_names_the_file_on_a_full_disk(tmpfs):
    disk = full_disk(tmpfs)
    big = {"padding": "x" * (4 * PAGE)}
    with pytest.raises(results.DiskFull) as e:
        results.write_json(disk / results.FINAL_FILE, big)
    assert str(e.value) == f"no space left on device (ENOSPC) writing {disk / results.FINAL_FILE}"
    assert e.value.__suppress_context__ and e.value.errno == 28
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no temporary file left
    row = {"kind": "fewshot", "dataset": "d", "shots": 1, "seed": 0, "top1": 0.5, "step": 1,
           "images_seen": 8, "flops_seen": 1.0, "num_train": 2, "num_test": 3, **big}
    with pytest.raises(results.DiskFull, match=r"^no space left on device \(ENOSPC\) appending "
                       rf"to {disk / results.TRANSFER_FILE}$"):
        results.append_transfer(disk, row)
    with pytest.raises(results.DiskFull, match=rf"writing {disk / results.LOCK_FILE}$"):
        results.RunLock(disk).acquire()
    with pytest.raises(ValueError, match=r"is not writable \(No space left on device\)"):
        results.check_writable(disk)

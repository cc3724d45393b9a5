"""Data integrity: atomic rebuilds, per-shard counts on every read, labels checked early,
passthrough JPEGs decoded at build time, splits that may be absent."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scaling.data import DataError, load_dataset_info, make_eval_loader, make_train_loader
from scaling.data.make_shards import main as make_shards_main
from scaling.data.make_shards import make_shards
from scaling.data.memory import make_memory_train_loader
from scaling.data.writer import Encoding, Source, replace_by_renames, write_dataset

REPO = Path(__file__).resolve().parents[1]
KW = {"image_size": 8, "batch_size": 4, "rank": 0, "world_size": 1}


def staging(parent: Path) -> list[str]:
    """Names of build/old staging siblings in `parent`."""
    return sorted(p.name for p in parent.iterdir() if ".build-" in p.name or ".old-" in p.name)


# ---- atomic rebuild (item 5) -------------------------------------------------------------------

def check_old_then_load(item, *, out: str, expected: list[str]):
    """A source loader that, while the new build runs, checks that OUT still holds the old,
    verifiable dataset (recording what it saw in `out`/../seen.json)."""
    if item == 0:
        info = load_dataset_info(out, verify=True)
        seen = [s.sha256 for s in info.split("train").shards]
        Path(out).with_name("seen.json").write_text(json.dumps(seen == expected))
    return Image.new("RGB", (8, 8), (item * 20 % 256, 0, 0)), item % 2


def test_old_dataset_usable_until_the_new_one_is_swapped_in(tmp_path):
    out = tmp_path / "out"
    old = make_shards("shapes", out, num_samples=20, image_size=8)
    expected = [s.sha256 for s in old.split("train").shards]
    load = partial(check_old_then_load, out=str(out), expected=expected)
    source = Source("test", ("a", "b"), {"train": list(range(6))}, load, 8)
    write_dataset(source, out, enc=Encoding(), shard_size=3, args={})
    assert json.loads((tmp_path / "seen.json").read_text()) is True  # intact mid-build
    new = load_dataset_info(out, verify=True)
    assert new.source == "test" and new.split("train").num_samples == 6
    assert not (out / "val-000000.tar").exists()  # the old dataset's files went with it
    assert staging(tmp_path) == []


def test_killed_build_leaves_old_dataset_and_a_later_build_cleans_up(tmp_path):
    out = tmp_path / "out"
    old = make_shards("shapes", out, num_samples=20, image_size=8)
    cmd = [sys.executable, "-m", "scaling.data.make_shards", "--from", "shapes", "--out",
           str(out), "--num-samples", "400000", "--image-size", "8", "--shard-size", "50",
           "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not any(tmp_path.glob(".out.build-*/train-*.tar")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the build wrote no shard in 120 s"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # a killed build: no cleanup code runs
        proc.wait()
        proc.stderr.close()
    assert len(staging(tmp_path)) == 1  # the killed build's partial directory
    info = load_dataset_info(out, verify=True)
    assert info.splits == old.splits  # the old dataset is untouched
    new = make_shards("shapes", out, num_samples=30, image_size=8)
    assert staging(tmp_path) == []  # the later (locked) build removed the leftover
    assert load_dataset_info(out, verify=True).splits == new.splits
    assert new.split("train").num_samples == 27


def test_swap_by_renames(tmp_path):
    """The fallback where renameat2(RENAME_EXCHANGE) is missing (e.g. NFS)."""
    out, new = tmp_path / "out", tmp_path / ".out.build-x"
    out.mkdir(), new.mkdir()
    (out / "dataset.json").write_text("old")
    (new / "dataset.json").write_text("new")
    replace_by_renames(new, out)
    assert (out / "dataset.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_out_must_hold_only_a_dataset(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"holds 1 entries that are not part of a dataset .*"
                                        r"notes\.txt"):
        make_shards("shapes", out, num_samples=20, image_size=8)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="exists and is not a directory"):
        make_shards("shapes", tmp_path / "file", num_samples=20, image_size=8)


def test_seeded_hash_cache_survives_the_swap(tmp_path):
    make_shards("shapes", tmp_path / "out", num_samples=20, image_size=8)
    cache = tmp_path / "out" / ".sha256-cache.json"
    before = cache.stat().st_mtime_ns, cache.read_text()
    load_dataset_info(tmp_path / "out", verify=True)
    assert (cache.stat().st_mtime_ns, cache.read_text()) == before  # no re-hash was needed
    entry = json.loads(before[1])["train-000000.tar"]
    assert set(entry) == {"size", "mtime_ns", "ino", "ctime_ns", "sha256"}


# ---- in-place corruption and per-shard counts (item 7) -----------------------------------------

@pytest.fixture
def damaged(tmp_path):
    """Shards whose train-000000.tar (30 samples) had the header of a middle member corrupted in
    place, with size and mtime restored; returns (data dir, samples before the damage)."""
    make_shards("shapes", tmp_path, num_samples=60, image_size=8, shard_size=30)
    shard = tmp_path / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    k = len(members) // 2 // 2 * 2  # a middle sample's first member (an image header)
    st = shard.stat()
    with open(shard, "r+b") as f:  # in place: same inode, same size
        f.seek(members[k].offset)
        first = f.read(1)
        f.seek(members[k].offset)
        f.write(bytes([first[0] ^ 0xFF]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (shard.stat().st_size, shard.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    return tmp_path, k // 2


def test_in_place_corruption_fails_hash_verification(damaged):
    data_dir, _ = damaged
    load_dataset_info(data_dir, verify="size")  # size is all that check sees
    with pytest.raises(DataError, match=r"train-000000\.tar: sha256 mismatch"):
        load_dataset_info(data_dir, verify=True)  # ctime in the cache key: re-hashed


@pytest.mark.parametrize("workers", [0, 1])
def test_short_shard_stops_the_streaming_loaders(damaged, workers):
    data_dir, good = damaged
    info = load_dataset_info(data_dir, verify="size")
    match = rf"short shard: .*train-000000\.tar ended after {good} of the 30 samples"
    with pytest.raises(DataError, match=match):
        list(make_eval_loader(info, split="train", num_workers=workers, **KW))
    tl = make_train_loader(info, seed=0, num_workers=workers, samples_per_epoch=400, **KW)
    with pytest.raises(DataError, match=match):
        list(tl.epoch(0))  # 400 samples: about 15 shard draws, the damaged one among them


def test_short_shard_stops_the_memory_loader(damaged):
    data_dir, good = damaged
    with pytest.raises(DataError, match=rf"short shard: .*train-000000\.tar ended after {good} "
                                        r"of the 30 samples dataset.json lists"):
        make_memory_train_loader(load_dataset_info(data_dir, verify="size"), seed=0, **KW)


def test_shard_with_more_samples_than_listed(tmp_path):
    make_shards("shapes", tmp_path, num_samples=20, image_size=8)
    path = tmp_path / "dataset.json"
    payload = json.loads(path.read_text())
    payload["splits"]["val"]["num_samples"] = payload["splits"]["val"]["shards"][0][
        "num_samples"] = 1
    path.write_text(json.dumps(payload))
    with pytest.raises(DataError, match=r"val-000000\.tar holds more than the 1 samples"):
        list(make_eval_loader(tmp_path, num_workers=0, **KW))


# ---- truncated passthrough JPEG (item 8) -------------------------------------------------------

def test_truncated_jpeg_stops_the_build(tmp_path, capsys):
    """--strict stops the build naming the file; without it, a counted and recorded skip."""
    arr = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    whole = buf.getvalue()
    for name, data in (("good", whole), ("cut", whole[:len(whole) // 2])):
        (tmp_path / "src" / name).mkdir(parents=True)
        (tmp_path / "src" / name / f"{name}.jpg").write_bytes(data)
    (tmp_path / "src" / "good" / "good2.jpg").write_bytes(whole)
    Image.open(tmp_path / "src" / "cut" / "cut.jpg").verify()  # the header alone looks fine
    # --strict (today's behaviour before issue 16): the build stops, naming the file
    with pytest.raises(DataError, match=r"cut\.jpg: not a readable image \(image file is "
                                        r"truncated"):
        make_shards("imagefolder", tmp_path / "out", src=str(tmp_path / "src"), image_size=0,
                    val_fraction=0, strict=True)
    assert not (tmp_path / "out").exists()
    argv = ["--from", "imagefolder", "--src", str(tmp_path / "src"), "--out",
            str(tmp_path / "out"), "--image-size", "0", "--val-fraction", "0", "--workers", "1"]
    assert make_shards_main([*argv, "--strict"]) == 2
    assert "cut.jpg: not a readable image" in capsys.readouterr().err
    # without --strict: a counted skip, listed in dataset.json and in the summary
    assert make_shards_main(argv) == 0
    printed = capsys.readouterr().out
    assert "train 2 in 1 shards" in printed and "skipped 1 unreadable images" in printed
    assert "cut.jpg: not a readable image" in printed
    skipped = json.loads((tmp_path / "out" / "dataset.json").read_text())["skipped"]
    assert skipped["count"] == 1 and skipped["per_split"] == {"train": 1, "val": 0}
    assert skipped["items"][0]["item"].endswith("cut.jpg)")
    assert "image file is truncated" in skipped["items"][0]["reason"]
    assert load_dataset_info(tmp_path / "out").num_classes == 2


# ---- labels ------------------------------------------------------------------------------------

def bad_label(item):
    return Image.new("RGB", (8, 8)), 3 if item == 4 else 0


def test_writer_rejects_out_of_range_label(tmp_path):
    source = Source("test", ("a", "b", "c"), {"train": list(range(6))}, bad_label, 8)
    with pytest.raises(DataError, match=r"train-000001\.tar: label 3 of item 4 of split 'train' "
                                        r"is outside \[0, 3\)"):
        write_dataset(source, tmp_path / "out", enc=Encoding(), shard_size=3, args={})
    assert not (tmp_path / "out").exists() and staging(tmp_path) == []


def test_dataset_json_records_label_ranges_and_verification_checks_them(tmp_path):
    make_shards("shapes", tmp_path, num_samples=40, image_size=8, shard_size=12)
    info = load_dataset_info(tmp_path)
    ranges = [(s.label_min, s.label_max) for s in info.split("train").shards]
    assert ranges[0] == (0, 9) and all(0 <= lo <= hi <= 9 for lo, hi in ranges)
    path = tmp_path / "dataset.json"
    payload = json.loads(path.read_text())
    payload["splits"]["val"]["shards"][0]["label_max"] = 10
    path.write_text(json.dumps(payload))
    with pytest.raises(DataError, match=r"shard val-000000\.tar \(split 'val'\) records labels "
                                        r"\d\.\.10, outside \[0, 10\)"):
        load_dataset_info(tmp_path, verify=True)


# ---- absent splits -----------------------------------------------------------------------------

def test_dataset_without_val_split(tmp_path):
    info = make_shards("shapes", tmp_path, num_samples=20, image_size=8, val_fraction=0)
    assert info.has_split("train") and not info.has_split("val")
    with pytest.raises(ValueError, match=r"no split 'val'; has \['train'\]"):
        info.split("val")
    with pytest.raises(DataError, match="no split 'val'"):
        make_eval_loader(info, num_workers=0, **KW)

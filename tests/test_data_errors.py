"""Bad input: each gets a DataError naming the problem and path, or a counted skip."""

from __future__ import annotations

import json
import os
import shutil
import tarfile

import pytest

from scaling.bench.loader import main as bench_main
from scaling.data import (
    DataError,
    load_dataset_info,
    make_eval_loader,
    make_train_loader,
)
from scaling.data.make_shards import make_shards


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    make_shards("shapes", out, num_samples=40, image_size=8, shard_size=10)
    return out


@pytest.fixture
def data_dir(good_dir, tmp_path):
    """A fresh copy that a test may damage."""
    return shutil.copytree(good_dir, tmp_path / "data")


def test_missing_dir(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} does not exist"):
        load_dataset_info(tmp_path / "nope")


def test_empty_dir(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path} is empty"):
        load_dataset_info(tmp_path)


def test_missing_dataset_json(data_dir):
    (data_dir / "dataset.json").unlink()
    with pytest.raises(DataError, match="has no dataset.json"):
        load_dataset_info(data_dir)


def test_malformed_dataset_json(data_dir):
    (data_dir / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="dataset.json: not valid JSON"):
        load_dataset_info(data_dir)


def test_listed_shard_absent(data_dir):
    (data_dir / "train-000002.tar").unlink()
    with pytest.raises(DataError, match=r"train-000002\.tar .* is missing"):
        load_dataset_info(data_dir, verify="size")
    load_dataset_info(data_dir, verify=False)  # parse-only mode does not look at shards


def test_sha256_mismatch_and_cache(data_dir):
    load_dataset_info(data_dir, verify=True)  # hashes come from the cache the writer left
    cache = json.loads((data_dir / ".sha256-cache.json").read_text())
    assert set(cache) >= {"train-000000.tar", "val-000000.tar"}
    shard = data_dir / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # same size, different content, new mtime
    shard.write_bytes(bytes(data))
    load_dataset_info(data_dir, verify="size")  # size-only verification cannot see it
    with pytest.raises(DataError, match=r"val-000000\.tar: sha256 mismatch"):
        load_dataset_info(data_dir, verify=True)


def test_size_mismatch(data_dir):
    with open(data_dir / "train-000001.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(DataError, match=r"train-000001\.tar has \d+ bytes"):
        load_dataset_info(data_dir, verify="size")


def test_sha256_cache_is_reused(data_dir):
    shard = data_dir / "train-000000.tar"
    cache_file = data_dir / ".sha256-cache.json"
    load_dataset_info(data_dir)  # the copy has new inodes and ctimes: re-hashed, cache updated
    cache = json.loads(cache_file.read_text())
    cache["train-000000.tar"]["sha256"] = "0" * 64  # a stale entry with matching size/mtime
    cache_file.write_text(json.dumps(cache))
    with pytest.raises(DataError, match="sha256 mismatch"):
        load_dataset_info(data_dir)  # proves the cached value is used, not a re-hash
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1))
    load_dataset_info(data_dir)  # a new mtime forces a re-hash, which matches


def test_class_out_of_range(data_dir):
    path = data_dir / "dataset.json"
    payload = json.loads(path.read_text())
    payload["classes"], payload["num_classes"] = payload["classes"][:3], 3
    path.write_text(json.dumps(payload))
    # the labels the writer recorded per shard no longer fit: rejected before reading a shard
    with pytest.raises(DataError, match=r"shard train-000000\.tar .* records labels 0\.\.9, "
                                        r"outside \[0, 3\)"):
        load_dataset_info(data_dir, verify=False)
    for split in payload["splits"].values():  # a dataset.json without recorded ranges (older)
        for shard in split["shards"]:
            del shard["label_min"], shard["label_max"]
    path.write_text(json.dumps(payload))
    el = make_eval_loader(data_dir, image_size=8, batch_size=4, rank=0, world_size=1,
                          num_workers=0)
    with pytest.raises(DataError, match=r"val-000000\.tar, key val_\d+: class \d+ is outside"):
        list(el)


def test_corrupt_images_are_skipped_and_counted(corrupt_dir):
    el = make_eval_loader(corrupt_dir, image_size=8, batch_size=4, rank=0, world_size=1,
                          num_workers=0)
    batches = list(el)
    assert [b["image"].shape[0] for b in batches] == [4, 4]
    assert sum(b["skipped"] for b in batches) == 2
    assert "val_00000003" not in [k for b in batches for k in b["key"]]
    tl = make_train_loader(corrupt_dir, image_size=8, batch_size=10, rank=0, world_size=1,
                           seed=0, num_workers=2, samples_per_epoch=40, shuffle_buffer=1)
    train = list(tl.epoch(0))
    assert all(b["image"].shape[0] == 10 for b in train)  # refilled: the batch size is fixed
    assert sum(b["skipped"] for b in train) == 8  # 4 passes over the shard, 2 bad each


@pytest.mark.parametrize("kind", ["eval", "train"])
def test_corrupt_image_strict_names_shard_and_key(corrupt_dir, kind):
    kw = {"image_size": 8, "batch_size": 4, "rank": 0, "world_size": 1, "num_workers": 0,
          "strict": True}
    if kind == "eval":
        batches = iter(make_eval_loader(corrupt_dir, **kw))
        match = r"corrupt image in shard .*val-000000\.tar, key val_00000003"
    else:
        batches = make_train_loader(corrupt_dir, seed=0, samples_per_epoch=40, **kw).epoch(0)
        match = r"corrupt image in shard .*train-000000\.tar, key train_0000000[37]"
    with pytest.raises(DataError, match=match):
        list(batches)


def test_strict_error_crosses_worker_processes(corrupt_dir):
    el = make_eval_loader(corrupt_dir, image_size=8, batch_size=4, rank=0, world_size=1,
                          num_workers=1, strict=True)
    with pytest.raises(DataError, match="key val_00000003"):
        list(el)


def test_loader_argument_errors(good_dir):
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        make_eval_loader(good_dir, image_size=8, batch_size=4, rank=2, world_size=2)
    with pytest.raises(DataError, match="no split 'test'"):
        make_eval_loader(good_dir, image_size=8, batch_size=4, rank=0, world_size=1,
                         split="test")


def test_bench_loader_runs(good_dir, capsys):
    assert bench_main(["--data", str(good_dir), "--workers", "0", "--batches", "2",
                       "--batch-size", "8"]) == 0
    assert "images/s total" in capsys.readouterr().out
    assert bench_main(["--data", str(good_dir / "nope")]) == 2


def test_truncated_shard_without_verification(data_dir):
    shard = data_dir / "val-000000.tar"
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[2].offset_data + 10  # inside the second sample's image
    shard.write_bytes(shard.read_bytes()[:cut])
    info = load_dataset_info(data_dir, verify=False)
    kw = {"image_size": 8, "batch_size": 4, "rank": 0, "world_size": 1, "num_workers": 0}
    for strict in (True, False):  # a damaged tar is an error either way, never a warning
        with pytest.raises(DataError, match=r"unreadable shard: .*val-000000\.tar: ReadError.*"
                                            r"after 0 of the 4 samples dataset.json lists"):
            list(make_eval_loader(info, strict=strict, **kw))


def test_sample_without_label_is_skipped(data_dir):
    shard = data_dir / "val-000000.tar"
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[1].offset  # the first sample's cls header: the tar just ends
    shard.write_bytes(shard.read_bytes()[:cut])
    payload = json.loads((data_dir / "dataset.json").read_text())  # list the one sample left
    payload["splits"]["val"]["num_samples"] = 1
    payload["splits"]["val"]["shards"][0]["num_samples"] = 1
    (data_dir / "dataset.json").write_text(json.dumps(payload))
    kw = {"image_size": 8, "batch_size": 4, "rank": 0, "world_size": 1, "num_workers": 0}
    batches = list(make_eval_loader(load_dataset_info(data_dir, verify=False), **kw))
    assert [b["skipped"] for b in batches] == [1]
    with pytest.raises(DataError, match=r"key val_00000000: cls=None is not a class index"):
        list(make_eval_loader(load_dataset_info(data_dir, verify=False), strict=True, **kw))


def test_shard_deleted_after_loading_info(data_dir):
    info = load_dataset_info(data_dir)
    for shard in data_dir.glob("train-*.tar"):
        shard.unlink()
    tl = make_train_loader(info, image_size=8, batch_size=4, rank=0, world_size=1, seed=0,
                           num_workers=0)
    with pytest.raises(DataError, match=r"unreadable shard: .*train-00000\d\.tar"):
        next(tl.epoch(0))  # not an endless resampling of missing files

"""Shard writing from every source: counts, labels, image sizes, determinism, atomicity."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from scaling.data import DataError, load_dataset_info, make_builtin_shards
from scaling.data.make_shards import main as make_shards_main
from scaling.data.make_shards import make_shards
from scaling.data.writer import write_shard


def read_split(info, split: str) -> list[dict]:
    """All samples of a split, in shard order, read back with webdataset."""
    samples = []
    for url in info.split(split).urls:
        samples.extend(wds.tarfile_to_samples()(iter([{"url": url}])))
    return samples


def decode(sample: dict) -> np.ndarray:
    """The stored image of a raw sample as an RGB array."""
    data = sample.get("png", sample.get("jpg"))
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ---- ImageFolder -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_tree(tmp_path_factory) -> tuple[Path, Path]:
    """train/ with 3 classes of real JPEG and PNG files (RGB, grey, RGBA), val/ with 2 each."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2)):
        for c, name in enumerate(("cat", "dog", "fish")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 255, (24 + 4 * i, 32, 3), dtype=np.uint8)
                arr[..., c] = 255  # class colour, checked after the round trip
                img = Image.fromarray(arr)
                if i % 3 == 0:
                    img.save(d / f"{i}.JPEG", quality=95)
                elif i % 3 == 1:
                    img.convert("RGBA").save(d / f"{i}.png")
                else:
                    img.save(d / f"{i}.jpg")
            (d / "notes.txt").write_text("not an image")
    return root / "train", root / "val"


def test_imagefolder_with_val_tree(image_tree, tmp_path):
    train, val = image_tree
    info = make_shards("imagefolder", tmp_path, src=str(train), val_src=str(val),
                       image_size=20, shard_size=4)
    assert info.classes == ("cat", "dog", "fish")
    assert info.split("train").num_samples == 15 and info.split("val").num_samples == 6
    assert [s.num_samples for s in info.split("train").shards] == [4, 4, 4, 3]
    assert info.image_size == 20 and info.image_format == "jpg"
    for split, n in (("train", 15), ("val", 6)):
        samples = read_split(info, split)
        assert len(samples) == n and len({s["__key__"] for s in samples}) == n
        labels = [int(s["cls"]) for s in samples]
        assert sorted(labels) == sorted([0, 1, 2] * (n // 3))
        for s, label in zip(samples, labels):
            image = decode(s)
            assert min(image.shape[:2]) == 20  # shorter side capped at --image-size
            assert image[..., label].mean() > 200  # the class colour survived


def test_imagefolder_keeps_small_jpeg_bytes(image_tree, tmp_path):
    train, _ = image_tree
    info = make_shards("imagefolder", tmp_path, src=str(train), val_fraction=0.2, image_size=0)
    assert info.split("train").num_samples == 12 and info.split("val").num_samples == 3
    originals = {hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in train.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")}
    stored = {hashlib.sha256(s["jpg"]).hexdigest()
              for split in ("train", "val") for s in read_split(info, split)}
    assert len(originals) == 9 and originals <= stored  # JPEGs copied as is, not re-encoded
    assert len(stored) == 15  # the PNGs were converted to JPEG
    assert info.image_size == 32  # image_size=0 records the largest shorter side


def test_imagefolder_empty_or_missing(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no"):
        make_shards("imagefolder", tmp_path / "out", src=str(tmp_path / "src"))
    with pytest.raises(DataError, match="does not exist"):
        make_shards("imagefolder", tmp_path / "out", src=str(tmp_path / "nope"))


# ---- CIFAR -------------------------------------------------------------------------------------

def _pickle_member(tar: tarfile.TarFile, name: str, obj: dict) -> None:
    data = pickle.dumps(obj, protocol=2)
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tar.addfile(ti, io.BytesIO(data))


def make_cifar(path: Path, fine: bool, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """A CIFAR-10 (5 data batches) or CIFAR-100 (train/test) python archive; returns the test
    images as (N, 32, 32, 3) and their labels."""
    k = 100 if fine else 10
    key = b"fine_labels" if fine else b"labels"

    def batch(n):
        return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                key: [int(x) for x in rng.integers(0, k, n)], b"batch_label": b"x"}

    test = batch(7)
    with tarfile.open(path, "w:gz") as tar:
        if fine:
            _pickle_member(tar, "cifar-100-python/train", batch(12))
            _pickle_member(tar, "cifar-100-python/test", test)
            _pickle_member(tar, "cifar-100-python/meta", {
                b"fine_label_names": [f"f{i}".encode() for i in range(k)],
                b"coarse_label_names": [b"c"]})
        else:
            for i in range(1, 6):
                _pickle_member(tar, f"cifar-10-batches-py/data_batch_{i}", batch(3))
            _pickle_member(tar, "cifar-10-batches-py/test_batch", test)
            _pickle_member(tar, "cifar-10-batches-py/batches.meta", {
                b"label_names": [f"c{i}".encode() for i in range(k)]})
    images = test[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, test[key]


@pytest.mark.parametrize("fine", [False, True], ids=["cifar10", "cifar100"])
def test_cifar_archive(tmp_path, fine):
    archive = tmp_path / ("cifar-100-python.tar.gz" if fine else "cifar-10-python.tar.gz")
    test_images, test_labels = make_cifar(archive, fine, np.random.default_rng(1))
    info = make_shards("cifar", tmp_path / "out", src=str(tmp_path), shard_size=10)
    assert info.source == ("cifar100" if fine else "cifar10")
    assert info.num_classes == (100 if fine else 10)
    assert info.classes[3] == ("f3" if fine else "c3")
    assert info.split("train").num_samples == (12 if fine else 15)
    val = read_split(info, "val")  # the official test split, in its order, lossless (PNG)
    assert [int(s["cls"]) for s in val] == test_labels
    for s, expected in zip(val, test_images):
        np.testing.assert_array_equal(decode(s), expected)


def test_cifar_missing_archive(tmp_path):
    with pytest.raises(DataError, match="expected exactly one of"):
        make_shards("cifar", tmp_path / "out", src=str(tmp_path))


# ---- digits and shapes -------------------------------------------------------------------------

def test_digits(tmp_path):
    from sklearn.datasets import load_digits

    info = make_shards("digits", tmp_path)
    assert info.split("train").num_samples == 1617 and info.split("val").num_samples == 180
    samples = read_split(info, "train") + read_split(info, "val")
    counts = np.bincount([int(s["cls"]) for s in samples], minlength=10)
    np.testing.assert_array_equal(counts, np.bincount(load_digits().target))
    image = decode(samples[0])
    assert image.shape == (8, 8, 3) and image.max() > 200
    np.testing.assert_array_equal(image[..., 0], image[..., 2])  # grey written as RGB


def test_shapes_deterministic_per_seed(tmp_path):
    kw = {"num_samples": 60, "image_size": 12, "shard_size": 25}
    a = make_shards("shapes", tmp_path / "a", seed=3, **kw)
    b = make_shards("shapes", tmp_path / "b", seed=3, **kw)
    c = make_shards("shapes", tmp_path / "c", seed=4, **kw)
    sha = [[s.sha256 for s in i.split("train").shards] for i in (a, b, c)]
    assert sha[0] == sha[1] and sha[0][0] != sha[2][0]
    assert a.split("train").num_samples == 54 and a.split("val").num_samples == 6
    samples = read_split(a, "train")
    assert decode(samples[0]).shape == (12, 12, 3)
    assert np.bincount([int(s["cls"]) for s in samples]).min() >= 5  # balanced classes


def test_builtin_shards_are_reused(tmp_path):
    info = make_builtin_shards("shapes", tmp_path, num_samples=30, image_size=8)
    mtime = (tmp_path / "train-000000.tar").stat().st_mtime_ns
    again = make_builtin_shards("shapes", tmp_path, num_samples=30, image_size=8)
    assert again.args == info.args
    assert (tmp_path / "train-000000.tar").stat().st_mtime_ns == mtime  # not rewritten
    other = make_builtin_shards("shapes", tmp_path, num_samples=40, image_size=8)
    assert other.split("train").num_samples == 36
    with pytest.raises(ValueError, match="built-in sources"):
        make_builtin_shards("cifar", tmp_path)


# ---- atomic writes -----------------------------------------------------------------------------

def test_killed_shard_write_leaves_nothing(tmp_path):
    def samples():
        yield "a", "png", b"x", 0
        raise KeyboardInterrupt  # the writer dies mid-shard

    with pytest.raises(KeyboardInterrupt):
        write_shard(tmp_path / "train-000000.tar", samples())
    assert list(tmp_path.iterdir()) == []


def test_failed_build_keeps_the_previous_dataset(tmp_path):
    out = tmp_path / "out"
    before = make_shards("shapes", out, num_samples=20, image_size=8)
    bad = tmp_path / "bad"
    (bad / "a").mkdir(parents=True)
    (bad / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="x.png"):
        make_shards("imagefolder", out, src=str(bad), image_format="png")
    after = load_dataset_info(out, verify=True)  # still there, intact, hashes match
    assert after.source == "shapes" and after.splits == before.splits
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.make_shards.lock", "bad", "out"]


def test_cli(tmp_path, capsys):
    assert make_shards_main(["--from", "shapes", "--out", str(tmp_path), "--num-samples", "20",
                             "--image-size", "8", "--workers", "2", "--shard-size", "6"]) == 0
    assert "train 18 in 3 shards" in capsys.readouterr().out
    payload = json.loads((tmp_path / "dataset.json").read_text())
    assert payload["format"] == "vit-scaling-shards/1" and payload["num_classes"] == 10
    assert set(payload["splits"]["train"]["shards"][0]) >= {"name", "num_samples", "sha256"}
    assert make_shards_main(["--from", "digits", "--out", str(tmp_path), "--src", "x"]) == 2
    assert "takes no --src" in capsys.readouterr().err

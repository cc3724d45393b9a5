"""scaling.data.memory: small data sets read once, batches augmented as tensors."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from scaling.data import DataError, load_dataset_info, make_eval_loader, memory
from scaling.data.device import crop_batch
from scaling.data.make_shards import make_shards
from scaling.data.transforms import random_resized_crop_box
from scaling.data.writer import Encoding, Source, write_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shards("shapes", out, num_samples=60, image_size=8, shard_size=16)
    return load_dataset_info(out)


def _train(info, **kw):
    args = dict(image_size=8, batch_size=6, rank=0, world_size=1, seed=3)
    return memory.make_memory_train_loader(info, **{**args, **kw})


def test_auto_reads_small_data_into_memory_only(shapes, monkeypatch):
    assert memory.use_memory(shapes, "auto") and not memory.use_memory(shapes, "off")
    train = shapes.split("train").num_samples  # a run shorter than one epoch streams
    assert memory.use_memory(shapes, "auto", train) and not memory.use_memory(shapes, "auto",
                                                                              train - 1)
    assert memory.decoded_bytes(shapes) == 60 * 3 * 8 * 8
    monkeypatch.setattr(memory, "MEMORY_LIMIT_BYTES", memory.decoded_bytes(shapes) - 1)
    assert not memory.use_memory(shapes, "auto") and memory.use_memory(shapes, "on")
    with pytest.raises(ValueError, match="in_memory='yes'"):
        memory.use_memory(shapes, "yes")


def test_epoch_is_a_permutation_and_resume_is_exact(shapes):
    loader = _train(shapes)
    n = shapes.split("train").num_samples
    full = list(loader.epoch(1))
    keys = [k for b in full for k in b["key"]]
    assert len(full) == loader.steps_per_epoch == -(-n // 6)
    assert len(set(keys[:n])) == n  # every train sample once per pass
    tail = list(loader.epoch(1, start_step=3))
    for a, b in zip(full[3:], tail, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
        assert torch.equal(a["crop_box"], b["crop_box"]) and torch.equal(a["flip"], b["flip"])
    other = list(loader.epoch(2))
    assert [b["key"] for b in other] != [b["key"] for b in full]  # a new order each epoch


def test_global_batches_do_not_depend_on_world_size(shapes):
    one = list(_train(shapes, batch_size=6).epoch(0))
    ranks = [list(_train(shapes, batch_size=2, rank=r, world_size=3).epoch(0)) for r in range(3)]
    for k, batch in enumerate(one):
        parts = [r[k] for r in ranks]
        assert [k for p in parts for k in p["key"]] == batch["key"]
        for key in ("image", "crop_box", "flip"):  # stored pixels and their crops
            torch.testing.assert_close(torch.cat([p[key] for p in parts]), batch[key])


def test_crop_batch_matches_pil_bilinear_resize_with_a_box():
    g = np.random.default_rng(0)
    images = torch.from_numpy(g.integers(0, 256, (16, 3, 8, 8), dtype=np.uint8))
    rng = random.Random(0)
    boxes = np.array([random_resized_crop_box(8, 8, rng, (0.6, 1.0), (3 / 4, 4 / 3))
                      for _ in range(16)])
    ours = crop_batch(images, boxes, np.zeros(16, bool), 8)
    pil = torch.stack([torch.from_numpy(np.array(
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).resize(
            (8, 8), Image.BILINEAR, box=tuple(boxes[i])))).permute(2, 0, 1) for i in range(16)])
    assert (ours - pil.float()).abs().max() <= 1.0  # PIL rounds to whole grey levels
    whole = np.tile([0.0, 0.0, 8.0, 8.0], (16, 1))
    assert torch.equal(crop_batch(images, whole, np.zeros(16, bool), 8), images.float())
    flipped = crop_batch(images, whole, np.ones(16, bool), 8)
    assert torch.equal(flipped, images.float().flip(-1))


@pytest.mark.parametrize("size, scale", [(8, (0.6, 1.0)), (32, (0.08, 1.0)), (5, (0.01, 0.02))])
def test_vectorised_boxes_follow_the_scalar_algorithm(size, scale):
    n, ratio = 20000, (3 / 4, 4 / 3)
    vec = memory.random_resized_crop_boxes(n, size, size, np.random.default_rng(0), scale, ratio)
    rng = random.Random(0)
    ref = np.array([random_resized_crop_box(size, size, rng, scale, ratio) for _ in range(n)])
    for boxes in (vec, ref):
        assert boxes[:, :2].min() >= 0 and boxes[:, 2:].max() <= size
        assert (boxes[:, 2:] > boxes[:, :2]).all()
    stats = [lambda b: (b[:, 2] - b[:, 0]).mean(), lambda b: b[:, 1].mean(),
             lambda b: ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).mean()]
    for stat in stats:
        assert stat(vec) == pytest.approx(stat(ref), rel=0.03, abs=0.02)


def test_eval_covers_every_sample_once_with_the_streaming_crops(shapes):
    stream = make_eval_loader(shapes, image_size=8, batch_size=7, rank=0, world_size=1,
                              num_workers=0)
    want = {k: img for b in stream for k, img in zip(b["key"], b["image"])}
    got = {}
    for rank in range(3):
        loader = memory.make_memory_eval_loader(shapes, image_size=8, batch_size=4, rank=rank,
                                                world_size=3)
        batches = list(loader)
        assert loader.num_samples == sum(len(b["label"]) for b in batches)
        for b in batches:
            got.update(zip(b["key"], b["image"]))
    assert got.keys() == want.keys()
    for k, img in want.items():
        torch.testing.assert_close(got[k], img)


def test_corrupt_samples_are_skipped_once_or_named_when_strict(corrupt_dir):
    info = load_dataset_info(corrupt_dir)
    loader = memory.make_memory_train_loader(info, image_size=8, batch_size=4, rank=0,
                                             world_size=1, seed=0, samples_per_epoch=16)
    assert len(loader.labels) == 8
    skipped = [[b["skipped"] for b in loader.epoch(e)] for e in range(2)]
    assert skipped == [[2, 0, 0, 0], [0, 0, 0, 0]]  # reported once per run
    ev = memory.make_memory_eval_loader(info, image_size=8, batch_size=4, rank=0, world_size=1)
    assert sum(b["skipped"] for b in ev) == 2 and ev.num_samples == 8
    with pytest.raises(DataError, match=r"corrupt image in shard .*train-000000\.tar, key "
                                        r"train_00000003"):
        memory.make_memory_train_loader(info, image_size=8, batch_size=4, rank=0, world_size=1,
                                        seed=0, strict=True)


def _mixed_item(item):
    """Test items: (size, label) -> a size x size PNG."""
    size, label = item
    return Image.new("RGB", (size, size), (label * 40, 0, 0)), label


def test_images_of_several_sizes_are_streamed_under_auto(tmp_path):
    items = [(8 if i % 2 else 12, i % 3) for i in range(12)]
    source = Source("mixed", tuple("abc"), {"train": items, "val": items[:6]}, _mixed_item, 0)
    write_dataset(source, tmp_path / "d", enc=Encoding(), shard_size=6, args={})
    info = load_dataset_info(tmp_path / "d")
    with pytest.raises(memory.MixedSizes, match=r"split 'train' holds images of 2 sizes"):
        _train(info)

    def train(mode):
        cmd = [sys.executable, "-m", "scaling.train", "--model", "mu/4", "--image-size", "8",
               "--data", str(tmp_path / "d"), "--out", str(tmp_path / mode), "--steps", "4",
               "--batch-size", "6", "--num-workers", "0", "--no-progress", "--in-memory", mode]
        return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)

    auto = train("auto")
    assert auto.returncode == 0, auto.stderr[-3000:]  # streamed instead
    forced = train("on")
    assert forced.returncode != 0 and "holds images of 2 sizes" in forced.stderr

"""Loaders over real webdataset shards: batches, determinism, resume, rank split, evaluation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from scaling.data import (
    Augment,
    load_dataset_info,
    make_eval_loader,
    make_train_loader,
    mixup_cutmix,
)
from scaling.data.device import normalize
from scaling.data.loader import _eval_plan, rank_eval_samples
from scaling.data.make_shards import make_shards
from scaling.data.transforms import decode_crop, random_resized_crop_box

SIZE = 12


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    """300 shapes at 16 px: 270 train and 30 val, in shards of 10."""
    out = tmp_path_factory.mktemp("shapes")
    make_shards("shapes", out, num_samples=300, image_size=16, shard_size=10)
    return out


def loader(data, **kw):
    args = {"image_size": SIZE, "batch_size": 8, "rank": 0, "world_size": 1, "seed": 0,
            "num_workers": 0, "shuffle_buffer": 64}
    return make_train_loader(data, **{**args, **kw})


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
        and x["key"] == y["key"] for x, y in zip(a, b))


def test_train_batches(shapes_dir):
    tl = loader(shapes_dir)
    assert tl.steps_per_epoch == len(tl) == 34  # ceil(270 / 8)
    batches = list(tl.epoch(0))
    assert len(batches) == 34
    b = batches[0]
    assert b["image"].shape == (8, 3, SIZE, SIZE) and b["image"].dtype == torch.uint8
    assert b["image"].is_contiguous() and b["label"].dtype == torch.int64
    assert b["skipped"] == 0 and all(k.startswith("train_") for k in b["key"])
    assert 0 <= int(b["label"].min()) and int(b["label"].max()) < 10
    images = normalize(torch.cat([x["image"] for x in batches]), Augment())
    assert -2.5 < images.min() < -1 and 1 < images.max() < 2.7  # ImageNet-normalised
    labels = torch.cat([x["label"] for x in batches])
    assert torch.bincount(labels, minlength=10).min() > 10  # shuffled across classes


def test_epoch_length_from_samples(shapes_dir):
    assert loader(shapes_dir, samples_per_epoch=100, world_size=2).steps_per_epoch == 7
    with pytest.raises(ValueError, match="start_step=99"):
        loader(shapes_dir).epoch(0, start_step=99)


def test_deterministic_per_seed_and_epoch(shapes_dir):
    a = list(loader(shapes_dir, samples_per_epoch=40).epoch(1))
    assert same(a, list(loader(shapes_dir, samples_per_epoch=40).epoch(1)))
    assert not same(a, list(loader(shapes_dir, samples_per_epoch=40).epoch(2)))
    assert not same(a, list(loader(shapes_dir, samples_per_epoch=40, seed=1).epoch(1)))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_sees_the_same_batches(shapes_dir, workers):
    tl = loader(shapes_dir, samples_per_epoch=56, num_workers=workers)  # 7 steps
    full = list(tl.epoch(3))
    assert len(full) == 7
    for k in (3, 6) if workers else (1, 4):
        assert same(list(tl.epoch(3, start_step=k)), full[k:])
    assert list(tl.epoch(3, start_step=7)) == []


def test_workers_and_ranks_get_different_samples(shapes_dir):
    w2 = list(loader(shapes_dir, samples_per_epoch=32, num_workers=2).epoch(0))
    assert w2[0]["key"] != w2[1]["key"]  # worker 0 and worker 1 draw their own streams
    r0 = list(loader(shapes_dir, samples_per_epoch=32, world_size=2, rank=0).epoch(0))
    r1 = list(loader(shapes_dir, samples_per_epoch=32, world_size=2, rank=1).epoch(0))
    assert len(r0) == len(r1) == 2
    assert r0[0]["key"] != r1[0]["key"]


def eval_keys(data, world: int, workers: int, split: str = "val") -> list[list[str]]:
    per_rank = []
    for rank in range(world):
        el = make_eval_loader(data, image_size=SIZE, batch_size=4, rank=rank, world_size=world,
                              num_workers=workers, split=split)
        batches = list(el)
        keys = [k for b in batches for k in b["key"]]
        assert len(keys) == el.num_samples == sum(b["image"].shape[0] for b in batches)
        assert all(len(b["key"]) == b["label"].shape[0] for b in batches)
        per_rank.append(keys)
    return per_rank


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 2), (4, 0)])
def test_eval_sees_every_sample_once(shapes_dir, world, workers):
    info = load_dataset_info(shapes_dir)
    assert len(info.split("val").shards) == 3  # world=4: fewer shards than ranks
    expected = {f"val_{i:08d}" for i in range(30)}
    per_rank = eval_keys(shapes_dir, world, workers)
    keys = [k for r in per_rank for k in r]
    assert len(keys) == len(set(keys)) == 30 and set(keys) == expected
    assert all(per_rank)  # every rank got work


def test_eval_plan_covers_indices_once():
    for n_shards, world, workers in [(1, 2, 3), (5, 2, 2), (2, 3, 2), (7, 3, 4), (3, 1, 5)]:
        counts = [5] * n_shards
        seen = []
        for rank in range(world):
            for wid in range(workers):
                shards, mod, res = _eval_plan(list(range(n_shards)), rank, world, wid, workers)
                flat = [(s, i) for s in shards for i in range(5)]
                seen += [x for j, x in enumerate(flat) if j % mod == res]
        assert sorted(seen) == [(s, i) for s in range(n_shards) for i in range(5)]
        assert sum(rank_eval_samples(counts, r, world) for r in range(world)) == 5 * n_shards


def test_random_resized_crop_box_in_bounds():
    rng = random.Random(0)
    for _ in range(200):
        w, h = rng.randint(1, 50), rng.randint(1, 50)
        x0, y0, x1, y1 = random_resized_crop_box(w, h, rng, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


def test_full_crop_without_flip_equals_eval(shapes_dir):
    info = load_dataset_info(shapes_dir)
    aug = Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False, crop_pct=1.0)
    train = next(loader(info, augment=aug, samples_per_epoch=8).epoch(0))
    el = make_eval_loader(info, image_size=SIZE, batch_size=300, rank=0, world_size=1,
                          num_workers=0, split="train", augment=aug)
    evaluated = next(iter(el))
    index = {k: i for i, k in enumerate(evaluated["key"])}
    rows = [index[k] for k in train["key"]]
    torch.testing.assert_close(train["image"], evaluated["image"][rows])


def test_jpeg_draft_decodes_large_images_at_lower_scale():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (800, 600), (200, 30, 60)).save(buf, format="JPEG")
    out = decode_crop(buf.getvalue(), 64, rng=None, aug=Augment(crop_pct=1.0))
    assert out.shape == (64, 64, 3) and abs(int(out[..., 0].mean()) - 200) < 4


def test_mixup_cutmix():
    g = torch.Generator().manual_seed(0)
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    same_images, smooth = mixup_cutmix(images, labels, 5, mixup_alpha=0, cutmix_alpha=0,
                                       label_smoothing=0.1, generator=g)
    assert same_images is images
    assert torch.allclose(smooth[0], torch.tensor([0.92, 0.02, 0.02, 0.02, 0.02]))
    mixed, soft = mixup_cutmix(images, labels, 5, mixup_alpha=0.8, cutmix_alpha=0,
                               label_smoothing=0.0, generator=g)
    lam = soft[0, 0].item()
    assert 0 < lam < 1 and torch.allclose(soft.sum(1), torch.ones(4))
    assert torch.allclose(mixed[0], lam * images[0] + (1 - lam) * images[3])
    cut, soft = mixup_cutmix(images, labels, 5, mixup_alpha=0, cutmix_alpha=1.0,
                             label_smoothing=0.0, generator=torch.Generator().manual_seed(1))
    from_self = (cut[0] == 0).float().mean().item()  # image 0 is all zeros, image 3 all threes
    assert torch.isclose(soft[0, 0], torch.tensor(from_self)) and soft[0, 3] == 1 - from_self
    again, _ = mixup_cutmix(images, labels, 5, mixup_alpha=0, cutmix_alpha=1.0,
                            label_smoothing=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(cut, again)
    with pytest.raises(ValueError, match="label_smoothing=1.5"):
        mixup_cutmix(images, labels, 5, mixup_alpha=0, cutmix_alpha=0, label_smoothing=1.5)


def test_digits_defaults_do_not_flip():
    from scaling.data import default_augment

    assert default_augment("digits").hflip is False
    assert default_augment("imagefolder").scale == (0.08, 1.0)
    assert np.isclose(default_augment("shapes").crop_pct, 1.0)

"""uint8 batches to the device, augmentation there (scaling.data.device), --decode-on device.

The golden loss rows below were written by landed main at ff197da, whose loader workers
normalised to float32 and whose training process mixed on the host before the copy, with the
command of `_run` (torch 2.13.0 CPU). The uint8 path must give the same numbers: same images,
same mixup/cutmix draws, same soft targets, same eval.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import load_item
from PIL import Image

from scaling.data import (
    DataError,
    default_augment,
    load_dataset_info,
    make_builtin_shards,
    make_train_loader,
)
from scaling.data import device as dev
from scaling.data.make_shards import make_shards
from scaling.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Augment, mixup_cutmix
from scaling.data.writer import Encoding, Source, write_dataset

DEIT = ["--label-smoothing", "0.1", "--mixup-alpha", "0.8", "--cutmix-alpha", "1.0"]
# train loss at steps 1..12, then the eval loss at step 12, of ff197da (module doc)
GOLDEN = {
    "off": [2.3025853633880615, 2.29860782623291, 2.299806833267212, 2.324977397918701,
            2.3106117248535156, 2.294398307800293, 2.273543357849121, 2.3137471675872803,
            2.3026187419891357, 2.34727144241333, 2.3041272163391113, 2.2955191135406494,
            2.309502591027154],
    "on": [2.3025851249694824, 2.313006639480591, 2.293330192565918, 2.3096518516540527,
           2.2636830806732178, 2.313169240951538, 2.3307535648345947, 2.2942397594451904,
           2.247180938720703, 2.306016683578491, 2.2932372093200684, 2.327991485595703,
           2.3037809636857776],
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return str(make_builtin_shards("digits", tmp_path_factory.mktemp("data") / "digits").root)


@pytest.fixture(scope="module")
def jpeg_shapes(tmp_path_factory):
    """Shapes stored as 48 px JPEGs, trained at 16 px: DCT draft scales and row cuts apply."""
    out = tmp_path_factory.mktemp("jpeg") / "shapes"
    make_shards("shapes", out, num_samples=400, image_size=48, image_format="jpg",
                shard_size=50)
    return str(out)


def _run(data: str, out, *extra: str, steps: int = 12, faults: str | None = None) -> list:
    """`python -m scaling.train` of mu/2 at 16 px; (kind, step, loss) of every metrics row."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("VIT_SCALING_FAULTS", None)
    if faults:
        env["VIT_SCALING_FAULTS"] = faults
    cmd = [sys.executable, "-m", "scaling.train", "--model", "mu/2", "--image-size", "16",
           "--batch-size", "16", "--num-workers", "0", "--lr", "3e-3", "--data", data,
           "--out", str(out), "--steps", str(steps), "--log-every", "1", "--warmup-steps", "2",
           "--no-progress", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode in (0, 75), proc.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        return [(r["kind"], r["step"], r["loss"]) for r in map(json.loads, f)]


@pytest.mark.parametrize("memory", ["off", "on"])
def test_deit_recipe_loss_rows_equal_the_old_host_path(digits, tmp_path, memory):
    got = _run(digits, tmp_path / "run", *DEIT, "--in-memory", memory)
    assert [(k, s) for k, s, _ in got] == [("train", s) for s in range(1, 13)] + [("eval", 12)]
    np.testing.assert_allclose([loss for *_, loss in got], GOLDEN[memory], rtol=1e-6)


def test_decode_on_device_gives_the_workers_loss_rows_and_resumes_exactly(jpeg_shapes,
                                                                         tmp_path):
    workers = _run(jpeg_shapes, tmp_path / "w", *DEIT, "--in-memory", "off")
    device = _run(jpeg_shapes, tmp_path / "d", *DEIT, "--in-memory", "off",
                  "--decode-on", "device")
    assert device == workers  # the CPU device decodes with the workers' own function
    cut = _run(jpeg_shapes, tmp_path / "r", *DEIT, "--in-memory", "off", "--decode-on",
               "device", "--ckpt-every", "5", faults="sigterm@7")
    assert cut[-1][1] < 12  # stopped early, checkpointed
    assert _run(jpeg_shapes, tmp_path / "r", *DEIT, "--in-memory", "off", "--decode-on",
                "device", "--ckpt-every", "5") == workers


def test_device_stage_equals_host_normalise_then_mix(jpeg_shapes):
    """The device stage on a CPU device = the old order: float32 normalised as the workers
    did it (numpy, (x - 255 mean) * 1 / (255 std)), then mixup/cutmix of each micro-batch."""
    aug = Augment(scale=(0.08, 1.0))
    loader = make_train_loader(jpeg_shapes, image_size=16, batch_size=8, rank=0, world_size=1,
                               seed=1, num_workers=0, augment=aug)
    batch = next(loader.epoch(0))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, 16, 16)
    mixing = dev.Mixing(10, seed=5, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    inputs = dev.DeviceInputs(torch.device("cpu"), aug, 16)
    micro, bad = inputs.train_inputs(batch, micro_batch=4, mixing=mixing, step=9, rank=0)
    assert bad == 0 and len(micro) == 2
    mean = (np.asarray(IMAGENET_MEAN, np.float32) * 255).reshape(1, 3, 1, 1)
    inv_std = (1 / (np.asarray(IMAGENET_STD, np.float32) * 255)).reshape(1, 3, 1, 1)
    host = torch.from_numpy((batch["image"].numpy().astype(np.float32) - mean) * inv_std)
    for i, (x, y) in enumerate(micro):
        g = torch.Generator().manual_seed(hash((5, 9, 0, i)) & 0x7FFF_FFFF_FFFF_FFFF)
        want_x, want_y = mixup_cutmix(host[4 * i:4 * i + 4], batch["label"][4 * i:4 * i + 4], 10,
                                      mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1,
                                      generator=g)
        torch.testing.assert_close(x, want_x, rtol=1e-6, atol=1e-6)
        assert torch.equal(y, want_y)  # the same draws: the same soft targets


@pytest.fixture
def damaged_bodies(tmp_path):
    """10 val samples: 7 PNGs, one garbage (fails at the header, in the worker) and two JPEGs
    whose headers parse but whose scans are cut short (they fail where they are decoded)."""
    body_cut = _jpeg((64, 48))
    items = [("png", i) for i in range(10)]
    items[2] = ("bad", body_cut[:len(body_cut) // 2])
    items[5] = ("bad", b"\xff\xd8 garbage, not an image")
    items[8] = ("bad", body_cut[:len(body_cut) // 3])
    source = Source("test", tuple("abc"), {"train": items, "val": items}, load_item, 8)
    write_dataset(source, tmp_path, enc=Encoding(), shard_size=10, args={})
    return tmp_path


def test_decode_on_device_refills_corrupt_images_as_the_workers_do(damaged_bodies):
    """A JPEG cut short passes the worker's header check and fails on the device: the device
    drops it and refills its slot as the workers would have; the batches are equal."""
    info = load_dataset_info(damaged_bodies)
    aug = Augment(scale=(0.5, 1.0))
    kw = dict(image_size=8, batch_size=10, rank=0, world_size=1, seed=0, num_workers=0,
              augment=aug, split="val", steps_per_epoch=1)
    workers = next(make_train_loader(info, **kw).epoch(0))
    encoded = next(make_train_loader(info, decode_on="device", **kw).epoch(0))
    assert "image" not in encoded and len(encoded["jpeg"]) == 10
    inputs = dev.DeviceInputs(torch.device("cpu"), aug, 8)
    images, labels, bad = inputs.pixels(encoded, refill=True)
    # garbage: skipped by the worker either way; the scan cut at 1/3 fails where it is
    # decoded; the one cut at 1/2 decodes, as the rows an 8 px crop reads lie before the cut
    assert (workers["skipped"], encoded["skipped"], bad) == (2, 1, 1)
    assert torch.equal(images, workers["image"].float())
    assert torch.equal(labels, workers["label"])
    kept, kept_labels, _ = inputs.pixels(encoded, refill=False)  # eval: dropped, not refilled
    assert len(kept) == len(kept_labels) == 10 - bad
    strict = dev.DeviceInputs(torch.device("cpu"), aug, 8, strict=True)
    with pytest.raises(DataError, match="corrupt image decoded on the device"):
        strict.pixels(encoded, refill=True)


def test_decode_on_device_header_draws_match_the_workers(jpeg_shapes):
    """The worker's header-only pass draws the same boxes and flips as a full decode, so the
    random stream does not depend on where the image is decoded."""
    info = load_dataset_info(jpeg_shapes)
    kw = dict(image_size=16, batch_size=8, rank=0, world_size=1, seed=3, num_workers=0)
    a = list(make_train_loader(info, **kw, steps_per_epoch=3).epoch(0))
    b = list(make_train_loader(info, **kw, steps_per_epoch=3, decode_on="device").epoch(0))
    inputs = dev.DeviceInputs(torch.device("cpu"), default_augment("shapes"), 16)
    for x, y in zip(a, b, strict=True):
        assert x["key"] == y["key"]
        images, _, _ = inputs.pixels(y, refill=True)
        assert torch.equal(images, x["image"].float())


def test_cuda_decoding_without_torchvision_is_one_line():
    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is installed here")
    except ImportError:
        pass
    dev._torchvision.cache_clear()
    with pytest.raises(DataError, match="needs torchvision") as e:
        dev._torchvision()
    assert "\n" not in str(e.value)


def test_bad_decode_on_is_refused_before_work(digits, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scaling.train", "--model", "mu/2", "--data",
                           digits, "--out", str(tmp_path / "x"), "--steps", "2",
                           "--decode-on", "gpu"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 2 and "--decode-on" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_normalize_runs_on_the_images_device_and_matches_the_formula():
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 4, 4), np.uint8))
    out = dev.normalize(x, Augment())
    want = (x.float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert out.dtype == torch.float32 and out.device == x.device


def _jpeg(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_all_corrupt_train_batch_is_a_data_error():
    inputs = dev.DeviceInputs(torch.device("cpu"), Augment(), 8)
    batch = {"jpeg": [_jpeg()[:100]] * 2, "crop_box": torch.tensor([[0, 0, 40, 30.]] * 2),
             "flip": torch.tensor([False, True]), "label": torch.tensor([0, 1]), "skipped": 0}
    with pytest.raises(DataError, match="all 2 images"):
        inputs.pixels(batch, refill=True)
    images, labels, bad = inputs.pixels(batch, refill=False)
    assert bad == 2 and len(images) == len(labels) == 0
    good = {**batch, "jpeg": [_jpeg()] * 2}
    images, _, bad = inputs.pixels(good, refill=True)
    assert bad == 0 and torch.equal(images[1], images[0].flip(-1))

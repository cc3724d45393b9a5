"""Reduced JPEG decoding (scaling.data.jpeg) and its use in decode_crop: the row cut is bit-exact,
the draft box lands on the same region, small crops fall back to full size, PNGs and the random
stream are untouched, strict decoding still sees damage below the crop; the benchmark CLI."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from scaling.bench import decode as bench_decode
from scaling.bench.decode import make_jpegs
from scaling.data import jpeg
from scaling.data.info import DataError
from scaling.data.samples import Decode, jpeg_draft_setting
from scaling.data.transforms import RESAMPLE, Augment, decode_crop, random_resized_crop_box


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    """ImageNet-sized test JPEGs (500x375, quality 90)."""
    return make_jpegs(8, 500, 375, 90)


def crops(data: bytes, size: int, seed: int, mode: str, **kw) -> np.ndarray:
    """decode_crop with a fresh stream `seed` (train) or the centre crop (eval)."""
    rng = random.Random(seed) if mode == "train" else None
    return decode_crop(data, size, rng=rng, aug=kw.pop("aug", Augment()), **kw)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_row_cut_is_bit_exact(jpegs, interpolation):
    """Stopping after the rows the resize reads changes no pixel, at full and reduced scale."""
    aug, cut = Augment(interpolation=interpolation), 0
    for size in (224, 64, 16):
        for i, data in enumerate(jpegs):
            for mode, draft in (("train", False), ("train", True), ("eval", True)):
                a = crops(data, size, i, mode, aug=aug, draft=draft, rows=False)
                b = crops(data, size, i, mode, aug=aug, draft=draft, rows=True)
                assert np.array_equal(a, b), (size, i, mode, draft)
                if mode == "train":
                    box = random_resized_crop_box(500, 375, random.Random(i), aug.scale,
                                                  aug.ratio)
                    s = jpeg.draft_scale(box, size) if draft else 1
                    cut += jpeg.rows_needed(box[3] / s, (box[3] - box[1]) / s, size,
                                            RESAMPLE[interpolation]) * s < 375
    assert cut > 10  # the cut did happen in most train cases, so the equality means something


def test_rows_needed_is_not_loose():
    """Cutting right at the box's last row (no filter support) would change pixels: the margin
    the bit-exact test relies on is needed, i.e. that test can fail."""
    data = make_jpegs(1, 500, 375, 90)[0]
    box = (50.0, 40.0, 350.0, 240.0)
    offset = jpeg.sof_height_offset(data)
    short = Image.open(io.BytesIO(jpeg.with_height(data, offset, 240)))
    full = Image.open(io.BytesIO(data))
    a = np.asarray(short.resize((64, 64), Image.BICUBIC, box=box))
    b = np.asarray(full.resize((64, 64), Image.BICUBIC, box=box))
    assert not np.array_equal(a, b)
    need = jpeg.rows_needed(240.0, 200.0, 64, Image.BICUBIC)
    enough = Image.open(io.BytesIO(jpeg.with_height(data, offset, need)))
    assert np.array_equal(np.asarray(enough.resize((64, 64), Image.BICUBIC, box=box)), b)


def test_draft_crop_covers_the_same_region(jpegs):
    """The draft-decoded crop vs the full decode's crop resized, at 1/8 and 1/4 scale (32 px out
    of 500x375): mean absolute difference under 1 grey level on average and 3 at most. The two
    low-pass filters (libjpeg's scaled IDCT, the resize's antialiasing) differ by ~0.6-0.8
    levels on these images; mapping the box by the reduced image's size instead of 1/s (an
    up to 4 px shift at 1/8) measured 1.4 mean and 5.4 max, and a box one reduced pixel off
    fails below."""
    aug, diffs = Augment(hflip=False), []
    for i, data in enumerate(jpegs):
        for seed in range(4):
            a = crops(data, 32, 10 * i + seed, "train", aug=aug, draft=False, rows=False)
            b = crops(data, 32, 10 * i + seed, "train", aug=aug, draft=True, rows=False)
            diffs.append(np.abs(a.astype(int) - b).mean())
    assert np.mean(diffs) < 1.0 and max(diffs) < 3.0, diffs
    img = Image.open(io.BytesIO(jpegs[0]))
    img.draft("RGB", (62, 46))  # 1/8
    box = (10.0, 5.0, 40.0, 35.0)  # stored (80, 40, 320, 280)
    full = np.asarray(Image.open(io.BytesIO(jpegs[0])).resize((24, 24), box=(80, 40, 320, 280)))
    good = np.abs(np.asarray(img.resize((24, 24), box=box)).astype(int) - full).mean()
    shifted = (11.0, 5.0, 41.0, 35.0)
    bad = np.abs(np.asarray(img.resize((24, 24), box=shifted)).astype(int) - full).mean()
    assert good < 1.5 < bad, (good, bad)  # measured 0.8 and 3.0


def test_draft_rule_and_fallback(jpegs):
    """draft_scale keeps >= gap x size px per side (gap 2 by default: the final resize is
    still a 2x downscale); smaller crops decode at full size, so at 224 px out of 375 px tall
    images draft on and off are bit-exact."""
    assert jpeg.DRAFT_GAP == 2.0
    assert jpeg.draft_scale((0, 0, 448, 448), 224, gap=1) == 2
    assert jpeg.draft_scale((0, 0, 447, 900), 224, gap=1) == 1
    assert jpeg.draft_scale((10, 20, 130, 144), 30, gap=1) == 4
    assert jpeg.draft_scale((0, 0, 896, 896), 224) == 2
    assert jpeg.draft_scale((0, 0, 895, 2000), 224) == 1
    assert jpeg.draft_scale((0, 0, 100, 100), 224) == 1  # an upscale: full size
    assert jpeg.draft_scale((0, 0, 500, 375), 16) == 8
    gen = random.Random(0)
    for _ in range(500):
        box = random_resized_crop_box(500, 375, gen, (0.08, 1.0), (3 / 4, 4 / 3))
        size = gen.choice((16, 32, 64, 112))
        s = jpeg.draft_scale(box, size)
        assert min(box[2] - box[0], box[3] - box[1]) / s >= 2 * size or s == 1
    for i, data in enumerate(jpegs):
        for mode in ("train", "eval"):
            a = crops(data, 224, i, mode, draft=False, rows=False)
            assert np.array_equal(a, crops(data, 224, i, mode, draft=True, rows=False))


def test_png_is_unchanged():
    """Non-JPEG images take the plain path: equal to PIL's resize of the box, draft or not."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buf, "PNG")
    data, aug = buf.getvalue(), Augment(hflip=False)
    box = random_resized_crop_box(500, 375, random.Random(3), aug.scale, aug.ratio)
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(
        (32, 32), Image.BILINEAR, box=box))
    for draft, rows in ((False, False), (True, True)):
        got = decode_crop(data, 32, rng=random.Random(3), aug=aug, draft=draft, rows=rows)
        assert np.array_equal(got, want)


def test_random_stream_is_unchanged(jpegs):
    """The same stream state after every image with draft and row cut on or off: the crop
    boxes, flips and everything drawn after them stay the same (exact resume)."""
    on, off = random.Random(5), random.Random(5)
    for data in jpegs * 3:
        decode_crop(data, 16, rng=on, aug=Augment())
        decode_crop(data, 16, rng=off, aug=Augment(), draft=False, rows=False)
        assert on.getstate() == off.getstate()


def test_other_jpeg_kinds_decode_in_full(jpegs):
    """Progressive JPEGs are not cut (no SOF0/1 height found) and still crop correctly;
    grayscale JPEGs are cut and converted."""
    img = Image.open(io.BytesIO(jpegs[0]))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, progressive=True)
    assert jpeg.sof_height_offset(buf.getvalue()) is None
    assert jpeg.sof_height_offset(b"not a jpeg") is None
    a = crops(buf.getvalue(), 64, 1, "train", draft=True, rows=True)
    assert np.array_equal(a, crops(buf.getvalue(), 64, 1, "train", draft=True, rows=False))
    buf = io.BytesIO()
    img.convert("L").save(buf, "JPEG", quality=90)
    assert jpeg.sof_height_offset(buf.getvalue()) is not None
    a = crops(buf.getvalue(), 64, 2, "train", rows=True)
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, crops(buf.getvalue(), 64, 2, "train", rows=False))


def test_strict_decode_still_rejects_damage_below_the_crop(jpegs):
    """A JPEG cut after 60% of its bytes: a crop in its top part decodes when not strict
    (documented), strict decoding reads every row and raises."""
    data = jpegs[0][: int(len(jpegs[0]) * 0.6)]
    aug = Augment(scale=(0.08, 0.08))
    sample = {"jpg": data, "cls": b"0", "__key__": "k", "__url__": "u"}
    seed = next(s for s in range(200) if random_resized_crop_box(
        500, 375, random.Random(s), aug.scale, aug.ratio)[3] < 150)
    loose = Decode(32, 10, aug, strict=False)
    assert loose.image(sample, random.Random(seed)).shape == (32, 32, 3)
    with pytest.raises(DataError, match="corrupt image in shard u, key k"):
        Decode(32, 10, aug, strict=True).image(sample, random.Random(seed))


def test_draft_switch():
    """VIT_SCALING_JPEG_DRAFT: 1 (default) or 0, anything else a one-line DataError."""
    assert jpeg_draft_setting({}) is True
    assert jpeg_draft_setting({"VIT_SCALING_JPEG_DRAFT": "0"}) is False
    with pytest.raises(DataError, match="VIT_SCALING_JPEG_DRAFT='yes'; expected 0 or 1"):
        jpeg_draft_setting({"VIT_SCALING_JPEG_DRAFT": "yes"})


def test_bench_cli(capsys, tmp_path):
    """The benchmark prints one row per size and variant plus the reference; bad flags exit 2
    with one line."""
    out = tmp_path / "rows.json"
    assert bench_decode.main(["--images", "3", "--sizes", "32", "--rounds", "1",
                              "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| - | pillow |" in text and "| 32 | draft+rows |" in text
    assert out.exists() and '"variant": "full"' in out.read_text()
    with pytest.raises(SystemExit) as e:
        bench_decode.main(["--sizes", "32,x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sizes" in err[0]

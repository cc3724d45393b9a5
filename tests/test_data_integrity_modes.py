"""Image modes through the imagefolder writer: 16-bit grey scaled, transparency flattened."""

from __future__ import annotations

import io

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from scaling.data import DataError
from scaling.data.make_shards import make_shards
from scaling.data.modes import to_rgb

GRADIENT = np.linspace(0, 65535, 24 * 40).reshape(24, 40).astype(np.uint16)


def stored_images(info) -> dict[str, np.ndarray]:
    """class name -> the stored RGB pixels of its (single) training image."""
    out = {}
    for url in info.split("train").urls:
        for s in wds.tarfile_to_samples()(iter([{"url": url}])):
            data = s.get("png", s.get("jpg"))
            out[info.classes[int(s["cls"])]] = np.asarray(Image.open(io.BytesIO(data)))
    return out


def write_tree(root, images: dict[str, tuple[Image.Image, str, dict]]):
    """One class folder per image: name -> (image, file format, save options)."""
    for name, (image, fmt, opts) in images.items():
        (root / name).mkdir(parents=True)
        image.save(root / name / f"x.{fmt}", **opts)
    return root


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path, fmt):
    src = write_tree(tmp_path / "src", {"grad": (Image.fromarray(GRADIENT), "png", {})})
    assert Image.open(src / "grad" / "x.png").mode == "I;16"  # a real 16-bit PNG
    info = make_shards("imagefolder", tmp_path / "out", src=str(src), image_format=fmt,
                       image_size=0, val_fraction=0)
    stored = stored_images(info)["grad"]
    expected = np.round(GRADIENT / 257)
    assert stored.shape == (24, 40, 3)
    assert abs(stored.mean() - expected.mean()) < (0.01 if fmt == "png" else 1.0)
    assert abs(stored.mean() - 127.5) < 1  # clipping gave ~254
    if fmt == "png":  # lossless: every pixel, and grey in all three channels
        np.testing.assert_array_equal(stored[..., 0], expected)
        np.testing.assert_array_equal(stored[..., 0], stored[..., 2])


def test_transparency_and_other_modes(tmp_path):
    la = np.zeros((8, 8, 2), np.uint8)
    la[..., 0], la[..., 1] = 40, 128  # dark grey at half opacity
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 200, 10, 10])  # index 0 black (transparent), 1 red
    pal.paste(1, (0, 0, 4, 8))
    grey16 = Image.fromarray(np.where(np.arange(64).reshape(8, 8) < 32, 1000, 65535)
                             .astype(np.uint16))
    src = write_tree(tmp_path / "src", {
        "la": (Image.fromarray(la, "LA"), "png", {}),
        "palette": (pal, "png", {"transparency": 0}),
        "grey16trns": (grey16, "png", {"transparency": 1000}),
        "cmyk": (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "jpg", {"quality": 95}),
        "bilevel": (Image.new("1", (8, 8), 1), "png", {}),
    })
    info = make_shards("imagefolder", tmp_path / "out", src=str(src), image_format="png",
                       image_size=0, val_fraction=0)
    got = stored_images(info)
    # over white: 40 * 128/255 + 255 * 127/255 = 147 (convert("RGB") gave 40)
    np.testing.assert_allclose(got["la"], 147, atol=1)
    np.testing.assert_array_equal(got["palette"][:, :4], [[[200, 10, 10]] * 4] * 8)
    np.testing.assert_array_equal(got["palette"][:, 4:], 255)  # transparent: white, not black
    np.testing.assert_array_equal(got["grey16trns"][:4], 255)  # the tRNS value: transparent
    np.testing.assert_array_equal(got["grey16trns"][4:], 255)  # 65535 -> 255
    assert np.abs(got["cmyk"].astype(int) - [255, 0, 0]).max() <= 3  # red
    np.testing.assert_array_equal(got["bilevel"], 255)


def test_unconvertible_modes_are_refused():
    with pytest.raises(DataError, match="mode F"):
        to_rgb(Image.new("F", (4, 4), 0.5))
    with pytest.raises(DataError, match=r"I image with values 0\.\.70000, outside the 16-bit"):
        to_rgb(Image.fromarray(np.array([[0, 70000]], np.int32)))
    wide = to_rgb(Image.fromarray(np.array([[0, 257 * 100, 65535]], np.int32)))  # mode I
    np.testing.assert_array_equal(np.asarray(wide)[0, :, 0], [0, 100, 255])
    rgb = Image.new("RGB", (2, 2))
    assert to_rgb(rgb) is rgb  # nothing to do: no copy


"""Any PIL image mode to 8-bit RGB, as an image viewer shows it.

`Image.convert("RGB")` clips 16-bit greyscale to near-white and drops alpha; here 16-bit images
are scaled to 8 bits and transparency is composited over `BACKGROUND` (white).
Every mode's rule: docs/data.md, "Making shards" (Image modes).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from scaling.data.info import DataError

BACKGROUND = (255, 255, 255)
WIDE_GREY = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB version of `image` (module doc); RGB images come back as they are."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode == "F":
        raise DataError("32-bit float image (mode F): its value range is undefined; store it "
                        "as 8 or 16 bit")
    if image.mode in WIDE_GREY:
        image = _grey_to_8bit(image)
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        return _flatten(image)
    try:
        return image.convert("RGB")
    except ValueError as e:  # a mode Pillow cannot convert (e.g. LAB, HSV)
        raise DataError(f"image mode {image.mode} cannot be converted to RGB ({e})") from e


def _grey_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer holding 16-bit) grey -> L, or LA when a tRNS value is set."""
    values = np.asarray(image)
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi > 65535:
        raise DataError(f"{image.mode} image with values {lo}..{hi}, outside the 16-bit range "
                        "0..65535")
    grey = np.round(values.astype(np.float32) / 257).astype(np.uint8)
    key = image.info.get("transparency")
    if isinstance(key, int):  # tRNS of a 16-bit grey PNG: one raw value is transparent
        alpha = np.where(values == key, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey, alpha], axis=-1), "LA")
    return Image.fromarray(grey, "L")


def _flatten(image: Image.Image) -> Image.Image:
    """Composite an image with transparency over BACKGROUND (convert("RGBA") honours tRNS)."""
    rgba = image.convert("RGBA")
    out = Image.new("RGB", rgba.size, BACKGROUND)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out

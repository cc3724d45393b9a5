"""Decoding a JPEG only as far as a crop needs it: at a reduced DCT scale, and down to its last row.

Both reductions are chosen from the crop box and the output size after the box was drawn, so the
random stream and the crop distribution do not change. The reduced DCT scale (`Image.draft`) is
not bit-exact; the row cut (a smaller height in the SOF marker) is, but leaves damage below the
cut unseen, so strict loaders pass `rows=False`. Rules, speed, accuracy: docs/data.md, "JPEG
decoding speed".
"""

from __future__ import annotations

import io
import math

from PIL import Image

DRAFT_SCALES = (8, 4, 2, 1)  # what libjpeg's DCT scaling offers through Pillow's draft()
SEQUENTIAL_SOF = (0xC0, 0xC1)  # baseline and extended sequential, Huffman-coded
OTHER_SOF = frozenset(range(0xC2, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG, DAC are not SOFs
FILTER_SUPPORT = {Image.BILINEAR: 1.0, Image.BICUBIC: 2.0}  # Pillow's filter radii
DRAFT_GAP = 2.0  # the box keeps >= DRAFT_GAP x the output size at the reduced scale (see below)
ROW_MARGIN = 2  # rows past the filter's reach: the chroma upsampling of the last row differs


def draft_scale(box: tuple[float, ...], size: int, gap: float | None = None) -> int:
    """The largest DCT scale denominator s that leaves >= gap * `size` pixels in each direction
    of `box` (stored-image coordinates) at 1/s; 1 when none does. `gap` defaults to DRAFT_GAP
    (read at call time)."""
    side = min(box[2] - box[0], box[3] - box[1]) / (DRAFT_GAP if gap is None else gap)
    return next((s for s in DRAFT_SCALES if side >= s * size), 1)


def sof_height_offset(data: bytes) -> int | None:
    """Byte offset of the image height in the SOF marker of a sequential Huffman JPEG; None for
    other JPEG kinds, a height of 0 (set later by a DNL marker) or a header it cannot walk."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in SEQUENTIAL_SOF:
            ok = i + 7 <= n and data[i + 5:i + 7] != b"\x00\x00"
            return i + 5 if ok else None
        if marker in OTHER_SOF or marker == 0xDA:  # another kind, or scan data before any SOF
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def rows_needed(y1: float, box_height: float, size: int, resample: int) -> int:
    """Rows (from the top, in the decoded image) that Pillow's resize of a box ending at `y1`
    with `box_height` to `size` rows reads: the last output row's centre plus the filter's
    (antialiasing-widened) support, rounded up, plus ROW_MARGIN."""
    support = FILTER_SUPPORT[resample] * max(box_height / size, 1.0)
    return math.floor(y1 + support) + 1 + ROW_MARGIN


def with_height(data: bytes, offset: int, height: int) -> bytes:
    """`data` with the SOF height at `offset` replaced by `height`."""
    return data[:offset] + height.to_bytes(2, "big") + data[offset + 2:]


def reduce_for_box(img: Image.Image, data: bytes, box: tuple[float, ...], size: int,
                   resample: int, *, draft: bool, rows: bool
                   ) -> tuple[Image.Image, tuple[float, ...]]:
    """Prepare `img`, opened from `data` and not loaded yet, for resizing `box` (stored-image
    coordinates) to `size`: a JPEG at the scale `draft_scale` allows (when `draft`) and cut to
    the rows the resize reads (when `rows`; reopened from `data` with a smaller SOF height).
    Returns the image to load and the box in its coordinates; other images as they are."""
    if img.format != "JPEG" or not (draft or rows):
        return img, box
    s = draft_scale(box, size) if draft else 1
    box = tuple(v / s for v in box)
    offset = sof_height_offset(data) if rows else None
    if offset is not None:
        height = rows_needed(box[3], box[3] - box[1], size, resample) * s
        if height < img.size[1]:
            img = Image.open(io.BytesIO(with_height(data, offset, height)))
    if s > 1:  # makes Pillow pick exactly s: W // (W // s) is in [s, 2s) (see draft())
        w, h = img.size
        img.draft("RGB", (max(w // s, 1), max(h // s, 1)))
    return img, box

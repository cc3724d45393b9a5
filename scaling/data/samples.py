"""What both loader kinds (streaming, scaling.data.loader; in-memory, scaling.data.memory)
share: decoding a raw webdataset sample, seeds, the argument check, the epoch length and the
per-shard counts the checked shard reader compares with."""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from scaling.data.info import (
    DEFAULT_IMAGE_KEYS,
    DEFAULT_LABEL_KEY,
    DataError,
    DatasetInfo,
    SplitInfo,
    load_dataset_info,
)
from scaling.data.transforms import Augment, decode_crop, default_augment, plan_crop

IMAGE_KEYS = DEFAULT_IMAGE_KEYS
JPEG_DRAFT_ENV = "VIT_SCALING_JPEG_DRAFT"
JSON_PREFIX = "json:"
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def raw_label(sample: dict, label_key: str) -> object:
    """The label value of a raw sample before int(): the text of member `label_key` (`cls`),
    or field FIELD (dots for nested objects) of its `json` member for "json:FIELD"; None
    when absent. A json member that does not parse raises ValueError."""
    if not label_key.startswith(JSON_PREFIX):
        raw = sample.get(label_key)
        return raw.decode("ascii", "replace").strip() if isinstance(raw, bytes) else raw
    value = sample.get("json")
    if value is None:
        return None
    value = json.loads(value)
    for part in label_key[len(JSON_PREFIX):].split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def parse_label(value: object) -> int:
    """A class index from a raw label value: an int, or text / a float holding one (not a
    bool); ValueError otherwise."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{value!r} is not a class index")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{value!r} is not a class index")
        return int(value)
    return int(value)


def image_bytes(sample: dict, image_keys: tuple[str, ...]) -> bytes | None:
    """The encoded image of a raw sample: its first member among `image_keys`."""
    return next((sample[k] for k in image_keys if k in sample), None)


def stream_seed(*parts: int) -> int:
    """A 64-bit seed from integers (numpy SeedSequence: well mixed, same in every process)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class Decode:
    """Per-sample decoding settings shared by the train and eval streams."""

    image_size: int
    num_classes: int
    augment: Augment
    strict: bool
    image_keys: tuple[str, ...] = DEFAULT_IMAGE_KEYS
    label_key: str = DEFAULT_LABEL_KEY
    # JPEGs at reduced DCT scale where the crop allows (scaling.data.jpeg); rows are cut to the
    # crop's reach except when strict, which must notice damage anywhere in an image
    jpeg_draft: bool = True
    # --decode-on device: the workers only read the header, draw the crop and flip, and hand
    # over the encoded bytes (`encoded`); the training process decodes (scaling.data.device)
    on_device: bool = False

    def label(self, sample: dict) -> int | None:
        """The class index of a raw sample; None if missing or unreadable (a damaged sample:
        DataError when strict); DataError if out of range."""
        raw = None
        try:
            raw = raw_label(sample, self.label_key)
            label = parse_label(raw)
        except (TypeError, ValueError):
            if self.strict:
                raise DataError(f"shard {sample.get('__url__')}, key {sample.get('__key__')}: "
                                f"{self.label_key}={raw!r} is not a class index") from None
            return None
        if not 0 <= label < self.num_classes:
            raise DataError(f"shard {sample.get('__url__')}, key {sample.get('__key__')}: "
                            f"class {label} is outside [0, {self.num_classes})")
        return label

    def image(self, sample: dict, rng: random.Random | None) -> np.ndarray | None:
        """The cropped uint8 image, or None for a corrupt one (DataError when strict)."""
        return self._decoded(sample, lambda data: decode_crop(
            data, self.image_size, rng=rng, aug=self.augment, draft=self.jpeg_draft,
            rows=not self.strict))

    def encoded(self, sample: dict, rng: random.Random | None
                ) -> tuple[bytes, tuple[float, ...], bool] | None:
        """(encoded bytes, crop box, flip) with the draws `image` makes, from the header
        alone; None when the header does not parse (DataError when strict). Damage past the
        header shows only when the device decodes it (scaling.data.device)."""
        def header(data: bytes):
            return (data, *plan_crop(*Image.open(io.BytesIO(data)).size, rng, self.augment))
        return self._decoded(sample, header)

    def item(self, sample: dict, rng: random.Random | None):
        """What a worker hands on for one sample: `encoded` when on_device, else `image`."""
        return self.encoded(sample, rng) if self.on_device else self.image(sample, rng)

    def stored_image(self, sample: dict) -> np.ndarray | None:
        """The (H, W, 3) uint8 image as stored, uncropped; None for a corrupt one."""
        return self._decoded(sample, lambda data: np.asarray(
            Image.open(io.BytesIO(data)).convert("RGB")))

    def _decoded(self, sample: dict, decode) -> np.ndarray | None:
        """decode(the sample's image bytes); None when they are missing or do not decode
        (DataError naming shard and key when strict)."""
        data = image_bytes(sample, self.image_keys)
        try:
            if data is None:
                raise ValueError(f"no image (has {sorted(k for k in sample if k[:2] != '__')})")
            return decode(data)
        except DECODE_ERRORS as e:
            if self.strict:
                raise DataError(f"corrupt image in shard {sample.get('__url__')}, key "
                                f"{sample.get('__key__')}: {e}") from e
            return None


def jpeg_draft_setting(environ=os.environ) -> bool:
    """`VIT_SCALING_JPEG_DRAFT`: 1 (the default) decodes JPEGs at reduced DCT scale where the
    crop allows, 0 always at full size (the switch of the accuracy check in docs/data.md);
    DataError for any other value."""
    value = environ.get(JPEG_DRAFT_ENV, "1")
    if value not in ("0", "1"):
        raise DataError(f"{JPEG_DRAFT_ENV}={value!r}; expected 0 or 1")
    return value == "1"


DECODE_ON = ("workers", "device")


def make_decode(info: DatasetInfo, image_size: int, augment: Augment | None,
                strict: bool, decode_on: str = "workers") -> Decode:
    """The Decode of a dataset: its classes, transform defaults and sample keys; decode_on
    "device" makes the workers hand over encoded bytes (Decode.on_device)."""
    if decode_on not in DECODE_ON:
        raise ValueError(f"decode_on={decode_on!r}; expected one of {DECODE_ON}")
    return Decode(image_size, info.num_classes, augment or default_augment(info.source), strict,
                  info.image_keys, info.label_key, jpeg_draft_setting(),
                  on_device=decode_on == "device")


def shard_counts(split: SplitInfo) -> dict[str, int]:
    """url -> the sample count dataset.json lists, for the checked shard reader."""
    return dict(zip(split.urls, (s.num_samples for s in split.shards)))


def check_loader_args(batch_size: int, rank: int, world_size: int, num_workers: int,
                      image_size: int) -> None:
    """Validate the shared loader arguments."""
    if batch_size < 1 or image_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size={batch_size}, image_size={image_size}, num_workers="
                         f"{num_workers}; expected >= 1, >= 1, >= 0")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}; expected 0 <= rank < world_size")


def epoch_steps(samples: int, batch_size: int, world_size: int) -> int:
    """Steps of an epoch of `samples` images: rounded up (open_clip does that, too)."""
    return -(-samples // (batch_size * world_size))


def as_info(info: DatasetInfo | str | os.PathLike) -> DatasetInfo:
    """Accept a DatasetInfo or a data dir (checked by size, not hash)."""
    return info if isinstance(info, DatasetInfo) else load_dataset_info(info, verify="size")

"""What both loader kinds (streaming, scaling.data.loader; in-memory, scaling.data.memory)
share: decoding a raw webdataset sample, seeds, the argument check, the epoch length and the
per-shard counts the checked shard reader compares with."""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from scaling.data.info import DataError, DatasetInfo, SplitInfo, load_dataset_info
from scaling.data.transforms import Augment, decode_crop

IMAGE_KEYS = ("jpg", "jpeg", "png")
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


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

    def label(self, sample: dict) -> int | None:
        """The class index of a raw sample; None if missing or unreadable (a damaged sample:
        DataError when strict); DataError if out of range."""
        raw = sample.get("cls")
        try:
            label = int(raw)
        except (TypeError, ValueError):
            if self.strict:
                raise DataError(f"shard {sample.get('__url__')}, key {sample.get('__key__')}: "
                                f"cls={raw!r} is not a class index") from None
            return None
        if not 0 <= label < self.num_classes:
            raise DataError(f"shard {sample.get('__url__')}, key {sample.get('__key__')}: "
                            f"class {label} is outside [0, {self.num_classes})")
        return label

    def image(self, sample: dict, rng: random.Random | None) -> np.ndarray | None:
        """The cropped uint8 image, or None for a corrupt one (DataError when strict)."""
        return self._decoded(sample, lambda data: decode_crop(data, self.image_size, rng=rng,
                                                              aug=self.augment))

    def stored_image(self, sample: dict) -> np.ndarray | None:
        """The (H, W, 3) uint8 image as stored, uncropped; None for a corrupt one."""
        return self._decoded(sample, lambda data: np.asarray(
            Image.open(io.BytesIO(data)).convert("RGB")))

    def _decoded(self, sample: dict, decode) -> np.ndarray | None:
        """decode(the sample's image bytes); None when they are missing or do not decode
        (DataError naming shard and key when strict)."""
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        try:
            if data is None:
                raise ValueError(f"no image (has {sorted(k for k in sample if k[:2] != '__')})")
            return decode(data)
        except DECODE_ERRORS as e:
            if self.strict:
                raise DataError(f"corrupt image in shard {sample.get('__url__')}, key "
                                f"{sample.get('__key__')}: {e}") from e
            return None


def shard_counts(split: SplitInfo) -> dict[str, int]:
    """url -> the sample count dataset.json lists, for the checked shard reader."""
    return {str(s.path): s.num_samples for s in split.shards}


def check_loader_args(batch_size: int, rank: int, world_size: int, num_workers: int, image_size: int):
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

"""In-memory loaders for small data sets: decode every image once, then batch tensors.

A split whose decoded pixels fit in `MEMORY_LIMIT_BYTES` is read once into a uint8 tensor per
rank, because streaming re-decodes every sample on every visit, several times a micro model's
step for tiny images. Batch k depends on (seed, epoch, k) only: exact resume, no dependence on
the world size; crops are applied on the device (scaling.data.device.crop_batch).
Spec and measurements: docs/data.md, "In-memory data for small data sets".
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np
import torch

from scaling.data.info import DataError, DatasetInfo
from scaling.data.loader import epoch_length
from scaling.data.samples import (
    Decode,
    as_info,
    check_loader_args,
    make_decode,
    shard_counts,
    stream_seed,
)
from scaling.data.shardread import checked_samples
from scaling.data.transforms import Augment, default_augment, fallback_crop_box


class MixedSizes(DataError):
    """A split whose stored images differ in size: it cannot be one tensor (stream it)."""


MEMORY_LIMIT_BYTES = 1 << 30  # decoded uint8 pixels of train + val per rank
IN_MEMORY_CHOICES = ("auto", "on", "off")


def decoded_bytes(info: DatasetInfo, splits: tuple[str, ...] = ("train", "val")) -> int:
    """Estimated uint8 bytes of the named splits decoded at the data set's image size."""
    n = sum(info.split(s).num_samples for s in splits if s in info.splits)
    return n * 3 * info.image_size**2


def use_memory(info: DatasetInfo, mode: str, run_samples: int | None = None) -> bool:
    """Whether to read the data into memory: "on", "off", or "auto": when it fits and the run
    reads at least as many training samples as the split holds (reading the split costs what
    streaming one epoch costs, so a shorter run streams)."""
    if mode not in IN_MEMORY_CHOICES:
        raise ValueError(f"in_memory={mode!r}; expected one of {IN_MEMORY_CHOICES}")
    if mode == "auto":
        reused = run_samples is None or run_samples >= info.split("train").num_samples
        return decoded_bytes(info) <= MEMORY_LIMIT_BYTES and reused
    return mode == "on"


def read_split(info: DatasetInfo, split: str, decode: Decode, *, crop: bool
               ) -> tuple[torch.Tensor, torch.Tensor, list[str], int]:
    """(images uint8 (N, 3, H, W), labels (N,), keys, corrupt samples skipped) of a split, in
    shard order. crop=False keeps the stored pixels (all images must share one size); True
    applies the eval centre crop and resize to decode.image_size."""
    images, labels, keys, skipped, shapes = [], [], [], 0, set()
    pixels = (lambda sample: decode.image(sample, None)) if crop else decode.stored_image
    sp = info.split(split)
    for sample in checked_samples(sp.urls, shard_counts(sp)):
        label = decode.label(sample)
        image = pixels(sample) if label is not None else None
        if image is None:
            skipped += 1
            continue
        shapes.add(image.shape)
        images.append(image), labels.append(label), keys.append(sample["__key__"])
    if not images:
        raise DataError(f"{info.root}: split {split!r} has no readable samples")
    if len(shapes) > 1:
        raise MixedSizes(f"{info.root}: split {split!r} holds images of {len(shapes)} sizes "
                         f"(e.g. {sorted(shapes)[:3]}); in-memory data needs one size: use "
                         "--in-memory off")
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return pixels, torch.tensor(labels, dtype=torch.int64), keys, skipped


def random_resized_crop_boxes(n: int, width: int, height: int, rng: np.random.Generator,
                              scale: tuple, ratio: tuple, tries: int = 10) -> np.ndarray:
    """(n, 4) crop boxes (x0, y0, x1, y1): `random_resized_crop_box`'s algorithm (10 tries at
    a random area and log-uniform aspect, integer sizes and offsets, else the centre crop of
    the clamped aspect), drawn for n images at once."""
    area = width * height
    target = area * rng.uniform(scale[0], scale[1], (n, tries))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, tries)))
    w, h = np.rint(np.sqrt(target * aspect)), np.rint(np.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.argmax(axis=1)  # the first try that fits
    found = ok[np.arange(n), first]
    w, h = w[np.arange(n), first], h[np.arange(n), first]
    u = rng.random((n, 2))  # uniform integer offsets in [0, width - w] and [0, height - h]
    x0, y0 = np.floor(u[:, 0] * (width - w + 1)), np.floor(u[:, 1] * (height - h + 1))
    fallback = np.asarray(fallback_crop_box(width, height, ratio))
    boxes = np.stack([x0, y0, x0 + w, y0 + h], axis=1)
    boxes[~found] = fallback
    return boxes


class MemoryTrainLoader:
    """TrainLoader's interface (`steps_per_epoch`, `epoch(e, start_step)`) over decoded images."""

    num_workers = 0

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, keys: list[str], *,
                 skipped: int, batch_size: int, rank: int, world_size: int, seed: int,
                 steps_per_epoch: int, image_size: int, augment: Augment):
        self.images, self.labels, self.keys, self.skipped = images, labels, keys, skipped
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.steps_per_epoch = seed, steps_per_epoch
        self.image_size, self.augment = image_size, augment

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _order(self, epoch: int) -> torch.Tensor:
        """The epoch's sample indices: chained permutations of the split, one per pass."""
        n, need = len(self.labels), self.steps_per_epoch * self.batch_size * self.world_size
        passes = []
        for p in range(math.ceil(need / n)):
            g = torch.Generator().manual_seed(stream_seed(self.seed, epoch, p, 3) & (2**63 - 1))
            passes.append(torch.randperm(n, generator=g))
        return torch.cat(passes)[:need]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """Batches start_step .. steps_per_epoch - 1 of `epoch` for this rank."""
        if epoch < 0 or not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"epoch={epoch}, start_step={start_step}; expected epoch >= 0 and "
                             f"0 <= start_step <= steps_per_epoch={self.steps_per_epoch}")
        order, aug, (h, w) = self._order(epoch), self.augment, self.images.shape[-2:]
        per_step = self.batch_size * self.world_size
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for k in range(start_step, self.steps_per_epoch):
            # the global batch and its augmentation depend on (seed, epoch, k) only
            rng = np.random.default_rng(stream_seed(self.seed, epoch, k, 4))
            boxes = random_resized_crop_boxes(per_step, w, h, rng, aug.scale, aug.ratio)
            flips = (rng.random(per_step) < 0.5) & aug.hflip
            idx = order[k * per_step:(k + 1) * per_step][mine]
            yield {"image": self.images[idx], "label": self.labels[idx],
                   "crop_box": torch.from_numpy(boxes[mine]),
                   "flip": torch.from_numpy(flips[mine]),
                   # every rank read the whole split: rank 0 reports its skips, once
                   "skipped": self.skipped if (epoch, k, self.rank) == (0, 0, 0) else 0,
                   "key": [self.keys[i] for i in idx.tolist()]}


class MemoryEvalLoader:
    """EvalLoader's interface: this rank's share of a split, centre-cropped once, in batches."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, keys: list[str], *,
                 skipped: int, batch_size: int, rank: int, world_size: int, augment: Augment):
        self.images, self.labels = images[rank::world_size], labels[rank::world_size]
        self.keys = keys[rank::world_size]
        self.skipped = len(range(rank, skipped, world_size))  # each skip counted on one rank
        self.batch_size, self.augment = batch_size, augment
        self.num_samples = len(self.labels)

    def __iter__(self) -> Iterator[dict]:
        for i, lo in enumerate(range(0, max(self.num_samples, 1), self.batch_size)):
            sl = slice(lo, lo + self.batch_size)
            yield {"image": self.images[sl], "label": self.labels[sl],
                   "skipped": self.skipped if i == 0 else 0, "key": self.keys[sl]}


def make_memory_train_loader(info: DatasetInfo | str | os.PathLike, *, image_size: int,
                             batch_size: int, rank: int, world_size: int, seed: int,
                             samples_per_epoch: int | None = None, strict: bool = False,
                             augment: Augment | None = None, split: str = "train",
                             steps_per_epoch: int | None = None) -> MemoryTrainLoader:
    """make_train_loader's counterpart for data read into memory (module doc), with its
    epoch length (steps_per_epoch, or samples_per_epoch, or the split)."""
    check_loader_args(batch_size, rank, world_size, 0, image_size)
    info = as_info(info)
    steps = epoch_length(info.split(split).num_samples, batch_size, world_size,
                         samples_per_epoch, steps_per_epoch)
    aug = augment or default_augment(info.source)
    decode = make_decode(info, image_size, aug, strict)
    images, labels, keys, skipped = read_split(info, split, decode, crop=False)
    return MemoryTrainLoader(images, labels, keys, skipped=skipped, batch_size=batch_size,
                             rank=rank, world_size=world_size, seed=seed, steps_per_epoch=steps,
                             image_size=image_size, augment=aug)


def make_memory_eval_loader(info: DatasetInfo | str | os.PathLike, *, image_size: int,
                            batch_size: int, rank: int, world_size: int, strict: bool = False,
                            split: str = "val", augment: Augment | None = None) -> MemoryEvalLoader:
    """make_eval_loader's counterpart for data read into memory (module doc)."""
    check_loader_args(batch_size, rank, world_size, 0, image_size)
    info = as_info(info)
    aug = augment or default_augment(info.source)
    decode = make_decode(info, image_size, aug, strict)
    images, labels, keys, skipped = read_split(info, split, decode, crop=True)
    return MemoryEvalLoader(images, labels, keys, skipped=skipped, batch_size=batch_size,
                            rank=rank, world_size=world_size, augment=aug)

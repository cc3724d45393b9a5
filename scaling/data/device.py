"""The training device's half of the input path: a loader's batch from the host copy to the
model's input.

The copy (pinned, one batch ahead), JPEG decoding with `--decode-on device`, in-memory crops,
normalisation and seeded mixup/cutmix run here, on the device the model trains on, as in timm's
and DeiT's loops: a GPU does them in microseconds, where host cores cap a large model's MFU.
Spec and figures: docs/data.md, "On the device".
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from scaling.data.info import DataError
from scaling.data.samples import DECODE_ERRORS
from scaling.data.transforms import Augment, apply_crop, collate_uint8, mixup_cutmix

MOVED = ("image", "label")  # batch entries the device reads; boxes and flips stay on the host


def normalize(images: torch.Tensor, aug: Augment) -> torch.Tensor:
    """uint8 or float (B, 3, H, W) in 0..255 -> float32 normalised by the augment's mean/std,
    on the images' device."""
    mean, inv_std = _stats(aug, images.device)
    x = images.float()  # a new tensor for uint8 input: normalised in place, one pass fewer
    return (x.sub_(mean) if x is not images else x - mean).mul_(inv_std)


@functools.lru_cache(maxsize=8)
def _stats(aug: Augment, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(aug.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
    std = torch.tensor(aug.std, dtype=torch.float32).view(1, 3, 1, 1) * 255
    return mean.to(device), (1 / std).to(device)


def crop_batch(images: torch.Tensor, boxes: np.ndarray, flips: np.ndarray,
               size: int) -> torch.Tensor:
    """Crop each image to its box (x0, y0, x1, y1 in pixel-edge coordinates), resize it to
    size x size bilinearly, and mirror it where flips says: one grid_sample for the batch, on
    the images' device; float32 in the images' range."""
    n, _, h, w = images.shape
    box = np.asarray(boxes, dtype=np.float32)  # (B, 4); the grid is built in numpy (fast here)
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size  # output pixel centres
    xs = box[:, :1] + centres * (box[:, 2:3] - box[:, :1])  # (B, size), source x
    ys = box[:, 1:2] + centres * (box[:, 3:4] - box[:, 1:2])
    xs = np.where(np.asarray(flips, dtype=bool)[:, None], xs[:, ::-1], xs)
    # grid_sample with align_corners=False: -1 and 1 are the outer edges of the image
    grid = np.empty((n, size, size, 2), dtype=np.float32)
    grid[..., 0] = (2 * xs / w - 1)[:, None, :]
    grid[..., 1] = (2 * ys / h - 1)[:, :, None]
    return F.grid_sample(images.float(), torch.from_numpy(grid).to(images.device),
                         mode="bilinear", padding_mode="border", align_corners=False)


@dataclass(frozen=True)
class Mixing:
    """Mixup/cutmix and label smoothing of a run (DeiT recipe when all are on)."""

    num_classes: int
    seed: int
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    label_smoothing: float = 0.0

    def apply(self, x: torch.Tensor, y: torch.Tensor, step: int, rank: int,
              micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, targets) of one micro-batch: class indices as they are when nothing mixes
        or smooths, else soft targets."""
        if not (self.mixup_alpha or self.cutmix_alpha or self.label_smoothing):
            return x, y
        # A generator seeded by (seed, step, rank, micro-batch): resume-exact, no state to save.
        g = torch.Generator().manual_seed(
            hash((self.seed, step, rank, micro)) & 0x7FFF_FFFF_FFFF_FFFF)
        return mixup_cutmix(x, y, self.num_classes, mixup_alpha=self.mixup_alpha,
                            cutmix_alpha=self.cutmix_alpha,
                            label_smoothing=self.label_smoothing, generator=g)


class DeviceInputs:
    """Turns a loader's batches into model inputs on `device` (module doc)."""

    def __init__(self, device: torch.device, aug: Augment, image_size: int, *,
                 strict: bool = False, jpeg_draft: bool = True):
        self.device, self.aug, self.image_size = device, aug, image_size
        self.strict, self.jpeg_draft = strict, jpeg_draft
        self.cuda = device.type == "cuda"

    # -- copy -----------------------------------------------------------------------------
    def feed(self, items: Iterator[tuple[dict, int]]) -> Iterator[tuple[dict, int]]:
        """(batch, n) pairs with the batch's tensors on the device. On CUDA each copy is issued
        on a side stream one item ahead of the one handed out, so it overlaps the step."""
        if not self.cuda:
            yield from items
            return
        side, ahead = torch.cuda.Stream(self.device), None
        for batch, n in items:
            with torch.cuda.stream(side):
                moved = {k: (v if k not in MOVED else _pinned(v).to(self.device,
                                                                   non_blocking=True))
                         for k, v in batch.items()}
            done = side.record_event()
            if ahead is not None:
                yield self._ready(*ahead)
            ahead = (moved, n, done)
        if ahead is not None:
            yield self._ready(*ahead)

    def _ready(self, batch: dict, n: int, done) -> tuple[dict, int]:
        """The batch usable on the current stream: it waits for the copy, and the caching
        allocator keeps the copied memory until the current stream is done with it."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        for k in MOVED:
            if k in batch:
                batch[k].record_stream(current)
        return batch, n

    # -- pixels ---------------------------------------------------------------------------
    def pixels(self, batch: dict, *, refill: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(float32 (B, 3, S, S) in 0..255, labels, corrupt images found here) on the device.
        Decodes "jpeg" batches (a corrupt one refilled from the batch when `refill`, as the
        train workers do, else dropped, as eval does) and crops in-memory ones ("crop_box")."""
        labels = batch["label"].to(self.device)
        if "jpeg" in batch:
            images, keep = self._decode(batch["jpeg"], batch["crop_box"], batch["flip"])
            bad = len(keep) - sum(keep)
            if bad:
                # the batch's last `skipped` slots are the workers' refills (header failures)
                tail = batch["skipped"] if refill else 0
                images, labels = self._refill(images, labels, keep, tail, refill)
            return images, labels, bad
        images = batch["image"].to(self.device)
        if "crop_box" in batch:
            return crop_batch(images, batch["crop_box"].numpy(), batch["flip"].numpy(),
                              self.image_size), labels, 0
        return images.float(), labels, 0

    def _refill(self, images: torch.Tensor, labels: torch.Tensor, keep: list[bool], tail: int,
                refill: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop the corrupt images; with `refill`, the batch the workers would have made: the
        good ones among the slots before the workers' own `tail` refills, in order, then
        copies of them for every slot short (scaling.data.loader's rule)."""
        head = len(keep) - tail
        good = torch.tensor([i for i, ok in enumerate(keep[:head]) if ok], dtype=torch.int64)
        if len(good) == 0 and refill:
            raise DataError(f"all {len(keep)} images of a batch are corrupt")
        if refill:  # the k-th refill copies the k-th slot of the growing batch: cyclic
            good = torch.cat([good, good[torch.arange(len(keep) - len(good)) % len(good)]])
        return images[good.to(self.device)], labels[good.to(labels.device)]

    def _decode(self, jpegs: list[bytes], boxes: torch.Tensor,
                flips: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """(float32 (B, 3, S, S) with corrupt slots zero, which images decoded)."""
        if self.cuda:
            return self._decode_cuda(jpegs, boxes, flips)
        arrays = [self._decode_host(d, tuple(b), bool(f))
                  for d, b, f in zip(jpegs, boxes.tolist(), flips.tolist())]
        keep = [a is not None for a in arrays]
        size = self.image_size
        fill = np.zeros((size, size, 3), np.uint8)
        images = collate_uint8([fill if a is None else a for a in arrays])
        return images.to(self.device).float(), keep

    def _decode_host(self, data: bytes, box: tuple, flip: bool) -> np.ndarray | None:
        """One image decoded and cropped as the workers would; None when corrupt (DataError
        when strict)."""
        try:
            return apply_crop(Image.open(io.BytesIO(data)), data, box, flip, self.image_size,
                              self.aug, draft=self.jpeg_draft, rows=not self.strict)
        except DECODE_ERRORS as e:
            if self.strict:
                raise DataError(f"corrupt image decoded on the device: {e}") from e
            return None

    def _decode_cuda(self, jpegs: list[bytes], boxes: torch.Tensor,
                     flips: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """nvJPEG for the JPEGs (one batched call; one by one to find a corrupt image when it
        fails), the host decoder for other formats; roi_align crops and resizes each box."""
        io_, ops = _torchvision()
        size, n = self.image_size, len(jpegs)
        out = torch.zeros(n, 3, size, size, dtype=torch.float32, device=self.device)
        keep = [True] * n
        is_jpeg = [d[:2] == b"\xff\xd8" for d in jpegs]
        idx = [i for i in range(n) if is_jpeg[i]]
        data = [torch.frombuffer(bytearray(jpegs[i]), dtype=torch.uint8) for i in idx]
        try:
            decoded = io_.decode_jpeg(data, mode=io_.ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            decoded = [_one_jpeg(io_, d, self.device) for d in data]
        for i, img in zip(idx, decoded):
            if img is None:
                keep[i] = False
                if self.strict:
                    raise DataError(f"corrupt JPEG in the batch (image {i}; nvJPEG refused it)")
                continue
            roi = torch.tensor([[0.0, *boxes[i].tolist()]], device=self.device)
            crop = ops.roi_align(img[None].float(), roi, output_size=size, spatial_scale=1.0,
                                 sampling_ratio=-1, aligned=True)[0]
            out[i] = crop.flip(-1) if flips[i] else crop
        for i in (i for i in range(n) if not is_jpeg[i]):  # PNG and others: host decoder
            array = self._decode_host(jpegs[i], tuple(boxes[i].tolist()), bool(flips[i]))
            keep[i] = array is not None
            if array is not None:
                out[i] = torch.from_numpy(array.copy()).permute(2, 0, 1).to(self.device)
        return out, keep

    # -- model inputs ---------------------------------------------------------------------
    def train_inputs(self, batch: dict, *, micro_batch: int, mixing: Mixing, step: int,
                     rank: int, rows: slice | None = None
                     ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """(micro-batches of (normalised float32 images, targets), corrupt images found here)
        of one optimizer step; `rows`: this rank's slice of a global batch."""
        images, labels, bad = self.pixels(batch, refill=True)
        if rows is not None:
            images, labels = images[rows], labels[rows]
        images = normalize(images, self.aug)
        return [mixing.apply(x, y, step, rank, i) for i, (x, y) in enumerate(
            zip(images.split(micro_batch), labels.split(micro_batch)))], bad

    def eval_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised float32 images, labels) of an eval batch, corrupt images dropped."""
        images, labels, _ = self.pixels(batch, refill=False)
        return normalize(images, self.aug), labels


def _pinned(t: torch.Tensor) -> torch.Tensor:
    """`t` in page-locked memory (the DataLoader's pin thread does it for streamed batches;
    in-memory batches are pinned here), so the copy can be asynchronous."""
    return t if t.is_pinned() else t.pin_memory()


def _one_jpeg(io_, data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return io_.decode_jpeg(data, mode=io_.ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


@functools.lru_cache(maxsize=1)
def _torchvision():
    """(torchvision.io, torchvision.ops): the GPU decoder is optional (CUDA builds of torch
    come with a matching torchvision); DataError in one line where it is missing."""
    try:
        import torchvision.io as io_
        from torchvision import ops
    except ImportError as e:
        raise DataError(f"--decode-on device on CUDA needs torchvision (nvJPEG): {e}; install "
                        "the torchvision build matching your torch, or use --decode-on "
                        "workers") from None
    return io_, ops

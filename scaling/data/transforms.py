"""Image transforms with PIL, numpy and torch only (no torchvision), and DeiT's mixup/cutmix.

Train: random-resized crop + optional flip; eval: resize + centre crop; both one
`Image.resize(..., box=...)` on an image decoded only as far as the box needs (scaling.data.jpeg).
The box and flip are drawn from the stored size alone (`plan_crop`), so encoded bytes can go to
the device; float conversion, normalisation and mixup/cutmix run there (scaling.data.device).
docs/data.md, "Transforms".
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from scaling.data.jpeg import reduce_for_box

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


@dataclass(frozen=True)
class Augment:
    """Train/eval transform settings; defaults are the DeiT ImageNet recipe."""

    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (Inception, DeiT)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect-ratio range, sampled in log space
    hflip: bool = True
    crop_pct: float = 0.875  # eval: resize shorter side to size / crop_pct, centre crop (224/256)
    # bilinear, as big_vision's inception_crop (tf.image.resize) and torchvision's default; DeiT
    # uses bicubic, which costs 2x the resize time (docs/data.md)
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale={self.scale}; expected 0 < lo <= hi <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio={self.ratio}; expected 0 < lo <= hi")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct={self.crop_pct}; expected 0 < crop_pct <= 1")
        if self.interpolation not in RESAMPLE:
            raise ValueError(f"interpolation={self.interpolation!r}; expected {list(RESAMPLE)}")


# Tiny images cannot survive an 8%-area crop: milder crops for the built-in and CIFAR data, no
# flips for digits (a mirrored 2 is not a 2), and evaluation on the whole image.
SOURCE_AUGMENT = {
    "digits": Augment(scale=(0.6, 1.0), hflip=False, crop_pct=1.0),
    "digits-mirror": Augment(scale=(0.6, 1.0), hflip=False, crop_pct=1.0),
    "shapes": Augment(scale=(0.35, 1.0), crop_pct=1.0),
    "cifar10": Augment(scale=(0.25, 1.0), crop_pct=1.0),
    "cifar100": Augment(scale=(0.25, 1.0), crop_pct=1.0),
}


def default_augment(source: str) -> Augment:
    """The transform settings used for a dataset `source` unless the caller passes its own."""
    return SOURCE_AUGMENT.get(source, Augment())


def random_resized_crop_box(width: int, height: int, rng: random.Random, scale: tuple,
                            ratio: tuple) -> tuple[float, float, float, float]:
    """Crop box (x0, y0, x1, y1) of RandomResizedCrop (Szegedy et al. 2015; torchvision's
    algorithm: 10 tries at a random area and log-uniform aspect, else a centre crop)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x0 = rng.randint(0, width - w)
            y0 = rng.randint(0, height - h)
            return x0, y0, x0 + w, y0 + h
    return fallback_crop_box(width, height, ratio)


def fallback_crop_box(width: int, height: int, ratio: tuple) -> tuple[float, float, float, float]:
    """RandomResizedCrop's box when no try fits: the centre crop of the aspect clamped to
    `ratio`."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    x0, y0 = (width - w) / 2, (height - h) / 2
    return x0, y0, x0 + w, y0 + h


def center_crop_box(width: int, height: int, crop_pct: float) -> tuple[float, ...]:
    """Square centre box equal to resizing the shorter side to size / crop_pct, then cropping."""
    side = min(width, height) * crop_pct
    x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side


def plan_crop(width: int, height: int, rng: random.Random | None,
              aug: Augment) -> tuple[tuple[float, ...], bool]:
    """(crop box in stored-image coordinates, mirror or not) of an image of the stored size:
    a random-resized crop, then a flip draw, when `rng` is given (train), else the centre
    crop and no flip (eval). The draws depend on the size only, never on the pixels."""
    if rng is None:
        return center_crop_box(width, height, aug.crop_pct), False
    box = random_resized_crop_box(width, height, rng, aug.scale, aug.ratio)
    return box, bool(aug.hflip and rng.random() < 0.5)


def apply_crop(img: Image.Image, data: bytes, box: tuple[float, ...], flip: bool, size: int,
               aug: Augment, *, draft: bool = True, rows: bool = True) -> np.ndarray:
    """`img` (opened from `data`, not loaded yet) cropped to `box`, resized to (size, size, 3)
    uint8 and mirrored when `flip`; a JPEG decoded at reduced DCT scale (`draft`) and only down
    to the rows the resize reads (`rows`, bit-exact), scaling.data.jpeg."""
    resample = RESAMPLE[aug.interpolation]
    img, box = reduce_for_box(img, data, box, size, resample, draft=draft, rows=rows)
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = img.resize((size, size), resample, box=box)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img)


def decode_crop(data: bytes, size: int, *, rng: random.Random | None, aug: Augment,
                draft: bool = True, rows: bool = True) -> np.ndarray:
    """Decode an encoded image and crop/resize it to (size, size, 3) uint8: a random-resized crop
    and flip when `rng` is given (train), else the centre crop (eval): `plan_crop` on the
    header's size, then `apply_crop`."""
    img = Image.open(io.BytesIO(data))  # reads the header only
    box, flip = plan_crop(*img.size, rng, aug)
    return apply_crop(img, data, box, flip, size, aug, draft=draft, rows=rows)


def collate_uint8(images: list[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) uint8 arrays -> one contiguous uint8 (B, 3, H, W) tensor. In a DataLoader
    worker it lives in shared memory from the start, so sending it to the main process needs
    no further copy (as torch's default_collate does); numpy reads the read-only PIL arrays
    without a copy or a warning."""
    h, w, _ = images[0].shape
    shape = (len(images), 3, h, w)
    if get_worker_info() is None:
        out = torch.empty(shape, dtype=torch.uint8)
    else:
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
        out = torch.tensor([], dtype=torch.uint8).set_(storage).view(shape)
    view = out.numpy()
    for k, image in enumerate(images):
        np.copyto(view[k], image.transpose(2, 0, 1))
    return out


def _cutmix_box(h: int, w: int, lam: float, rng: np.random.Generator) -> tuple[int, ...]:
    """A box of area ~(1 - lam) at a uniform centre, clipped to the image (timm `rand_bbox`)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return y0, y1, x0, x1


def mixup_cutmix(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 label_smoothing: float = 0.1, generator: torch.Generator | None = None,
                 switch_prob: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mixup or cutmix with smoothed soft targets (DeiT recipe, timm `Mixup`, mode=batch).

    Each batch is mixed with its reverse; with both alphas > 0, cutmix is picked with
    probability `switch_prob`. With both alphas 0 it only smooths the labels. Defaults are DeiT's
    (mixup 0.8, cutmix 1.0, smoothing 0.1). `generator` (CPU) makes the draw reproducible.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= label_smoothing < 1:
        raise ValueError(f"mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha}, "
                         f"label_smoothing={label_smoothing}; expected alphas >= 0, 0 <= ls < 1")
    off = label_smoothing / num_classes
    one_hot = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    targets = one_hot.scatter_(1, labels.view(-1, 1), 1.0 - label_smoothing + off)
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return images, targets
    # torch has no seeded Beta sampler: derive a numpy generator from the torch one instead.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    rng = np.random.default_rng(seed)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or rng.random() < switch_prob)
    flipped = images.flip(0)
    if use_cutmix:
        lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
        y0, y1, x0, x1 = _cutmix_box(images.shape[-2], images.shape[-1], lam, rng)
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (images.shape[-2] * images.shape[-1])  # exact area
    else:
        lam = float(rng.beta(mixup_alpha, mixup_alpha))
        images = images * lam + flipped * (1.0 - lam)
    return images, targets * lam + targets.flip(0) * (1.0 - lam)

"""`shapes`: a procedural image-classification dataset, deterministic per (seed, split, index).

Ten classes of shapes and textures with nuisances (position, size, rotation, colours, specks,
noise) that carry no label information, so accuracy keeps rising with model size and compute
instead of saturating at once; `difficulty` (0..1) scales every nuisance. Each sample has its own
generator, so any sample can be made alone, in any order, at any resolution.
Classes and baselines: docs/data.md, "The `shapes` dataset".
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CLASSES = ("circle", "ring", "square", "frame", "triangle", "cross", "star", "stripes",
           "checker", "dots")
SPLIT_IDS = {"train": 0, "val": 1}
CANONICAL_BG, CANONICAL_FG, CANONICAL_RADIUS = 0.15, 0.85, 0.3  # the difficulty-0 image


def _sdf(name: str, u: np.ndarray, v: np.ndarray, freq: float) -> np.ndarray:
    """Approximate signed distance (negative inside) in units of the shape radius."""
    rho = np.hypot(u, v)
    box = np.maximum(np.abs(u), np.abs(v))
    if name == "circle":
        return rho - 1.0
    if name == "ring":
        return np.abs(rho - 0.72) - 0.28
    if name == "square":
        return box - 0.8
    if name == "frame":
        return np.abs(box - 0.66) - 0.22
    if name == "triangle":  # equilateral, circumradius 1: the max of three half-planes
        phis = np.pi / 2 + 2 * np.pi * np.arange(3) / 3
        return np.max([u * np.cos(p) + v * np.sin(p) for p in phis], axis=0) - 0.5
    if name == "cross":
        arm = 0.3
        return np.minimum(np.maximum(np.abs(u) - arm, np.abs(v) - 0.95),
                          np.maximum(np.abs(u) - 0.95, np.abs(v) - arm))
    if name == "star":
        return rho - (0.58 + 0.38 * np.cos(5 * np.arctan2(v, u)))
    region = box - 0.9  # textures fill a square patch; the pattern tells them apart
    w = np.pi * freq
    if name == "stripes":
        pattern = -np.sin(w * u) / w
    elif name == "checker":
        pattern = -np.sin(w * u) * np.sin(w * v) / w
    elif name == "dots":
        cu, cv = (u * freq) % 1.0 - 0.5, (v * freq) % 1.0 - 0.5
        pattern = (np.hypot(cu, cv) - 0.3) / freq
    else:
        raise ValueError(f"unknown shape {name!r}; expected one of {CLASSES}")
    return np.maximum(region, pattern)


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground colours at least 0.35 apart (RGB in [0, 1]), so it stays
    learnable."""
    bg = rng.uniform(0, 1, 3)
    for _ in range(20):
        fg = rng.uniform(0, 1, 3)
        if np.linalg.norm(fg - bg) >= 0.35:
            break
    else:
        fg = 1.0 - bg
    return bg, fg


def _toward(canonical: float, value, k: float):
    """canonical (k = 0) .. value (k = 1), exact at both ends."""
    return canonical * (1.0 - k) + value * k


def render(label: int, size: int, rng: np.random.Generator,
           difficulty: float = 1.0) -> np.ndarray:
    """Draw one sample of class `label` as a (size, size, 3) uint8 array; `difficulty` scales
    the nuisances (module docstring)."""
    k = float(difficulty)
    if not 0.0 <= k <= 1.0:
        raise ValueError(f"difficulty={difficulty!r}; expected 0 <= difficulty <= 1")
    bg, fg = _colours(rng)
    bg, fg = _toward(CANONICAL_BG, bg, k), _toward(CANONICAL_FG, fg, k)
    cx, cy = _toward(0.5, rng.uniform(0.3, 0.7, 2), k)
    radius = _toward(CANONICAL_RADIUS, rng.uniform(0.14, 0.34), k)
    theta = rng.uniform(0, 2 * np.pi) * k
    aspect = np.exp(rng.uniform(-0.2, 0.2) * k)
    freq = rng.uniform(1.5, 3.0)
    t = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centres in [0, 1]
    x, y = t[None, :] - np.float32(cx), t[:, None] - np.float32(cy)
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    u = (x * c + y * s) / np.float32(radius * aspect)
    v = (-x * s + y * c) / np.float32(radius / aspect)
    d = _sdf(CLASSES[label], u, v, freq)
    alpha = np.clip(0.5 - d * radius * size, 0.0, 1.0)  # ~1 px anti-aliased edge
    for _ in range(rng.integers(0, 4)):  # distractor specks, far smaller than any shape
        sx, sy, sr = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.01, 0.05)
        speck = np.clip(0.5 - (np.hypot(t[None, :] - sx, t[:, None] - sy) - sr) * size, 0, 1)
        alpha = np.maximum(alpha, speck * (rng.uniform(0.3, 1.0) * k))
    gx, gy = (rng.normal(0, 0.25, 2) * k).astype(np.float32)
    background = bg.astype(np.float32)[None, None, :] + (gx * x + gy * y)[:, :, None]
    image = background + (fg.astype(np.float32) - background) * alpha[:, :, None]
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    image += noise * np.float32(rng.uniform(0, 0.08) * k)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def make_sample(index: int, *, seed: int, split: str, size: int,
                difficulty: float = 1.0) -> tuple[Image.Image, int]:
    """Sample `index` of a split as (RGB PIL image, label); labels cycle through the classes."""
    label = index % len(CLASSES)
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    return Image.fromarray(render(label, size, rng, difficulty), "RGB"), label

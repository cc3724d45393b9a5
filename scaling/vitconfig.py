"""The one size table and the frozen ViT config: `vit_config("B/16")`, `split_name`.

Torch-free, so that the compute accounting (scaling.flops) and the analysis can read model
shapes without importing torch; scaling.model builds the network from these configs and
re-exports them (`scaling.model.vit_config` is the public name).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

# The one size table: name -> (width, depth, heads, mlp_dim).
# Ti from DeiT (Touvron et al. 2021, Table 1); S/B/L/H from the ViT paper, Table 1 (S as in DeiT);
# M from big_vision (Zhai et al. 2022); s, g, G from "Scaling Vision Transformers" Table 2.
# mu (big_vision's debugging size) and m1..m4 form a micro ladder up to Ti that trains on a CPU
# in seconds to minutes; each rung costs roughly 2.5-4.5x the MACs of the one below.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "mu": (32, 1, 2, 128),
    "m1": (48, 2, 2, 192),
    "m2": (64, 3, 2, 256),
    "m3": (96, 4, 3, 384),
    "m4": (128, 6, 4, 512),
    "Ti": (192, 12, 3, 768),
    "s": (256, 6, 8, 1024),
    "S": (384, 12, 6, 1536),
    "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
    "g": (1408, 40, 16, 6144),
    "G": (1664, 48, 16, 8192),
}
POOLS = ("cls", "gap")


@dataclass(frozen=True)
class ViTConfig:
    """Everything that defines a ViT's shape and regularisation; built by `vit_config`."""

    name: str
    width: int
    depth: int
    heads: int
    mlp_dim: int
    patch_size: int
    image_size: int = 224
    num_classes: int = 1000  # 0: no head, the model returns features (e.g. for a ViTModel)
    in_chans: int = 3
    pool: str = "cls"  # "cls": class token (Eq. 4); "gap": global average pool, no class token
    representation_size: int | None = None  # pre-logits Linear+tanh (paper's pre-training head)
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth, max rate, linear over depth (DeiT)
    ln_eps: float = 1e-6
    zero_init_head: bool = True
    grad_checkpointing: bool = False

    def __post_init__(self):
        _validate(self)

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def num_tokens(self) -> int:
        """Sequence length seen by the encoder: patches plus the class token when pooling by it."""
        return self.num_patches + (1 if self.pool == "cls" else 0)


def _validate(c: ViTConfig) -> None:
    for field in ("width", "depth", "heads", "mlp_dim", "patch_size", "image_size", "in_chans"):
        value = getattr(c, field)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{c.name}: {field} must be a positive integer, got {value!r}")
    if c.image_size % c.patch_size:
        divisors = [p for p in range(1, c.image_size + 1) if c.image_size % p == 0]
        raise ValueError(
            f"{c.name}: patch size {c.patch_size} does not divide image size {c.image_size}; "
            f"valid patch sizes for {c.image_size}px: {divisors}"
        )
    if c.width % c.heads:
        valid = [h for h in range(1, c.width + 1) if c.width % h == 0]
        raise ValueError(
            f"{c.name}: width {c.width} is not divisible by heads={c.heads}; "
            f"valid head counts for width {c.width}: {valid}"
        )
    if c.pool not in POOLS:
        raise ValueError(f"{c.name}: pool={c.pool!r}; valid: {POOLS}")
    if c.num_classes < 0:
        raise ValueError(f"{c.name}: num_classes must be >= 0, got {c.num_classes}")
    for field in ("dropout", "attn_dropout", "drop_path"):
        if not 0.0 <= getattr(c, field) < 1.0:
            raise ValueError(f"{c.name}: {field} must be in [0, 1), got {getattr(c, field)}")


_NAME = re.compile(r"^(?P<size>[A-Za-z][A-Za-z0-9]*)/(?P<patch>\d+)$")


def split_name(name: str) -> tuple[str, int]:
    """("B", 16) for "B/16"; ValueError naming the valid sizes for anything else."""
    match = _NAME.match(name.strip()) if isinstance(name, str) else None
    if not match or match["size"] not in SIZES:
        shown = name if match is None else match["size"]
        raise ValueError(
            f"unknown ViT name {shown!r}: expected SIZE/PATCH with SIZE one of "
            f"{list(SIZES)} (e.g. 'B/16', 'Ti/4', 'mu/4')"
        )
    return match["size"], int(match["patch"])


def vit_config(name: str, *, image_size: int = 224, num_classes: int = 1000,
               **overrides) -> ViTConfig:
    """Decode a name like "B/16" or "mu/4" into a frozen config; keyword overrides win."""
    size, patch = split_name(name)
    width, depth, heads, mlp_dim = SIZES[size]
    fields = dict(
        name=f"{size}/{patch}", width=width, depth=depth, heads=heads, mlp_dim=mlp_dim,
        patch_size=patch, image_size=image_size, num_classes=num_classes,
    )
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ViTConfig)}
    if unknown:
        valid = sorted(f.name for f in dataclasses.fields(ViTConfig))
        raise ValueError(f"unknown ViT config field(s) {sorted(unknown)}; valid: {valid}")
    fields.update(overrides)
    return ViTConfig(**fields)

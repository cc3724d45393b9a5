"""Analytic parameter counts, forward MACs, training FLOPs, accelerator peaks and MFU, counted so
that our figures line up with published tables (fvcore's MACs; training FLOPs = 6 x MACs x
images, Kaplan et al. 2020, Sec. 2.1; MFU as in PaLM, Chowdhery et al. 2022, Appendix B).
Conventions and checked figures: README.md ("Compute accounting").
"""

from __future__ import annotations

from scaling.vitconfig import ViTConfig, vit_config

LN_MACS_PER_ELEMENT = 5  # fvcore's LayerNorm count (mean, variance, normalise, scale, shift)
# Training FLOPs per forward MAC per image: a MAC is 2 FLOPs, backward costs twice the forward
# (Kaplan et al. 2020, Sec. 2.1; the ViT paper's Table 6 compute is this product). A float, so
# that every FLOPs count is one (JSON writes 1.2e+16, never a long integer).
FLOPS_PER_MAC_TRAINING = 6.0

# Peak dense bf16 tensor-core TFLOP/s per device, from the vendors' data sheets (no sparsity).
PEAK_TFLOPS_BF16 = {
    "A100": 312.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H200": 989.0,
}


def _config(config: ViTConfig | str) -> ViTConfig:
    return vit_config(config) if isinstance(config, str) else config


def param_count(config: ViTConfig | str) -> int:
    """Exact number of parameters of create_model(config), computed from the shapes alone."""
    c = _config(config)
    d, m = c.width, c.mlp_dim
    patch = c.in_chans * c.patch_size**2 * d + d
    tokens = (1 if c.pool == "cls" else 0) * d + c.num_tokens * d  # class token + position emb.
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * m + m) + (m * d + d)
    feat = c.representation_size or d
    pre_logits = (d * feat + feat) if c.representation_size else 0
    head = (feat * c.num_classes + c.num_classes) if c.num_classes else 0
    return patch + tokens + c.depth * block + 2 * d + pre_logits + head


def macs_breakdown(config: ViTConfig | str, *, executed: bool = False) -> dict[str, int]:
    """Forward multiply-accumulates per image, by part (see the module docstring).

    By default the model's FLOPs: every block on every token, as published tables count them
    and as budgets and MFU use them. With `executed=True`, what `create_model(config)`
    actually computes: with class-token pooling its last block computes the class token's
    output only (keys and values of every token, one query, projection, MLP and norms for one
    token), and the final LayerNorm runs on that token alone.
    """
    c = _config(config)
    d, m, t = c.width, c.mlp_dim, c.num_tokens
    q = 1 if executed and c.pool == "cls" else t  # tokens the last block computes outputs for
    full = c.depth - 1  # blocks on every token before the last one
    feat = c.representation_size or d
    return {
        "patch_embed": c.num_patches * c.in_chans * c.patch_size**2 * d,
        "qkv": full * t * d * 3 * d + (q * d + t * 2 * d) * d,
        "attention": full * 2 * t * t * d + 2 * q * t * d,  # Q K^T and A V, over heads
        "proj": full * t * d * d + q * d * d,
        "mlp": full * 2 * t * d * m + 2 * q * d * m,
        # two per block plus the final one
        "layernorm": (2 * full * t + t + q + q) * d * LN_MACS_PER_ELEMENT,
        "pre_logits": d * feat if c.representation_size else 0,
        "head": feat * c.num_classes,
    }


def forward_macs(config: ViTConfig | str, *, include_norm: bool = True,
                 executed: bool = False) -> int:
    """Multiply-accumulates of one forward pass on one image (macs_breakdown's `executed`)."""
    parts = macs_breakdown(config, executed=executed)
    if not include_norm:
        parts.pop("layernorm")
    return sum(parts.values())


def training_flops(config: ViTConfig | str, images: float) -> float:
    """FLOPs of training on `images` images: 6 x forward MACs x images (forward + backward)."""
    return flops_for_images(forward_macs(config), images)


def flops_for_images(macs_per_image, images):
    """Training FLOPs of `images` images at `macs_per_image` forward MACs (numbers or arrays)."""
    return FLOPS_PER_MAC_TRAINING * macs_per_image * images


def images_for_flops(flops, macs_per_image):
    """Images that `flops` training FLOPs buy at `macs_per_image` (flops_for_images inverted;
    a float, or an array for arrays: callers round as they need)."""
    return flops / (FLOPS_PER_MAC_TRAINING * macs_per_image)


def peak_tflops(device_name: str | None) -> float | None:
    """Peak dense bf16 TFLOP/s for a device name as torch reports it; None when unknown."""
    if not device_name:
        return None
    name = device_name.upper()
    if "H200" in name or "GH200" in name:
        return PEAK_TFLOPS_BF16["H200"]
    if "H100" in name:
        return PEAK_TFLOPS_BF16["H100 PCIe" if "PCIE" in name else "H100 SXM"]
    if "A100" in name:
        return PEAK_TFLOPS_BF16["A100"]
    return None


def mfu(achieved_flops_per_s: float, peak_tflops_per_device: float | None,
        num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved / (peak x devices); None when the peak is unknown."""
    if not peak_tflops_per_device:
        return None
    return achieved_flops_per_s / (peak_tflops_per_device * 1e12 * num_devices)

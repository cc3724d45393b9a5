"""The benchmark's peers, same shape as ours: Hugging Face transformers'
ViTForImageClassification (SDPA attention) and timm's VisionTransformer (imported only when
asked for: timm needs torchvision, which CPU machines here lack).

Only the shape is matched (width, depth, heads, MLP, patch, resolution, classes, LayerNorm eps,
exact GELU, q/k/v biases, no dropout), so both models hold the same parameters and do the same
FLOPs (checked by `peer_model`); initialisation does not change speed.
"""

from __future__ import annotations

import functools

import torch

from scaling.model import ViTConfig

PEERS = ("transformers", "timm")


def _check_shape(vit: ViTConfig, peer: str) -> None:
    """Both peers model only a class-token head without a pre-logits layer."""
    if vit.pool != "cls" or vit.representation_size or not vit.num_classes:
        raise ValueError(f"{vit.name}: the {peer} peer needs pool='cls', no "
                         "representation_size and num_classes > 0")


def hf_config(vit: ViTConfig):
    """A transformers ViTConfig with the shape of one of ours."""
    from transformers import ViTConfig as HFViTConfig

    _check_shape(vit, "transformers")
    return HFViTConfig(
        hidden_size=vit.width, num_hidden_layers=vit.depth, num_attention_heads=vit.heads,
        intermediate_size=vit.mlp_dim, patch_size=vit.patch_size, image_size=vit.image_size,
        num_channels=vit.in_chans, num_labels=vit.num_classes, layer_norm_eps=vit.ln_eps,
        hidden_act="gelu", qkv_bias=True, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)


class PeerLogits(torch.nn.Module):
    """ViTForImageClassification returning logits, so the step calls it as it calls ours."""

    def __init__(self, vit: ViTConfig):
        super().__init__()
        from transformers import ViTForImageClassification

        # SDPA dispatches to flash / memory-efficient kernels on GPUs, as ours does.
        self.model = ViTForImageClassification._from_config(hf_config(vit),
                                                            attn_implementation="sdpa")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).logits


def timm_model(vit: ViTConfig) -> torch.nn.Module:
    """timm's VisionTransformer with our shape (class token, learned position embeddings,
    pre-LN blocks with q/k/v biases, our LayerNorm eps, exact GELU, no dropout)."""
    from timm.models.vision_transformer import VisionTransformer

    _check_shape(vit, "timm")
    return VisionTransformer(
        img_size=vit.image_size, patch_size=vit.patch_size, in_chans=vit.in_chans,
        num_classes=vit.num_classes, embed_dim=vit.width, depth=vit.depth,
        num_heads=vit.heads, mlp_ratio=vit.mlp_dim / vit.width, qkv_bias=True,
        class_token=True, global_pool="token", drop_rate=0.0, attn_drop_rate=0.0,
        drop_path_rate=0.0, norm_layer=functools.partial(torch.nn.LayerNorm, eps=vit.ln_eps))


def peer_model(name: str, vit: ViTConfig, ours_params: int) -> torch.nn.Module:
    """Build the named peer; raises if its parameter count differs from ours (shape mismatch)."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; valid: {list(PEERS)}")
    model = PeerLogits(vit) if name == "transformers" else timm_model(vit)
    params = sum(p.numel() for p in model.parameters())
    if params != ours_params:
        raise ValueError(f"{vit.name}: {name} peer has {params} parameters, ours "
                         f"{ours_params}: the shapes differ")
    return model

"""The Vision Transformer of Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021).

Plain PyTorch, never torch.distributed or DeepSpeed (the engine wraps it). Eqs. of Sec. 3.1:
  Eq. 1  z0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos     (patch embedding, class token, 1D pos)
  Eq. 2  z'_l = MSA(LN(z_{l-1})) + z_{l-1}                  (pre-LN attention, residual)
  Eq. 3  z_l = MLP(LN(z'_l)) + z'_l                          (pre-LN GELU MLP, residual)
  Eq. 4  y = LN(z_L^0)                                       (final LN, head on the class token)
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# the size table and the config, torch-free so that flops and the analysis need no torch
from scaling.vitconfig import POOLS, SIZES, ViTConfig, split_name, vit_config  # noqa: F401


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection (Eq. 2's MSA)."""

    def __init__(self, c: ViTConfig):
        super().__init__()
        self.heads, self.attn_dropout = c.heads, c.attn_dropout
        self.qkv = nn.Linear(c.width, 3 * c.width, bias=True)
        self.proj = nn.Linear(c.width, c.width)

    def forward(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """Self-attention over x (B, T, D); with `queries`, only the first `queries` tokens
        attend (to all T) and only their outputs are returned: (B, queries, D)."""
        b, t, d = x.shape
        h, dh = self.heads, d // self.heads
        if queries is None:
            # (B, T, 3, H, Dh) -> 3 x (B, H, T, Dh); the output layout (3, heads, head_dim)
            # matches concatenating separate q, k, v projections, which keeps weight conversion
            # a concat. Unbinding before the transpose spares autograd one gradient copy.
            qkv = self.qkv(x).view(b, t, 3, h, dh)
            q, k, v = (z.transpose(1, 2) for z in qkv.unbind(2))
        else:  # the same weights, q projected for the first tokens only
            w, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, :queries], w[:d], bias[:d]).view(b, queries, h, dh).transpose(1, 2)
            kv = F.linear(x, w[d:], bias[d:]).view(b, t, 2, h, dh)
            k, v = (z.transpose(1, 2) for z in kv.unbind(2))
        p = self.attn_dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # flash / mem-efficient on GPU
        return self.proj(x.transpose(1, 2).reshape(b, q.shape[2], d))


class Mlp(nn.Module):
    """Two-layer MLP with GELU (Eq. 3); dropout after each layer as in the paper's Appendix B.1."""

    def __init__(self, c: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.width, c.mlp_dim)
        self.fc2 = nn.Linear(c.mlp_dim, c.width)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: Eq. 2 then Eq. 3, with stochastic depth on each branch."""

    def __init__(self, c: ViTConfig, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.width, eps=c.ln_eps)
        self.attn = Attention(c)
        self.norm2 = nn.LayerNorm(c.width, eps=c.ln_eps)
        self.mlp = Mlp(c)
        self.drop = nn.Dropout(c.dropout)
        self.drop_path = drop_path

    def _residual(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop_path > 0:
            # Stochastic depth (Huang et al. 2016): drop the whole branch per sample, rescale.
            keep = 1.0 - self.drop_path
            mask = x.new_empty(x.shape[0], 1, 1).bernoulli_(keep)
            branch = branch * mask / keep
        return x + branch

    def forward(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """Eq. 2-3 for every token, or only for the first `queries` tokens (their outputs
        depend on all tokens through attention; the other tokens' outputs are not computed)."""
        branch = self.drop(self.attn(self.norm1(x), queries))
        x = self._residual(x if queries is None else x[:, :queries], branch)
        return self._residual(x, self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT (Eq. 1-4) returning logits (B, num_classes), or features when num_classes == 0."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        c = self.config = config
        # Eq. 1: a linear map of flattened PxP patches; a stride-P convolution is that same map.
        self.patch_embed = nn.Conv2d(c.in_chans, c.width, kernel_size=c.patch_size,
                                     stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width)) if c.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_tokens, c.width))
        self.pos_drop = nn.Dropout(c.dropout)
        rates = [c.drop_path * i / max(c.depth - 1, 1) for i in range(c.depth)]
        self.blocks = nn.ModuleList(Block(c, r) for r in rates)
        self.norm = nn.LayerNorm(c.width, eps=c.ln_eps)
        feat = c.representation_size or c.width
        self.pre_logits = nn.Linear(c.width, feat) if c.representation_size else None
        self.head = nn.Linear(feat, c.num_classes) if c.num_classes else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise as the paper's reference code (google-research/vision_transformer) does.

        That JAX code produced the paper's scaling results, so we follow it rather than PyTorch's
        defaults: Xavier-uniform weights for every dense layer (q, k and v each as its own
        width x width matrix), MLP biases ~ N(0, 1e-6), other biases zero, LeCun-normal patch
        embedding, position embedding ~ N(0, 0.02), class token zero, and a zero head so that
        initial logits are 0 and the initial loss is exactly log(num_classes).
        """
        c = self.config
        fan_in = c.in_chans * c.patch_size**2
        nn.init.trunc_normal_(self.patch_embed.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)
        for block in self.blocks:
            for w in block.attn.qkv.weight.chunk(3):
                bound = math.sqrt(6.0 / (2 * c.width))
                w.uniform_(-bound, bound)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.xavier_uniform_(block.attn.proj.weight)
            nn.init.zeros_(block.attn.proj.bias)
            for fc in (block.mlp.fc1, block.mlp.fc2):
                nn.init.xavier_uniform_(fc.weight)
                nn.init.normal_(fc.bias, std=1e-6)
        if self.pre_logits is not None:
            nn.init.xavier_uniform_(self.pre_logits.weight)
            nn.init.zeros_(self.pre_logits.bias)
        if isinstance(self.head, nn.Linear):
            if c.zero_init_head:
                nn.init.zeros_(self.head.weight)
            else:
                nn.init.xavier_uniform_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (besides norms and biases)."""
        return {"pos_embed", "cls_token"}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Eq. 1: patch tokens, class token prepended, position embedding added."""
        c = self.config
        if images.shape[-2:] != (c.image_size, c.image_size):
            raise ValueError(
                f"{c.name} expects {c.image_size}x{c.image_size} images, got "
                f"{tuple(images.shape[-2:])}; use resize_image() to change the resolution"
            )
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder output after the final LayerNorm, pooled: (B, width)."""
        c = self.config
        x = self.embed(images)
        for i, block in enumerate(self.blocks):
            # Eq. 4 reads only the class token of the last block, so that block computes the
            # class token's output alone (keys and values still come from every token): the
            # same logits and gradients as the full block, for ~5/6 of one block's FLOPs less
            # (7% of Ti/S/B at 224px; scaling.flops.macs_breakdown(executed=True)).
            queries = 1 if c.pool == "cls" and i == c.depth - 1 else None
            if c.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, queries, use_reentrant=False)  # recompute in backward
            else:
                x = block(x, queries)
        x = self.norm(x)
        return x[:, 0] if c.pool == "cls" else x.mean(dim=1)  # Eq. 4

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(images)
        if self.pre_logits is not None:
            x = torch.tanh(self.pre_logits(x))
        return self.head(x)

    @torch.no_grad()
    def resize_image(self, image_size: int) -> None:
        """Change the input resolution, interpolating the position embedding (paper Sec. 3.2)."""
        new = dataclasses.replace(self.config, image_size=image_size)
        prefix = 1 if new.pool == "cls" else 0
        resized = resize_pos_embed(self.pos_embed.data, new.grid, num_prefix_tokens=prefix)
        self.pos_embed = nn.Parameter(resized)
        self.config = new


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int, *, num_prefix_tokens: int = 1
                     ) -> torch.Tensor:
    """2D-interpolate a (1, prefix + g*g, D) position embedding to a new_grid x new_grid grid.

    The ViT paper (Sec. 3.2) fine-tunes at higher resolution by "2D interpolation of the
    pre-trained position embeddings, according to their location in the original image"; the
    class token's embedding has no location and is kept as it is. Bicubic, as is common practice.
    """
    prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = math.isqrt(grid_tokens.shape[1])
    if old_grid**2 != grid_tokens.shape[1]:
        raise ValueError(f"position embedding has {grid_tokens.shape[1]} patch tokens, "
                         "not a square grid")
    if old_grid == new_grid:
        return pos_embed.clone()
    d = pos_embed.shape[-1]
    g = grid_tokens.reshape(1, old_grid, old_grid, d).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, d).to(pos_embed.dtype)
    return torch.cat([prefix, g], dim=1)


def create_model(name_or_config: str | ViTConfig, **kw) -> VisionTransformer:
    """Build a ViT from a name ("B/16") plus vit_config keywords, or from a ViTConfig."""
    if isinstance(name_or_config, ViTConfig):
        config = dataclasses.replace(name_or_config, **kw) if kw else name_or_config
    else:
        config = vit_config(name_or_config, **kw)
    return VisionTransformer(config)

"""Convert pretrained ViT state dicts (Hugging Face transformers, timm) into this model's layout.

Both sources implement the same architecture as scaling.model (pre-LN blocks, class token,
learned 1D position embedding, qkv bias); only names differ, and transformers keeps q, k and v
as three matrices where we keep one fused projection (rows ordered q, k, v; heads inside each).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from scaling.model import ViTConfig, create_model

SOURCES = ("transformers", "timm")

# transformers ViTModel / ViTForImageClassification (the latter prefixes the encoder with "vit.").
# Two layouts exist: checkpoints saved by transformers 4.x (all Hub ViT checkpoints, e.g.
# google/vit-base-patch16-224) use "encoder.layer.N.attention.attention.query"; transformers 5.x
# names the same tensors "layers.N.attention.q_proj". Both are accepted.
_HF_BLOCK_RE = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
_HF_BLOCK = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2",
}
_HF_QKV = {
    "attention.attention.query": "q", "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "pooler.dense.weight": "pre_logits.weight",  # ViTModel's pooler: dense + tanh on the cls token
    "pooler.dense.bias": "pre_logits.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
_HF_DROPPED = ("embeddings.mask_token",)  # only used for masked-image-modelling pre-training

# timm VisionTransformer: the same module tree as ours except for a few names.
_TIMM_RENAMES = {
    "patch_embed.proj.": "patch_embed.",
    "fc_norm.": "norm.",  # timm applies its norm after pooling when global_pool="avg"
    "pre_logits.fc.": "pre_logits.",
}


class ConversionError(ValueError):
    """A state dict that cannot be mapped onto the target model; the message lists the keys."""


def _from_transformers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unused = []
    for key, value in sd.items():
        k = key.removeprefix("vit.")
        block = _HF_BLOCK_RE.match(k)
        if k in _HF_DROPPED:
            continue
        if k in _HF_TOP:
            out[_HF_TOP[k]] = value
        elif block and block[2] in _HF_QKV:
            qkv.setdefault((int(block[1]), block[3]), {})[_HF_QKV[block[2]]] = value
        elif block and block[2] in _HF_BLOCK:
            out[f"blocks.{block[1]}.{_HF_BLOCK[block[2]]}.{block[3]}"] = value
        else:
            unused.append(key)
    for (i, kind), parts in sorted(qkv.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            unused.extend(f"layer {i}: {p} projection {kind} (missing)" for p in missing)
            continue
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if unused:
        raise ConversionError(f"transformers state dict has keys with no counterpart: {unused}")
    return out


def _from_timm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        k = key
        for old, new in _TIMM_RENAMES.items():
            if k.startswith(old):
                k = new + k[len(old):]
        out[k] = value
    return out


_CONVERTERS: dict[str, Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "transformers": _from_transformers,
    "timm": _from_timm,
}


def check_state_dict(sd: Mapping[str, torch.Tensor], config: ViTConfig) -> None:
    """Raise ConversionError listing missing, unexpected and mis-shaped keys against config."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in create_model(config).state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(
        f"{k}: got {tuple(sd[k].shape)}, expected {expected[k]}"
        for k in set(sd) & set(expected) if tuple(sd[k].shape) != expected[k]
    )
    if missing or unexpected or shapes:
        problems = [f"missing keys {missing}" if missing else "",
                    f"unexpected keys {unexpected}" if unexpected else "",
                    f"shape mismatches {shapes}" if shapes else ""]
        raise ConversionError(f"state dict does not fit {config.name}: "
                              + "; ".join(p for p in problems if p))


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], source: str, *,
                       config: ViTConfig | None = None) -> dict[str, torch.Tensor]:
    """Map a transformers or timm ViT state dict onto this model's keys.

    With `config`, the result is also checked against create_model(config) and any missing,
    unexpected or mis-shaped key raises ConversionError naming all of them.
    """
    if source not in _CONVERTERS:
        raise ValueError(f"unknown source {source!r}; valid: {list(SOURCES)}")
    out = _CONVERTERS[source](state_dict)
    if config is not None:
        check_state_dict(out, config)
    return out

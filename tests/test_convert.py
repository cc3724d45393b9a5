"""Weight conversion from Hugging Face transformers and timm layouts."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from scaling.convert import ConversionError, convert_state_dict
from scaling.model import create_model, vit_config

WIDTH, DEPTH, HEADS, MLP, PATCH, IMAGE, CLASSES = 64, 3, 2, 256, 4, 16, 5


def _hf_config(**kw):
    return transformers.ViTConfig(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        intermediate_size=MLP, patch_size=PATCH, image_size=IMAGE, num_labels=CLASSES,
        layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, **kw)


def _ours(**kw):
    # m2 has width 64, depth 3, heads 2, mlp 256: the same shape as the HF model above
    assert vit_config("m2/4").width == WIDTH and vit_config("m2/4").depth == DEPTH
    kw = {"image_size": IMAGE, "num_classes": CLASSES, **kw}
    return create_model("m2/4", **kw).eval()


@pytest.fixture(scope="module")
def hf_classifier():
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(_hf_config()).eval()
    with torch.no_grad():  # HF zero-inits nothing useful to test against: randomise everything
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def _pixels(n=3):
    torch.manual_seed(1)
    return torch.randn(n, 3, IMAGE, IMAGE)


def test_transformers_classifier_same_logits(hf_classifier):
    model = _ours()
    sd = convert_state_dict(hf_classifier.state_dict(), "transformers", config=model.config)
    model.load_state_dict(sd, strict=True)
    x = _pixels()
    with torch.no_grad():
        ref = hf_classifier(pixel_values=x).logits
        out = model(x)
    assert ref.abs().max() > 0.1  # a real signal, not zeros
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_transformers_vitmodel_pooler_becomes_pre_logits():
    torch.manual_seed(2)
    hf = transformers.ViTModel(_hf_config(), add_pooling_layer=True).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.05)
    model = _ours(num_classes=0, representation_size=WIDTH)
    model.load_state_dict(convert_state_dict(hf.state_dict(), "transformers"), strict=True)
    x = _pixels()
    with torch.no_grad():
        out = hf(pixel_values=x)
        torch.testing.assert_close(model.forward_features(x), out.last_hidden_state[:, 0],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x), out.pooler_output, atol=1e-5, rtol=0)


# Where each tensor of layer i sits: (transformers 5.x name, transformers 4.x / Hub name).
_HF_NAMES = {
    "q": ("attention.q_proj", "attention.attention.query"),
    "k": ("attention.k_proj", "attention.attention.key"),
    "v": ("attention.v_proj", "attention.attention.value"),
    "o": ("attention.o_proj", "attention.output.dense"),
    "ln1": ("layernorm_before", "layernorm_before"),
    "ln2": ("layernorm_after", "layernorm_after"),
    "fc1": ("mlp.fc1", "intermediate.dense"),
    "fc2": ("mlp.fc2", "output.dense"),
}


def _hf_block(g, i, part, kind):
    v5, v4 = _HF_NAMES[part]
    return g.get(f"layers.{i}.{v5}.{kind}", g.get(f"encoder.layer.{i}.{v4}.{kind}"))


def _hf_top(hf_sd):
    g = {k.removeprefix("vit."): v for k, v in hf_sd.items()}
    return g, {
        "cls_token": g["embeddings.cls_token"],
        "pos_embed": g["embeddings.position_embeddings"],
        "patch.weight": g["embeddings.patch_embeddings.projection.weight"],
        "patch.bias": g["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": g["layernorm.weight"], "norm.bias": g["layernorm.bias"],
        "head.weight": g["classifier.weight"], "head.bias": g["classifier.bias"],
    }


def _legacy_hf_layout(hf_sd):
    """The key layout of transformers 4.x checkpoints (what the Hub's ViT checkpoints hold)."""
    g, top = _hf_top(hf_sd)
    sd = {"vit.embeddings.cls_token": top["cls_token"],
          "vit.embeddings.position_embeddings": top["pos_embed"],
          "vit.embeddings.patch_embeddings.projection.weight": top["patch.weight"],
          "vit.embeddings.patch_embeddings.projection.bias": top["patch.bias"],
          "vit.layernorm.weight": top["norm.weight"], "vit.layernorm.bias": top["norm.bias"],
          "classifier.weight": top["head.weight"], "classifier.bias": top["head.bias"]}
    for i in range(DEPTH):
        for part, (_, v4) in _HF_NAMES.items():
            for kind in ("weight", "bias"):
                sd[f"vit.encoder.layer.{i}.{v4}.{kind}"] = _hf_block(g, i, part, kind)
    return sd


def _timm_layout(hf_sd):
    """A timm VisionTransformer state dict, keyed by timm's documented module names."""
    g, top = _hf_top(hf_sd)
    sd = {"cls_token": top["cls_token"], "pos_embed": top["pos_embed"],
          "patch_embed.proj.weight": top["patch.weight"],
          "patch_embed.proj.bias": top["patch.bias"],
          "norm.weight": top["norm.weight"], "norm.bias": top["norm.bias"],
          "head.weight": top["head.weight"], "head.bias": top["head.bias"]}
    timm_names = {"o": "attn.proj", "ln1": "norm1", "ln2": "norm2", "fc1": "mlp.fc1",
                  "fc2": "mlp.fc2"}
    for i in range(DEPTH):
        for kind in ("weight", "bias"):
            sd[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [_hf_block(g, i, p, kind) for p in "qkv"])
            for part, name in timm_names.items():
                sd[f"blocks.{i}.{name}.{kind}"] = _hf_block(g, i, part, kind)
    return sd


def test_transformers_legacy_layout_same_logits(hf_classifier):
    legacy = _legacy_hf_layout(hf_classifier.state_dict())
    assert "vit.encoder.layer.0.attention.attention.query.weight" in legacy
    model = _ours()
    model.load_state_dict(convert_state_dict(legacy, "transformers"), strict=True)
    x = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf_classifier(pixel_values=x).logits,
                                   atol=1e-5, rtol=0)


def test_timm_layout_same_logits(hf_classifier):
    model = _ours()
    sd = convert_state_dict(_timm_layout(hf_classifier.state_dict()), "timm", config=model.config)
    model.load_state_dict(sd, strict=True)
    x = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf_classifier(pixel_values=x).logits,
                                   atol=1e-5, rtol=0)


def test_missing_and_mismatched_keys_are_listed(hf_classifier):
    sd = dict(_timm_layout(hf_classifier.state_dict()))
    del sd["blocks.1.mlp.fc1.weight"]
    sd["head.weight"] = torch.zeros(7, WIDTH)
    sd["extra.thing"] = torch.zeros(1)
    with pytest.raises(ConversionError) as err:
        convert_state_dict(sd, "timm", config=_ours().config)
    msg = str(err.value)
    assert "blocks.1.mlp.fc1.weight" in msg and "extra.thing" in msg
    assert "head.weight: got (7, 64), expected (5, 64)" in msg


def test_transformers_unknown_and_partial_qkv_keys(hf_classifier):
    sd = _legacy_hf_layout(hf_classifier.state_dict())
    del sd["vit.encoder.layer.0.attention.attention.key.weight"]
    sd["vit.encoder.layer.0.strange.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError) as err:
        convert_state_dict(sd, "transformers")
    assert "layer 0: k projection weight (missing)" in str(err.value)
    assert "vit.encoder.layer.0.strange.weight" in str(err.value)


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown source 'jax'.*transformers.*timm"):
        convert_state_dict({}, "jax")

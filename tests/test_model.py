"""The ViT of scaling.model: sizes, shapes, options, gradients, determinism."""

import csv
import dataclasses
from pathlib import Path

import pytest
import torch

from scaling.model import SIZES, ViTConfig, create_model, resize_pos_embed, vit_config

REFERENCE = Path(__file__).parent / "data" / "vit_sizes.csv"


def _reference_rows():
    with open(REFERENCE) as f:
        return [row for row in csv.DictReader(line for line in f if not line.startswith("#"))]


@pytest.mark.parametrize("row", _reference_rows(), ids=lambda r: r["name"])
def test_exact_parameter_counts_match_reference(row):
    config = vit_config(row["name"])
    assert (config.width, config.depth, config.heads, config.mlp_dim) == (
        int(row["width"]), int(row["depth"]), int(row["heads"]), int(row["mlp"]))
    with torch.device("meta"):  # L and H without allocating memory
        model = create_model(config)
    assert sum(p.numel() for p in model.parameters()) == int(row["params"])


def test_micro_ladder_is_increasing_and_below_ti():
    micro = ["mu", "m1", "m2", "m3", "m4", "Ti"]
    counts = [sum(p.numel() for p in create_model(f"{s}/4", image_size=32,
                                                  num_classes=10).parameters()) for s in micro]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert counts[0] < 20_000  # trains on a CPU in seconds


def test_forward_shapes_and_initial_logits_are_zero():
    model = create_model("mu/4", image_size=32, num_classes=7)
    x = torch.randn(5, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (5, 7)
    assert torch.count_nonzero(logits) == 0  # zero-initialised head: loss starts at log(K)
    assert model.forward_features(x).shape == (5, 32)


def test_features_only_and_pre_logits():
    feats = create_model("mu/4", image_size=16, num_classes=0)
    assert feats(torch.randn(2, 3, 16, 16)).shape == (2, 32)
    pre = create_model("mu/4", image_size=16, num_classes=3, representation_size=24,
                       zero_init_head=False)
    assert pre.pre_logits.out_features == 24
    out = pre(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 3) and torch.count_nonzero(out) > 0


def test_gap_pooling_has_no_class_token():
    cls = create_model("mu/4", image_size=16, num_classes=3)
    gap = create_model("mu/4", image_size=16, num_classes=3, pool="gap")
    assert gap.cls_token is None and gap.pos_embed.shape[1] == 16
    assert cls.cls_token is not None and cls.pos_embed.shape[1] == 17
    n_cls = sum(p.numel() for p in cls.parameters())
    n_gap = sum(p.numel() for p in gap.parameters())
    assert n_cls - n_gap == 2 * 32  # the class token and its position embedding
    x = torch.randn(2, 3, 16, 16)
    gap.eval()
    # GAP pools every token after the final LayerNorm
    manual = gap.norm(torch.stack([gap.blocks[0](gap.embed(x))])[0]).mean(1)
    torch.testing.assert_close(gap.forward_features(x), manual)


def test_gradients_reach_every_parameter():
    model = create_model("m1/4", image_size=16, num_classes=5, zero_init_head=False)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)),
                                             torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reached {name}"


def test_same_seed_same_model_and_output():
    def build():
        torch.manual_seed(3)
        return create_model("m1/4", image_size=16, num_classes=5, zero_init_head=False)
    a, b = build(), build()
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(a(x), b(x))
    torch.manual_seed(4)
    c = create_model("m1/4", image_size=16, num_classes=5, zero_init_head=False)
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)


def test_initialisation_scheme():
    model = create_model("B/16")
    qkv = model.blocks[0].attn.qkv.weight
    bound = (6 / (2 * 768)) ** 0.5  # Xavier-uniform per q/k/v matrix
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(model.cls_token) == 0
    assert torch.count_nonzero(model.head.weight) == 0
    assert model.blocks[0].mlp.fc1.bias.abs().max() < 1e-5


def test_dropout_and_drop_path_train_vs_eval():
    model = create_model("m1/4", image_size=16, num_classes=5, dropout=0.1, drop_path=0.2,
                         zero_init_head=False)
    assert [b.drop_path for b in model.blocks] == pytest.approx([0.0, 0.2])
    x = torch.randn(8, 3, 16, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    first = model(x)
    assert not torch.allclose(first, model(x))


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    plain = create_model("m1/4", image_size=16, num_classes=5, zero_init_head=False)
    ckpt = create_model(plain.config, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    for m in (plain, ckpt):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def _full_forward(model, x):
    """Every block on every token (Eq. 2-3 literally), then Eq. 4 on the class token."""
    z = model.embed(x)
    for block in model.blocks:
        z = block(z)
    return model.head(model.norm(z)[:, 0])


@pytest.mark.parametrize("kw", [dict(), dict(grad_checkpointing=True)])
def test_class_token_only_last_block_equals_full_computation(kw):
    """The last block computes only the class token's output; logits and every gradient equal
    computing it for all tokens (float64, so the comparison is tight)."""
    torch.manual_seed(0)
    model = create_model("m2/4", image_size=16, num_classes=5, zero_init_head=False,
                         **kw).double()
    x, y = torch.randn(3, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 4, 2])
    grads = []
    for forward in (model, lambda images: _full_forward(model, images)):
        model.zero_grad()
        logits = forward(x)
        torch.nn.functional.cross_entropy(logits, y).backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fast, fast_grads), (full, full_grads) = grads
    torch.testing.assert_close(fast, full, rtol=1e-12, atol=1e-12)
    for name, g in full_grads.items():
        torch.testing.assert_close(fast_grads[name], g, rtol=1e-10, atol=1e-12, msg=name)
    # every parameter of the last block still learns (q, k, v rows of the fused projection)
    last = model.blocks[-1].attn.qkv.weight.grad.view(3, -1)
    assert (last.abs().sum(1) > 0).all()


def test_resize_pos_embed_keeps_class_token_and_interpolates():
    model = create_model("mu/4", image_size=16, num_classes=3)
    old = model.pos_embed.detach().clone()
    model.resize_image(32)
    assert model.config.image_size == 32 and model.pos_embed.shape == (1, 1 + 64, 32)
    assert torch.equal(model.pos_embed[:, 0], old[:, 0])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    # a constant grid stays constant; a linear ramp stays monotone
    const = torch.ones(1, 1 + 16, 4)
    torch.testing.assert_close(resize_pos_embed(const, 8), torch.ones(1, 65, 4))
    ramp = torch.arange(4.0).repeat(4).reshape(1, 16, 1)
    out = resize_pos_embed(torch.cat([torch.zeros(1, 1, 1), ramp], 1), 8)[0, 1:, 0].reshape(8, 8)
    assert (out[:, 1:] >= out[:, :-1]).all()
    assert resize_pos_embed(old, 4).shape == old.shape


def test_wrong_image_size_is_a_clear_error():
    model = create_model("mu/4", image_size=16, num_classes=3)
    with pytest.raises(ValueError, match="expects 16x16"):
        model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("name, kwargs, match", [
    ("Q/16", {}, "unknown ViT name 'Q'.*'Ti'.*'B'"),
    ("B16", {}, "unknown ViT name 'B16'.*SIZE/PATCH"),
    ("B/15", {}, "patch size 15 does not divide image size 224.*valid patch sizes"),
    ("B/16", {"heads": 7}, "width 768 is not divisible by heads=7.*valid head counts"),
    ("B/16", {"pool": "max"}, "pool='max'"),
    ("B/16", {"bogus": 1}, r"unknown ViT config field\(s\) \['bogus'\]"),
])
def test_bad_configs_raise_value_error_naming_the_problem(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        vit_config(name, **kwargs)


def test_every_size_in_table_decodes():
    for size in SIZES:
        c = vit_config(f"{size}/16")
        assert isinstance(c, ViTConfig) and c.name == f"{size}/16"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.width = 1

"""Analytic compute accounting against published figures and torch's FLOP counter."""

import csv
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from scaling import flops
from scaling.model import create_model, vit_config

DATA = Path(__file__).parent / "data"


def _rows(name):
    with open(DATA / name) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


@pytest.mark.parametrize("row", _rows("vit_sizes.csv"), ids=lambda r: r["name"])
def test_param_count_and_gmacs_match_published(row):
    config = vit_config(row["name"])
    assert flops.param_count(config) == int(row["params"])
    gmacs = flops.forward_macs(config) / 1e9
    assert gmacs == pytest.approx(float(row["gmacs_fwd"]), rel=0.01)


@pytest.mark.parametrize("name, kw", [
    ("mu/4", dict(image_size=32, num_classes=10)),
    ("m2/8", dict(image_size=64, num_classes=3, pool="gap")),
    ("m1/4", dict(image_size=16, num_classes=5, representation_size=40)),
    ("m3/2", dict(image_size=8, num_classes=0)),
])
def test_param_count_equals_model(name, kw):
    config = vit_config(name, **kw)
    assert flops.param_count(config) == sum(p.numel() for p in create_model(config).parameters())


@pytest.mark.parametrize("name, kw", [
    ("mu/4", dict(image_size=32, num_classes=10)),
    ("m2/8", dict(image_size=64, num_classes=3, pool="gap")),
    ("m1/4", dict(image_size=16, num_classes=5, representation_size=40)),
    ("Ti/16", dict()),
])
def test_forward_flops_equal_torch_flop_counter(name, kw):
    """FlopCounterMode counts 2 FLOPs per MAC of matmuls and convolutions, not LayerNorm; that
    part of our count must agree exactly. It has no formula for the CPU flash-attention kernel,
    so attention runs on the math backend here, whose two bmm calls it does count."""
    config = vit_config(name, **kw)
    model = create_model(config).eval()
    batch = 2
    x = torch.randn(batch, 3, config.image_size, config.image_size)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, \
            torch.no_grad():
        model(x)
    counted = counter.get_total_flops()
    assert counter.get_flop_counts()["Global"].get(torch.ops.aten.bmm, 0) == \
        2 * batch * flops.macs_breakdown(config, executed=True)["attention"]
    assert counted == 2 * batch * flops.forward_macs(config, include_norm=False, executed=True)
    # the model's FLOPs count every token in every block; with class-token pooling the model
    # computes the last block for the class token only, hence fewer executed FLOPs
    fewer = flops.forward_macs(config) > flops.forward_macs(config, executed=True)
    assert fewer == (config.pool == "cls")


def test_training_flops_is_six_macs_per_image():
    c = vit_config("mu/4", image_size=32, num_classes=10)
    assert flops.training_flops(c, 1000) == 6 * 1000 * flops.forward_macs(c)


@pytest.mark.parametrize("row", [r for r in _rows("vit_paper_table6.csv")
                                 if r["name"] in ("ViT-B/16", "ViT-L/16", "ViT-H/14",
                                                  "ViT-B/32", "ViT-L/32")],
                         ids=lambda r: f"{r['name']}x{r['epochs']}")
def test_vit_paper_table6_pretraining_compute(row):
    """ViT paper Table 6: JFT-300M pre-training, 303M images x epochs; B/16 7 epochs = 224 EF."""
    c = vit_config(row["name"].removeprefix("ViT-"))
    exaflops = flops.training_flops(c, 303e6 * int(row["epochs"])) / 1e18
    tolerance = 0.01 if row["name"] in ("ViT-B/16", "ViT-L/16", "ViT-H/14") else 0.03
    assert exaflops == pytest.approx(float(row["exaflops"]), rel=tolerance)


def test_b16_table6_exactly():
    assert flops.training_flops("B/16", 303e6 * 7) / 1e18 == pytest.approx(224, rel=0.01)


@pytest.mark.parametrize("device, peak", [
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA H100 80GB HBM3", 989),
    ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989), ("cpu", None), (None, None),
])
def test_peak_table(device, peak):
    assert flops.peak_tflops(device) == peak


def test_mfu():
    assert flops.mfu(494.5e12, 989) == pytest.approx(0.5)
    assert flops.mfu(312e12, 312, num_devices=2) == pytest.approx(0.5)
    assert flops.mfu(1e12, None) is None

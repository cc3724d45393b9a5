"""The public interface that outside checks call (docs/architecture.md and the README)
exists and behaves as written there."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_vit_config_and_create_model():
    from scaling.model import create_model, vit_config

    config = vit_config("Ti/4", image_size=32, num_classes=10, drop_path=0.1)
    assert (config.width, config.patch_size, config.num_classes) == (192, 4, 10)
    assert config.drop_path == 0.1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.width = 1
    with pytest.raises(ValueError, match="'Ti'"):
        vit_config("Z/16")
    for arg in ("mu/4", vit_config("mu/4", image_size=16, num_classes=3)):
        kw = {"image_size": 16, "num_classes": 3} if isinstance(arg, str) else {}
        model = create_model(arg, **kw)
        assert isinstance(model, torch.nn.Module)
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)


def test_flops_functions():
    from scaling.flops import forward_macs, training_flops
    from scaling.model import vit_config

    c = vit_config("B/16")
    assert abs(forward_macs(c) / 1e9 - 17.58) < 0.01 * 17.58
    assert training_flops(c, 10) == 6 * forward_macs(c) * 10


def test_convert_state_dict_sources():
    from scaling.convert import convert_state_dict
    from scaling.model import create_model

    model = create_model("mu/4", image_size=16, num_classes=3)
    timm_sd = {("patch_embed.proj." + k[len("patch_embed."):]) if k.startswith("patch_embed.")
               else k: v for k, v in model.state_dict().items()}
    create_model("mu/4", image_size=16, num_classes=3).load_state_dict(
        convert_state_dict(timm_sd, "timm"), strict=True)
    with pytest.raises(ValueError):
        convert_state_dict({}, "keras")


def test_fit_saturating_power_law_returns_constants():
    from analysis.fit.law import fit_saturating_power_law

    compute = np.logspace(15, 20, 12)
    error = 0.5 * (compute / 1e15 + 0.3) ** -0.4 + 0.1
    fit = fit_saturating_power_law(compute, error)
    assert {"a", "b", "c", "d"} <= set(fit)
    assert fit["b"] == pytest.approx(0.4, rel=0.05) and fit["c"] == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("cmd, expected", [
    (["-m", "scaling.data.make_shards", "--help"], ["--from", "imagefolder", "cifar", "digits",
                                                    "shapes", "--src", "--out"]),
    (["-m", "scaling.train", "--help"], ["--model", "--data", "--out", "--steps", "--epochs",
                                         "--samples", "--flops", "--zero", "--precision",
                                         "--batch-size", "--image-size", "--seed"]),
    (["launchers/sweep.py", "--help"], ["--sizes", "--gpus", "--preset", "--cluster",
                                        "--dry-run"]),
    (["analysis/plot_scaling.py", "--help"], ["--results", "--out"]),
])
def test_cli_entry_points_exist_with_their_flags(cmd, expected):
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    for flag in expected:
        assert flag in proc.stdout, f"{flag} missing from {' '.join(cmd)}"


def test_readme_commands_and_ci_agree():
    readme = (ROOT / "README.md").read_text()
    for marker in ("<!-- main-command -->", "<!-- test-command -->"):
        block = readme.split(marker, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
        assert block.count("\n") == 0 and block.startswith("pip install torch==2.13.0")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci

"""Every --help option shows a one-line meaning and, where it has one, its default."""

import argparse
import subprocess
import sys

import pytest

from launchers.cli import _parser as sweep_parser
from scaling.config import TrainConfig


def _options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("parser", [TrainConfig.parser(), sweep_parser()], ids=["train", "sweep"])
def test_every_option_has_help_and_shows_its_default(parser):
    formatter = parser._get_formatter()
    for action in _options(parser):
        assert action.help, f"{action.option_strings} has no help text"
        shown = formatter._get_help_string(action)
        if action.default not in (None, False, "") and not action.required:
            assert "default" in shown, f"{action.option_strings} hides its default"


@pytest.mark.parametrize("module, option, default", [
    ("scaling.bench", "--image-size", "(default: 224)"),
    ("scaling.bench", "--num-classes", "(default: 1000)"),
    ("scaling.train", "--lr", "(default: 0.001)"),
    ("scaling.train", "--zero", "(default: 0)"),
    ("scaling.data.make_shards", "--quality", "(default: 95)"),
])
def test_help_text_shows_defaults(module, option, default):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    block = out[out.index(f"  {option} "):]
    block = block[:block.index("\n  -", 1)]
    assert default in " ".join(block.split())

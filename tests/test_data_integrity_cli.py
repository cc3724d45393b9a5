"""make_shards CLI input checks: each bad input is one `make_shards: error:` line, exit code 2,
before any work (nothing is written)."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scaling.data.make_shards", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)


def assert_one_line_error(run: subprocess.CompletedProcess, *needles: str) -> None:
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("make_shards: error: "), run.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def nothing_written(parent: Path, out: Path) -> bool:
    """No OUT, no staging sibling, no lock: the check came before any work."""
    return not out.exists() and not [p for p in parent.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("flags, needles", [
    (["--image-size", "-5"], ["image_size=-5; expected >= 4"]),
    (["--workers", "-3"], ["workers=-3; expected >= 1"]),
    (["--val-fraction", "-0.1"], ["val_fraction=-0.1; expected 0 <= F < 1"]),
    (["--val-fraction", "1"], ["val_fraction=1.0; expected 0 <= F < 1"]),
    (["--num-samples", "0"], ["num_samples=0; expected >= 1"]),
], ids=["image-size", "workers", "val-fraction-neg", "val-fraction-one", "num-samples"])
def test_bad_shapes_flags(tmp_path, flags, needles):
    out = tmp_path / "out"
    assert_one_line_error(cli("--from", "shapes", "--out", str(out), *flags), *needles)
    assert nothing_written(tmp_path, out)


def write_image_tree(root: Path, empty: tuple[str, ...] = ()) -> Path:
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (200, 0, 0)).save(root / name / "a.png")
    for name in empty:
        (root / name / "sub").mkdir(parents=True)  # folders, but no image below
    return root


def test_empty_class_folder_is_an_error(tmp_path):
    src, out = write_image_tree(tmp_path / "src", empty=("emu", "yak")), tmp_path / "out"
    run = cli("--from", "imagefolder", "--src", str(src), "--out", str(out))
    assert_one_line_error(run, "holds no .jpg/.jpeg/.png files in 2 class folder(s)",
                          "['emu', 'yak']")
    assert nothing_written(tmp_path, out)


def test_negative_image_size_for_imagefolder(tmp_path):
    src, out = write_image_tree(tmp_path / "src"), tmp_path / "out"
    run = cli("--from", "imagefolder", "--src", str(src), "--out", str(out), "--image-size", "-5")
    assert_one_line_error(run, "image_size=-5; expected >= 0 (0 keeps the originals)")
    assert nothing_written(tmp_path, out)


def test_out_is_an_existing_file(tmp_path):
    (tmp_path / "out").write_text("precious")
    run = cli("--from", "shapes", "--out", str(tmp_path / "out"), "--num-samples", "10")
    assert_one_line_error(run, f"--out {tmp_path / 'out'} exists and is not a directory")
    assert (tmp_path / "out").read_text() == "precious"


def test_out_with_foreign_files(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README").write_text("mine")
    run = cli("--from", "shapes", "--out", str(tmp_path / "out"), "--num-samples", "10")
    assert_one_line_error(run, "not part of a dataset", "README")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["README"]


def _member(tar: tarfile.TarFile, name: str, obj: dict) -> None:
    data = pickle.dumps(obj, protocol=2)
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tar.addfile(ti, io.BytesIO(data))


def test_cifar_bad_labels_are_summarised(tmp_path):
    rng = np.random.default_rng(0)
    labels = [int(x) for x in rng.integers(0, 10, 3000)]
    labels[5], labels[77], labels[1234] = 10, 12, -1  # three bad values among 3000
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(1, 6):
            batch = labels if i == 1 else labels[:2]
            _member(tar, f"cifar-10-batches-py/data_batch_{i}", {
                b"data": np.zeros((len(batch), 3072), np.uint8), b"labels": batch})
        _member(tar, "cifar-10-batches-py/test_batch", {
            b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
        _member(tar, "cifar-10-batches-py/batches.meta", {
            b"label_names": [f"c{i}".encode() for i in range(10)]})
    out = tmp_path / "out"
    run = cli("--from", "cifar", "--src", str(archive), "--out", str(out))
    assert_one_line_error(run, "split 'train': 3 of 3008 labels outside [0, 10)",
                          "values -1, 10, 12; range -1..12")
    assert len(run.stderr) < 400  # a summary, not the array
    assert nothing_written(tmp_path, out)

"""digits-mirror, the demo's downstream set: only the images the digits set holds out as val,
mirrored, split again; never an image the upstream trains on."""

import pytest

from scaling.data import make_builtin_shards, sources
from scaling.data.make_shards import main


def test_mirror_is_the_held_out_val_split_mirrored():
    up = sources.digits(val_fraction=0.3, seed=0)
    down = sources.digits_mirror(holdout_fraction=0.3, val_fraction=0.5, seed=0)
    held = sorted((a[:, ::-1].tobytes(), y) for a, y in up.items["val"])
    got = sorted((a.tobytes(), y) for s in ("train", "val") for a, y in down.items[s])
    assert got == held  # every held-out image once, mirrored, label kept
    trained = {a[:, ::-1].tobytes() for a, _ in up.items["train"]}
    assert not trained & {a for a, _ in got}
    assert abs(len(down.items["val"]) - len(down.items["train"])) <= 1


def test_built_once_with_its_holdout_recorded(tmp_path):
    info = make_builtin_shards("digits-mirror", tmp_path / "dm", holdout_fraction=0.3,
                               val_fraction=0.5)
    assert info.args["holdout_fraction"] == 0.3 and info.image_size == 8
    assert {s: v.num_samples for s, v in info.splits.items()} == {"train": 269, "val": 270}


@pytest.mark.parametrize("argv, says", [
    (["--from", "digits", "--holdout-fraction", "0.3"], "only applies to digits-mirror"),
    (["--from", "digits-mirror", "--holdout-fraction", "1.5"], "expected 0 < F < 1"),
])
def test_bad_holdout_is_one_line_exit_2(tmp_path, capsys, argv, says):
    assert main(argv + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err

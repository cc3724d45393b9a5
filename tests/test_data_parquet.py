"""Parquet image datasets in the Hugging Face hub layout (`image` struct with `bytes`, `label`)
converted to shards: images and labels round-trip, class names from the hub metadata, a
corrupt row is skipped and recorded (--strict stops)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from scaling.data import DataError, load_dataset_info, make_eval_loader
from scaling.data.make_shards import main as make_shards_main
from scaling.data.make_shards import make_shards
from scaling.data.shardread import checked_samples

NAMES = ["cat", "dog", "emu"]


def png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (10, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path, seeds: list[int], *, row_group: int = 7, bad: int | None = None):
    """A hub-style file: image {bytes, path}, label (ClassLabel names in the metadata)."""
    images = [{"bytes": b"\x89PNG garbage" if s == bad else png(s), "path": f"{s}.png"}
              for s in seeds]
    table = pa.table({"image": images, "label": [s % 3 for s in seeds]})
    features = {"image": {"_type": "Image"},
                "label": {"names": NAMES, "_type": "ClassLabel"}}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), path, row_group_size=row_group)


def shard_images(info, split: str) -> list[tuple[int, bytes]]:
    """(label, PNG bytes) of every sample of a split, read from its shards."""
    sp = info.split(split)
    return sorted((int(s["cls"]), s["png"]) for s in
                  checked_samples(sp.urls, {u: x.num_samples for u, x in zip(sp.urls,
                                                                              sp.shards)}))


def test_parquet_round_trip(tmp_path):
    src = tmp_path / "data"
    src.mkdir()
    write_parquet(src / "train-00000-of-00002.parquet", list(range(30)))
    write_parquet(src / "train-00001-of-00002.parquet", list(range(30, 52)))
    write_parquet(src / "validation-00000-of-00001.parquet", list(range(100, 112)))
    info = make_shards("parquet", tmp_path / "out", src=str(src / "train-*.parquet"),
                       val_src=str(src / "validation-*.parquet"), shard_size=10, workers=2)
    assert info.classes == tuple(NAMES) and info.image_format == "png"
    assert info.split("train").num_samples == 52 and info.split("val").num_samples == 12
    for split, seeds in (("train", range(52)), ("val", range(100, 112))):
        assert shard_images(info, split) == sorted((s % 3, png(s)) for s in seeds)  # bytes kept
    keys = [k for b in make_eval_loader(info, image_size=8, batch_size=5, rank=0, world_size=1,
                                        num_workers=0) for k in b["key"]]
    assert len(keys) == 12
    labels = [x for x, _ in shard_images(info, "train")]
    assert [labels.count(c) for c in range(3)] == [18, 17, 17]


def test_parquet_train_shards_are_shuffled_and_val_split(tmp_path):
    write_parquet(tmp_path / "train.parquet", list(range(40)), row_group=5)
    info = make_shards("parquet", tmp_path / "out", src=str(tmp_path / "train.parquet"),
                       val_fraction=0.25, shard_size=8)
    assert info.split("train").num_samples == 30 and info.split("val").num_samples == 10
    assert sorted(shard_images(info, "train") + shard_images(info, "val")) == sorted(
        (s % 3, png(s)) for s in range(40))
    seed_of = {png(s): s for s in range(40)}
    url = info.split("train").urls[0]
    first = [seed_of[s["png"]] for s in checked_samples([url], {url: 8})]
    assert first != sorted(first)  # shuffled (inside windows of row groups), not in file order
    with pytest.raises(DataError, match="no column 'lbl'"):
        make_shards("parquet", tmp_path / "o2", src=str(tmp_path / "train.parquet"),
                    label_key="lbl")


def test_corrupt_parquet_image_is_skipped_unless_strict(tmp_path, capsys):
    write_parquet(tmp_path / "train.parquet", list(range(12)), bad=5)
    argv = ["--from", "parquet", "--src", str(tmp_path / "train.parquet"), "--out",
            str(tmp_path / "out"), "--val-fraction", "0", "--workers", "1"]
    assert make_shards_main([*argv, "--strict"]) == 2
    assert "row group 0 row 5: not a readable image" in capsys.readouterr().err
    assert make_shards_main(argv) == 0
    assert "skipped 1 unreadable images" in capsys.readouterr().out
    raw = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert raw["skipped"]["count"] == 1 and "row 5" in raw["skipped"]["items"][0]["reason"]
    assert load_dataset_info(tmp_path / "out").split("train").num_samples == 11

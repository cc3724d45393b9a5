"""Existing webdataset shards indexed in place (make_shards --from webdataset) and read by the
loaders: timm and img2dataset layouts written by webdataset.ShardWriter, brace patterns, index
files, mixed image extensions, JSON-field labels, `pipe:` and http:// URLs, training through
the CLI, exactly-once evaluation over 2 ranks, and a missing remote shard."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from scaling.data import DataError, load_dataset_info, make_eval_loader, make_train_loader
from scaling.data import urls as urlmod
from scaling.data.make_shards import main as make_shards_main
from scaling.data.make_shards import make_shards

REPO = Path(__file__).resolve().parents[1]
CLASSES = 5


def encode(seed: int, fmt: str, size=(12, 16)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_timm(root: Path, split: str, shards: int, per_shard: int = 6) -> dict[str, int]:
    """timm/imagenet-1k-wds layout: imagenet1k-{split}-%04d.tar with jpg, cls, json, and an
    _info.json; returns key -> label."""
    root.mkdir(parents=True, exist_ok=True)
    labels = {}
    with wds.ShardWriter(str(root / f"imagenet1k-{split}-%04d.tar"), maxcount=per_shard,
                         verbose=0) as w:
        for i in range(shards * per_shard):
            key, label = f"{split}_{i:05d}", (i * 7) % CLASSES
            labels[key] = label
            w.write({"__key__": key, "jpg": encode(i, "JPEG"), "cls": str(label).encode(),
                     "json": json.dumps({"filename": f"n{label}_{i}.JPEG"}).encode()})
    return labels


def write_img2dataset(root: Path, shards: int, per_shard: int = 5) -> dict[str, int]:
    """img2dataset layout: 00000.tar ... with jpg or webp, txt, json (the label is a field),
    and NNNNN_stats.json; returns key -> label."""
    root.mkdir(parents=True, exist_ok=True)
    labels = {}
    with wds.ShardWriter(str(root / "%05d.tar"), maxcount=per_shard, verbose=0) as w:
        for i in range(shards * per_shard):
            key, label = f"{i // per_shard:05d}{i % per_shard:04d}", (i * 3) % CLASSES
            labels[key] = label
            ext, fmt = ("webp", "WEBP") if i % 2 else ("jpg", "JPEG")
            w.write({"__key__": key, ext: encode(i, fmt), "txt": f"a photo of {label}".encode(),
                     "json": json.dumps({"url": f"http://x/{i}", "meta": {"label": label},
                                         "label": label}).encode()})
    for k in range(shards):
        (root / f"{k:05d}_stats.json").write_text(json.dumps({"count": per_shard,
                                                              "successes": per_shard}))
    return labels


def eval_once(data, labels: dict[str, int], world: int = 2, workers: int = 0) -> None:
    """Over `world` rank loaders, every val sample exactly once, with its label."""
    seen = []
    for rank in range(world):
        el = make_eval_loader(data, image_size=8, batch_size=4, rank=rank, world_size=world,
                              num_workers=workers)
        keys = []
        for b in el:
            keys += b["key"]
            assert [labels[k] for k in b["key"]] == b["label"].tolist()
            assert b["skipped"] == 0
        assert len(keys) == el.num_samples and keys
        seen += keys
    info = load_dataset_info(data, verify=False)
    assert len(seen) == len(set(seen)) == info.split("val").num_samples


def train_cli(data: Path, out: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "scaling.train", "--model", "mu/4",
                          "--image-size", "8", "--data", str(data), "--out", str(out),
                          "--steps", "5", "--num-workers", "0"],
                         capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    final = json.loads((out / "final.json").read_text())
    assert final["status"] == "ok" and final["steps"] == 5 and final["final_top1"] is not None


@pytest.fixture(scope="module")
def timm(tmp_path_factory):
    root = tmp_path_factory.mktemp("timm")
    labels = write_timm(root, "train", 4)
    labels.update(write_timm(root, "validation", 2))
    return root, labels


def test_timm_layout_indexed_in_place_trains_and_evaluates_once(timm, tmp_path):
    root, labels = timm
    out = tmp_path / "in1k"
    before = sorted(p.name for p in root.iterdir())
    info = make_shards("webdataset", out, src=str(root / "imagenet1k-train-{0000..0003}.tar"),
                       val_src=str(root / "imagenet1k-validation-{0000..0001}.tar"), workers=2)
    assert sorted(p.name for p in root.iterdir()) == before  # nothing written next to them
    assert sorted(p.name for p in out.iterdir()) == [".sha256-cache.json", "dataset.json"]
    assert info.num_classes == CLASSES and info.image_size == 12
    assert info.split("train").num_samples == 24 and info.split("val").num_samples == 12
    shard = info.split("train").shards[0]
    assert shard.path == root / "imagenet1k-train-0000.tar" and shard.num_samples == 6
    raw = json.loads((out / "dataset.json").read_text())
    assert raw["format"] == "vit-scaling-shards/2" and raw["index"]["counts_from"] == {"scan": 6}
    assert raw["keys"] == {"image": ["jpg", "jpeg", "png", "webp"], "label": "cls"}
    load_dataset_info(out, verify=True)  # local shards: hashed (the cache was seeded)
    eval_once(out, labels)
    eval_once(out, labels, workers=2)
    train_cli(out, tmp_path / "run")


def test_img2dataset_layout_json_label_mixed_formats_val_from_shards(tmp_path, capsys):
    labels = write_img2dataset(tmp_path / "laion", 4)
    out = tmp_path / "idx"
    assert make_shards_main(["--from", "webdataset", "--src",
                             str(tmp_path / "laion" / "{00000..00003}.tar"), "--out", str(out),
                             "--label-key", "json:meta.label", "--val-fraction", "0.25",
                             "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "train 15 in 3 shards, val 5 in 1 shards" in printed
    raw = json.loads((out / "dataset.json").read_text())
    assert raw["index"]["image_formats"] == {"jpg": 10, "webp": 10}
    assert raw["args"]["val_fraction"] == 0.25 and raw["keys"]["label"] == "json:meta.label"
    eval_once(out, labels)
    tl = make_train_loader(out, image_size=8, batch_size=5, rank=0, world_size=1, seed=0,
                           num_workers=0, shuffle_buffer=8)
    for b in tl.epoch(0):
        assert [labels[k] for k in b["key"]] == b["label"].tolist() and b["skipped"] == 0
    train_cli(out, tmp_path / "run")


def test_one_shard_without_val_src_is_refused(tmp_path, capsys):
    write_img2dataset(tmp_path / "one", 1)
    argv = ["--from", "webdataset", "--src", str(tmp_path / "one" / "00000.tar"),
            "--out", str(tmp_path / "o"), "--label-key", "json:label"]
    assert make_shards_main(argv) == 2
    assert "cannot be split into train and val shards; give --val-src" in capsys.readouterr().err
    assert make_shards_main([*argv, "--val-fraction", "0"]) == 0  # no val: train refuses it
    assert not load_dataset_info(tmp_path / "o").has_split("val")


def test_missing_label_key_and_classes_file(timm, tmp_path):
    root, _ = timm
    src = str(root / "imagenet1k-train-{0000..0003}.tar")
    with pytest.raises(DataError, match=r"none of the first 6 samples has a label 'json:label' "
                                        r"\(members seen: \['cls', 'jpg', 'json'\]\); pass "
                                        r"--label-key"):
        make_shards("webdataset", tmp_path / "a", src=src, label_key="json:label",
                    val_fraction=0.25)
    (tmp_path / "c.txt").write_text("a\nb\nc\n")
    with pytest.raises(DataError, match=r"labels \[3, 4\] outside \[0, 3\)"):
        make_shards("webdataset", tmp_path / "a", src=src, classes=str(tmp_path / "c.txt"),
                    val_fraction=0.25)
    with pytest.raises(DataError, match="matches no file|are missing"):
        make_shards("webdataset", tmp_path / "a", src=str(root / "imagenet1k-x-{0..3}.tar"))


def test_index_files_give_the_counts(timm, tmp_path):
    root, labels = timm
    (tmp_path / "classes.txt").write_text("\n".join(f"n{i}" for i in range(CLASSES)))
    kw = {"src": str(root / "imagenet1k-train-{0000..0003}.tar"),
          "val_src": str(root / "imagenet1k-validation-{0000..0001}.tar"),
          "classes": str(tmp_path / "classes.txt")}
    splits = {s: {"name": s, "num_samples": 6 * n, "shard_lengths": [6] * n,
                  "filenames": [f"imagenet1k-{s}-{i:04d}.tar" for i in range(n)]}
              for s, n in (("train", 4), ("validation", 2))}
    info_json = root / "_info.json"
    info_json.write_text(json.dumps({"name": "imagenet-1k", "splits": splits}))
    try:
        info = make_shards("webdataset", tmp_path / "a", **kw)  # no scan
        raw = json.loads((tmp_path / "a" / "dataset.json").read_text())
        assert raw["index"]["counts_from"] == {"_info.json": 6}
        assert info.classes[0] == "n0" and info.split("train").shards[0].sha256 is None
        eval_once(tmp_path / "a", labels)
        splits["train"]["shard_lengths"][1] = 5  # a stale index
        info_json.write_text(json.dumps({"splits": splits}))
        make_shards("webdataset", tmp_path / "b", **kw)  # trusted without a scan, but ...
        tl = make_train_loader(tmp_path / "b", image_size=8, batch_size=4, rank=0,
                               world_size=1, seed=0, num_workers=0, samples_per_epoch=200)
        with pytest.raises(DataError, match=r"imagenet1k-train-0001\.tar holds more than the "
                                            r"5 samples"):
            list(tl.epoch(0))  # ... every full read checks the count
        with pytest.raises(DataError, match=r"imagenet1k-train-0001\.tar: _info\.json says 5 "
                                            r"samples, the scan counted 6"):
            make_shards("webdataset", tmp_path / "c", **{**kw, "classes": None})
    finally:
        info_json.unlink()


@pytest.mark.parametrize("kind", ["sizes.json", "shardindex.json", "_stats.json"])
def test_other_index_files(tmp_path, kind):
    labels = write_img2dataset(tmp_path / "d", 3)
    names = [f"{k:05d}.tar" for k in range(3)]
    if kind == "sizes.json":
        (tmp_path / "d" / kind).write_text(json.dumps({n: 5 for n in names}))
    elif kind == "shardindex.json":  # wids
        (tmp_path / "d" / kind).write_text(json.dumps({
            "__kind__": "wids-shard-index-v1", "wids_version": 1,
            "shardlist": [{"url": n, "nsamples": 5, "filesize": 1} for n in names]}))
    if kind != "_stats.json":
        for p in (tmp_path / "d").glob("*_stats.json"):
            p.unlink()
    (tmp_path / "c.json").write_text(json.dumps([str(i) for i in range(CLASSES)]))
    make_shards("webdataset", tmp_path / "o", src=str(tmp_path / "d" / "{00000..00002}.tar"),
                label_key="json:label", classes=str(tmp_path / "c.json"), val_fraction=0.34)
    raw = json.loads((tmp_path / "o" / "dataset.json").read_text())
    assert raw["index"]["counts_from"] == {kind: 3}
    eval_once(tmp_path / "o", labels)


def test_pipe_urls_read_like_local_paths_with_exact_resume(timm, tmp_path):
    root, labels = timm
    make_shards("webdataset", tmp_path / "local",
                src=str(root / "imagenet1k-train-{0000..0003}.tar"),
                val_src=str(root / "imagenet1k-validation-{0000..0001}.tar"))
    make_shards("webdataset", tmp_path / "pipe",
                src=f"pipe:cat {root}/imagenet1k-train-{{0000..0003}}.tar",
                val_src=f"pipe:cat {root}/imagenet1k-validation-{{0000..0001}}.tar")
    info = load_dataset_info(tmp_path / "pipe", verify=True)  # pipe: nothing to stat
    assert info.split("train").urls[0] == f"pipe:cat {root}/imagenet1k-train-0000.tar"
    assert info.split("train").shards[0].bytes is not None  # counted during the scan
    kw = {"image_size": 8, "batch_size": 4, "rank": 0, "world_size": 1, "seed": 0,
          "num_workers": 0, "shuffle_buffer": 10}
    via_pipe = list(make_train_loader(info, **kw).epoch(1))
    local = list(make_train_loader(tmp_path / "local", **kw).epoch(1))
    assert [b["key"] for b in via_pipe] == [b["key"] for b in local]
    resumed = list(make_train_loader(info, **kw).epoch(1, start_step=3))
    assert [b["key"] for b in resumed] == [b["key"] for b in via_pipe[3:]]
    eval_once(tmp_path / "pipe", labels)


def test_http_urls(http_dir, tmp_path):
    served, base = http_dir
    labels = write_timm(served, "train", 3)
    labels.update(write_timm(served, "validation", 2))
    info = make_shards("webdataset", tmp_path / "o",
                       src=f"{base}/imagenet1k-train-{{0000..0002}}.tar",
                       val_src=f"{base}/imagenet1k-validation-{{0000..0001}}.tar")
    assert info.split("val").shards[1].path == f"{base}/imagenet1k-validation-0001.tar"
    load_dataset_info(tmp_path / "o", verify=True)  # remote: HEAD sizes, no download
    eval_once(tmp_path / "o", labels)
    tl = make_train_loader(info, image_size=8, batch_size=4, rank=0, world_size=1, seed=0,
                           num_workers=1, samples_per_epoch=12)
    assert sum(len(b["key"]) for b in tl.epoch(0)) == 12


def test_missing_remote_shard_is_a_clear_error_without_retries(http_dir, tmp_path):
    served, base = http_dir
    write_timm(served, "train", 3)
    make_shards("webdataset", tmp_path / "o", src=f"{base}/imagenet1k-train-{{0000..0002}}.tar",
                val_fraction=0.34)
    gone = served / "imagenet1k-train-0001.tar"
    url = f"{base}/{gone.name}"
    gone.unlink()
    with pytest.raises(DataError, match=f"shard {url} listed in .* is missing \\(HTTP 404 File "
                                        "not found\\)"):
        load_dataset_info(tmp_path / "o", verify=True)
    info = load_dataset_info(tmp_path / "o", verify=False)
    split = "train" if url in info.split("train").urls else "val"
    start = time.monotonic()
    with pytest.raises(DataError, match=f"unreadable shard: {url}: HTTP 404 File not found, "
                                        "after 0 of the 6 samples dataset.json lists$"):
        if split == "val":
            list(make_eval_loader(info, image_size=8, batch_size=4, rank=0, world_size=1,
                                  num_workers=0))
        else:
            list(make_train_loader(info, image_size=8, batch_size=4, rank=0, world_size=1,
                                   seed=0, num_workers=0, samples_per_epoch=400).epoch(0))
    assert time.monotonic() - start < 1.0  # a 404 is not retried (1 + 2 + 4 s of back-off)
    with pytest.raises(DataError, match=f"unreadable shard: {url}: HTTP 404 File not found$"):
        make_shards("webdataset", tmp_path / "p",
                    src=f"{base}/imagenet1k-train-{{0000..0002}}.tar", val_fraction=0.34)


def test_unknown_scheme_names_the_backend(tmp_path):
    with pytest.raises(DataError, match=r"no reader for nosuch:// URLs"):
        urlmod.open_url("nosuch://bucket/x.tar")
    assert os.path.isabs(urlmod.normalize("rel/x.tar")) and urlmod.is_local("file:///x.tar")


def test_fsspec_urls(timm, tmp_path):
    """fsspec opens schemes webdataset lacks (s3://, ...): its in-memory file system here."""
    fsspec = pytest.importorskip("fsspec")
    root, labels = timm
    fs = fsspec.filesystem("memory")
    for p in sorted(root.glob("imagenet1k-*.tar")):
        fs.pipe(f"/bucket/{p.name}", p.read_bytes())
    try:
        info = make_shards("webdataset", tmp_path / "o", workers=1,
                           src="memory://bucket/imagenet1k-train-{0000..0003}.tar",
                           val_src="memory://bucket/imagenet1k-validation-{0000..0001}.tar")
        assert info.split("train").shards[0].remote
        load_dataset_info(tmp_path / "o", verify="sha256")  # sizes, and hashes on request
        eval_once(tmp_path / "o", labels)
        fs.pipe("/bucket/imagenet1k-validation-0001.tar", b"x" * 10)
        with pytest.raises(DataError, match=r"imagenet1k-validation-0001\.tar has 10 bytes"):
            load_dataset_info(tmp_path / "o", verify=True)
    finally:
        fs.rm("/bucket", recursive=True)


def test_out_holding_the_shards_is_refused(tmp_path):
    make_shards("shapes", tmp_path / "made", num_samples=30, image_size=8, shard_size=10)
    with pytest.raises(DataError, match="holds the shard .*train-000000.tar: a rebuild replaces"):
        make_shards("webdataset", tmp_path / "made",
                    src=str(tmp_path / "made" / "train-{000000..000002}.tar"), val_fraction=0.34)
    assert load_dataset_info(tmp_path / "made", verify=True).source == "shapes"  # untouched

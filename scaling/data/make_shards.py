"""Write webdataset shards + dataset.json from an ImageFolder tree, CIFAR, parquet, digits or
shapes, or index existing webdataset shards in place (nothing copied). Every source and flag:
docs/data.md, "Making shards" and "Bringing existing datasets".

    python -m scaling.data.make_shards --from shapes --out data/shapes32 --num-samples 20000
    python -m scaling.data.make_shards --from imagefolder --src train/ --val-src val/ --out in1k
    python -m scaling.data.make_shards --from webdataset --src 'in/{0000..1023}.tar' --out in1k
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from scaling.clihelp import DefaultsHelpFormatter
from scaling.data import index, sources, urls
from scaling.data.info import INFO_FILE, DataError, DatasetInfo, load_dataset_info
from scaling.data.writer import (
    Encoding,
    Source,
    build_lock,
    check_out_dir,
    write_dataset,
    write_info,
)

SOURCES = ("imagefolder", "cifar", "parquet", "webdataset", "digits", "digits-mirror",
           "shapes")
EXTERNAL = ("parquet", "webdataset")  # take --image-key, --label-key, --classes
KEY_DEFAULTS = {"webdataset": ("jpg;jpeg;png;webp", "cls"), "parquet": ("image", "label")}
BUILTIN = ("digits", "digits-mirror", "shapes")
HOLDOUT_FRACTION = 0.3  # digits-mirror: the val fraction of the digits set it is drawn from
FORMATS = ("png", "jpg")


def _source_args(source: str, *, src: str | None, val_src: str | None, val_fraction: float,
                 image_size: int | None, image_format: str | None, quality: int, seed: int,
                 num_samples: int | None, shard_size: int,
                 holdout_fraction: float | None = None) -> dict:
    """Validate the arguments and fill per-source defaults; the result goes into dataset.json."""
    if holdout_fraction is not None and source != "digits-mirror":
        raise ValueError(f"holdout_fraction={holdout_fraction} only applies to digits-mirror")
    if source not in SOURCES:
        raise ValueError(f"source={source!r}; expected one of {SOURCES}")
    if (src is None) != (source in BUILTIN):
        need = "needs" if source not in BUILTIN else "takes no"
        raise ValueError(f"source {source!r} {need} --src (got src={src!r})")
    native = {"cifar": 32, "digits": 8, "digits-mirror": 8}.get(source)
    if native and image_size not in (None, native):
        raise ValueError(f"image_size={image_size}: {source} images are {native}px as stored")
    _check_sizes(source, image_size, num_samples, shard_size)
    if source != "cifar" and not val_src and not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}; expected 0 <= F < 1")
    if val_src and source not in ("imagefolder", "parquet"):
        raise ValueError(f"val_src={val_src!r} only applies to imagefolder and parquet")
    if num_samples is not None and source != "shapes":
        raise ValueError(f"num_samples={num_samples} only applies to shapes")
    image_format = image_format or {"imagefolder": "jpg", "parquet": None}.get(source, "png")
    if image_format not in FORMATS + ((None,) if source == "parquet" else ()):
        raise ValueError(f"image_format={image_format!r}; expected one of {FORMATS}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality={quality}; expected 1..100")
    default_size = {"imagefolder": 256, "parquet": 256, "shapes": 32}.get(source, native)
    return {
        "source": source, "src": _abs(src) if src else None,
        "val_src": _abs(val_src) if val_src else None,
        "val_fraction": None if source == "cifar" or val_src else float(val_fraction),
        "image_size": default_size if image_size is None else int(image_size),
        "image_format": image_format, "quality": int(quality), "seed": int(seed),
        "num_samples": (10_000 if num_samples is None else int(num_samples))
        if source == "shapes" else None,
        "shard_size": int(shard_size),
    } | (_holdout(holdout_fraction) if source == "digits-mirror" else {})


def _holdout(fraction: float | None) -> dict:
    """digits-mirror's extra argument: which digits val split it mirrors (checked)."""
    fraction = HOLDOUT_FRACTION if fraction is None else float(fraction)
    if not 0 < fraction < 1:
        raise ValueError(f"holdout_fraction={fraction}; expected 0 < F < 1")
    return {"holdout_fraction": fraction}


def _with_difficulty(args: dict, source: str, difficulty: float | None) -> dict:
    """args plus the shapes `difficulty` (shapes.render), recorded only when it is not 1, so the
    default keeps the arguments, and the datasets, made before the knob existed."""
    if difficulty is None:
        return args
    if source != "shapes":
        raise ValueError(f"difficulty={difficulty} only applies to shapes")
    if not 0 <= difficulty <= 1:
        raise ValueError(f"difficulty={difficulty}; expected 0 <= D <= 1")
    return args if difficulty == 1 else {**args, "difficulty": float(difficulty)}


def _abs(src: str) -> str:
    """A local source path or pattern made absolute (other URLs unchanged)."""
    return urls.normalize(src)


def _external_args(source: str, a: dict, *, image_key: str | None, label_key: str | None,
                   classes: str | None, scan: bool) -> dict:
    """The parquet / webdataset additions to the arguments (keys, classes file, scan)."""
    defaults = KEY_DEFAULTS[source]
    keys = index.parse_keys(image_key or defaults[0], label_key or defaults[1])
    if source == "parquet" and (len(keys.image) != 1 or keys.label.startswith("json:")):
        raise ValueError(f"parquet: --image-key and --label-key are column names (got "
                         f"{image_key!r}, {label_key!r})")
    if scan and source != "webdataset":
        raise ValueError("--scan only applies to webdataset")
    return {**a, "image_keys": list(keys.image), "label_key": keys.label,
            "classes_file": str(Path(classes).expanduser().resolve()) if classes else None,
            **({"scan": bool(scan)} if source == "webdataset" else {})}


def _index_args(*, src: str | None, val_src: str | None, val_fraction: float,
                image_size: int | None, image_format: str | None, num_samples: int | None,
                seed: int) -> dict:
    """Arguments of --from webdataset (shards indexed in place)."""
    if not src:
        raise ValueError("source 'webdataset' needs --src (a shard URL pattern)")
    if image_format is not None or num_samples is not None:
        raise ValueError("webdataset: shards are indexed as they are (no --format, "
                         "--num-samples)")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size={image_size}; expected >= 1 (the recorded resolution)")
    if not val_src and not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}; expected 0 <= F < 1")
    return {"source": "webdataset", "src": _abs(src), "val_src": _abs(val_src) if val_src
            else None, "val_fraction": None if val_src else float(val_fraction),
            "seed": int(seed), "image_size": image_size}


def _check_sizes(source: str, image_size: int | None, num_samples: int | None,
                 shard_size: int) -> None:
    """Range checks of the integer flags (before any work)."""
    least = 4 if source == "shapes" else 0  # imagefolder: 0 keeps the originals
    if image_size is not None and image_size < least:
        raise ValueError(f"image_size={image_size}; expected >= {least}"
                         + (" (0 keeps the originals)" if least == 0 else ""))
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples={num_samples}; expected >= 1")
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}; expected >= 1")


def _check_out(out: Path, workers: int) -> Path:
    """Validate OUT and the worker count before any work; OUT resolved (symlinks followed)."""
    if workers < 1:
        raise ValueError(f"workers={workers}; expected >= 1")
    out = out.expanduser().resolve()
    check_out_dir(out)
    return out


def _build_source(a: dict) -> Source:
    """The Source object for validated arguments."""
    if a["source"] == "parquet":
        from scaling.data.parquet import parquet_source  # pyarrow only for this source

        classes = index.read_classes(a["classes_file"]) if a["classes_file"] else None
        source, fmt = parquet_source(
            a["src"], val_src=a["val_src"], val_fraction=a["val_fraction"] or 0.0,
            seed=a["seed"], image_col=a["image_keys"][0], label_col=a["label_key"],
            classes=classes, image_format=a["image_format"], image_size=a["image_size"],
            shard_size=a["shard_size"])
        a["image_format"] = fmt
        return source
    if a["source"] == "imagefolder":
        return sources.imagefolder(a["src"], val_src=a["val_src"], val_fraction=a["val_fraction"],
                                   seed=a["seed"], image_format=a["image_format"],
                                   image_size=a["image_size"])
    if a["source"] == "cifar":
        return sources.cifar(a["src"], seed=a["seed"])
    if a["source"] == "digits":
        return sources.digits(val_fraction=a["val_fraction"], seed=a["seed"])
    if a["source"] == "digits-mirror":
        return sources.digits_mirror(holdout_fraction=a["holdout_fraction"],
                                     val_fraction=a["val_fraction"], seed=a["seed"])
    return sources.shapes_source(num_samples=a["num_samples"], val_fraction=a["val_fraction"],
                                 seed=a["seed"], image_size=a["image_size"],
                                 difficulty=a.get("difficulty", 1.0))


def make_shards(source: str, out: str | os.PathLike, *, src: str | None = None,
                val_src: str | None = None, val_fraction: float = 0.1,
                image_size: int | None = None, image_format: str | None = None,
                quality: int = 95, seed: int = 0, num_samples: int | None = None,
                shard_size: int = 1000, workers: int = 1, strict: bool = False,
                image_key: str | None = None, label_key: str | None = None,
                classes: str | None = None, scan: bool = False,
                holdout_fraction: float | None = None,
                difficulty: float | None = None) -> DatasetInfo:
    """Write shards of `source` into OUT (replacing what is there) and return its DatasetInfo;
    for "webdataset", write only a dataset.json that indexes the shards where they are."""
    if source not in EXTERNAL and (image_key or label_key or classes or scan):
        raise ValueError(f"--image-key, --label-key, --classes and --scan do not apply to "
                         f"{source!r} (only to {EXTERNAL})")
    if source == "webdataset":
        args = _index_args(src=src, val_src=val_src, val_fraction=val_fraction,
                           image_size=image_size, image_format=image_format,
                           num_samples=num_samples, seed=seed)
    else:
        args = _source_args(source, src=src, val_src=val_src, val_fraction=val_fraction,
                            image_size=image_size, image_format=image_format, quality=quality,
                            seed=seed, num_samples=num_samples, shard_size=shard_size,
                            holdout_fraction=holdout_fraction)
    args = _with_difficulty(args, source, difficulty)
    if source in EXTERNAL:
        args = _external_args(source, args, image_key=image_key, label_key=label_key,
                              classes=classes, scan=scan)
    out = _check_out(Path(out), workers)
    if source == "webdataset":
        keys = index.SampleKeys(tuple(args["image_keys"]), args["label_key"])
        payload, cache = index.build_index(args, keys, workers)  # reads only: no lock yet
        _check_not_inside(out, payload)
        with build_lock(out):
            write_info(out, payload, cache)
        return load_dataset_info(out, verify="size")
    built = _build_source(args)  # lists / reads the input: its errors come before any write
    with build_lock(out):
        return _write(args, out, workers, built, strict)


def _check_not_inside(out: Path, payload: dict) -> None:
    """Indexed shards must not live in OUT: the swap that replaces OUT would delete them."""
    for split in payload["splits"].values():
        for shard in split["shards"]:
            if Path(shard["url"]).is_absolute() and Path(shard["url"]).resolve().is_relative_to(
                    out):
                raise DataError(f"--out {out} holds the shard {shard['url']}: a rebuild "
                                "replaces the whole directory; index into another one")


def _write(args: dict, out: Path, workers: int, source: Source | None = None,
           strict: bool = False) -> DatasetInfo:
    """Build the source (unless given) and write it (caller holds the lock)."""
    source = source or _build_source(args)
    fmt = args["image_format"]
    cap = args["image_size"] if args["source"] in ("imagefolder", "parquet") else 0
    enc = Encoding(image_format=fmt, quality=args["quality"], max_size=cap)
    write_dataset(source, out, enc=enc, shard_size=args["shard_size"], args=args,
                  workers=workers, strict=strict)
    return load_dataset_info(out, verify="size")


def make_builtin_shards(source: str, out: str | os.PathLike, *, image_size: int | None = None,
                        num_samples: int | None = None, val_fraction: float = 0.1,
                        seed: int = 0, image_format: str = "png", shard_size: int = 1000,
                        workers: int = 1, holdout_fraction: float | None = None,
                        difficulty: float | None = None) -> DatasetInfo:
    """Create `digits`, `digits-mirror` or `shapes` shards in OUT, or reuse them if made with
    the same args."""
    if source not in BUILTIN:
        raise ValueError(f"source={source!r}; built-in sources are {BUILTIN}")
    args = _source_args(source, src=None, val_src=None, val_fraction=val_fraction,
                        image_size=image_size, image_format=image_format, quality=95,
                        seed=seed, num_samples=num_samples, shard_size=shard_size,
                        holdout_fraction=holdout_fraction)
    args = _with_difficulty(args, source, difficulty)
    if workers < 1:
        raise ValueError(f"workers={workers}; expected >= 1")
    info = _reusable(Path(out).expanduser().resolve(), args)  # first without the lock: a
    if info is not None:                                     # read-only copy can be reused
        return info
    out = _check_out(Path(out), workers)  # a rebuild replaces OUT: it must hold only data
    with build_lock(out):
        return _reusable(out, args) or _write(args, out, workers)


def _reusable(out: Path, args: dict) -> DatasetInfo | None:
    """The dataset in OUT if it is intact and was made with `args`, else None."""
    if not (out / INFO_FILE).is_file():
        return None
    try:
        info = load_dataset_info(out, verify=True)
    except DataError:
        return None  # damaged: rebuild
    return info if info.args == args else None


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m scaling.data.make_shards", description=__doc__,
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--from", dest="source", required=True, choices=SOURCES)
    p.add_argument("--src", help="ImageFolder train tree, CIFAR tar.gz (or its directory), "
                   "parquet files ('DIR/train-*.parquet'), or webdataset shard URLs "
                   "('DIR/x-{0000..1023}.tar', 'pipe:CMD', 's3://...', 'https://...')")
    p.add_argument("--val-src", help="ImageFolder val tree / parquet files / shard URLs "
                   "(default: split from --src; webdataset: whole shards held out)")
    p.add_argument("--out", required=True, help="output directory (its shards are replaced)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of samples held out as val when there is no --val-src "
                        "(webdataset: share of whole shards, at least one)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--image-size", type=int, default=None,
                   help="shapes: side in px (32); imagefolder, parquet: cap on the shorter "
                        "side (256; 0 keeps originals); webdataset: the recorded resolution "
                        "(median shorter side of sampled images)")
    p.add_argument("--format", dest="image_format", choices=FORMATS, default=None,
                   help="stored encoding (jpg for imagefolder, that of the first image for "
                        "parquet, png otherwise)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--seed", type=int, default=0, help="shuffle / split / generator seed")
    p.add_argument("--num-samples", type=int, default=None, help="shapes: train + val samples")
    p.add_argument("--holdout-fraction", type=float, default=None,
                   help=f"digits-mirror: mirror the val split of digits made with this "
                        f"--val-fraction and the same --seed (default {HOLDOUT_FRACTION})")
    p.add_argument("--difficulty", type=float, default=None,
                   help="shapes: how far each nuisance (colours, position, size, rotation, "
                        "specks, noise) is applied, 0..1 (1, the default: all of it)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="encoding / scanning processes (output does not depend on it)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image instead of skipping and counting it")
    p.add_argument("--image-key", default=None,
                   help="webdataset: image extensions tried in order (jpg;jpeg;png;webp); "
                        "parquet: the image column (image)")
    p.add_argument("--label-key", default=None,
                   help="webdataset: the label member (cls) or json:FIELD; parquet: the label "
                        "column (label)")
    p.add_argument("--classes", default=None,
                   help="webdataset / parquet: class names, one per line or a JSON list "
                        "(default: the labels seen, 0 .. max; parquet: the hub metadata)")
    p.add_argument("--scan", action="store_true",
                   help="webdataset: count by reading every shard even where an index file "
                        "gives the counts")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; bad input exits with code 2 and a one-line message."""
    a = _parse(argv)
    kw = {k: v for k, v in vars(a).items() if k not in ("source", "out")}
    try:
        info = make_shards(a.source, a.out, **kw)
    except (ValueError, OSError) as e:  # DataError is a ValueError
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    print(summary(info))
    return 0


def summary(info: DatasetInfo) -> str:
    """The printed result: splits, and what was skipped or missing."""
    import json

    counts = ", ".join(f"{s.name} {s.num_samples} in {len(s.shards)} shards"
                       for s in info.splits.values())
    lines = [f"{info.root}: {info.source}, {info.num_classes} classes, {counts}"]
    raw = json.loads((info.root / INFO_FILE).read_text())
    skipped = raw.get("skipped") or {}
    if skipped.get("count"):
        shown = "; ".join(f"{s['item']}: {s['reason']}" for s in skipped["items"][:5])
        lines.append(f"skipped {skipped['count']} unreadable images ({INFO_FILE} \"skipped\" "
                     f"lists them): {shown}")
    idx = raw.get("index") or {}
    if idx:
        lines.append(f"indexed in place: counts from {idx['counts_from']}, image formats "
                     f"{idx['image_formats']}, image_size {info.image_size} (sampled shorter "
                     f"sides {idx['image_size_sample']})")
        for what in ("missing_image", "missing_label"):
            if idx.get(what):
                lines.append(f"warning: {idx[what]} samples have no "
                             f"{'image' if what == 'missing_image' else 'label'}; the loaders "
                             "skip and count them")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Readers for the four sources of `make_shards`: imagefolder, cifar, digits and shapes.

Each returns a `writer.Source`: class names, the items of each split in their final order and a
picklable loader (a module-level function or a partial of one, so pool workers can run it).
Training shards are shuffled at write time: loaders read whole shards through a shuffle buffer
(webdataset), and an ImageFolder listed class by class would otherwise fill that buffer with a
single class.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from scaling.data import shapes
from scaling.data.errors import DataError, UnreadableImage
from scaling.data.modes import to_rgb
from scaling.data.writer import Source

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
OPEN_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
CIFAR_ARCHIVES = ("cifar-10-python.tar.gz", "cifar-100-python.tar.gz")


def _split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation of range(n) cut into (train, val) with round(n * val_fraction) val."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}; expected 0 <= F < 1")
    order = np.random.default_rng(seed).permutation(n)
    n_val = round(n * val_fraction)
    return order[n_val:], order[:n_val]


def load_array(item: tuple[np.ndarray, int]) -> tuple[Image.Image, int]:
    """(HxW or HxWx3 uint8 array, label) -> (RGB image, label)."""
    array, label = item
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(array), "RGB"), int(label)


def load_file(item: tuple[str, int], *, image_format: str, max_size: int) -> tuple[Any, int]:
    """(path, label) -> (image, label); keeps the original bytes when they need no re-encoding
    (e.g. ImageNet JPEGs as is: no generation loss), after decoding them in full."""
    path, label = item
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UnreadableImage(f"{path}: not a readable image ({e})") from e
    return load_bytes(data, path, image_format=image_format, max_size=max_size), label


def load_bytes(data: bytes, where: str, *, image_format: str, max_size: int) -> Any:
    """Encoded image -> (ext, bytes, size) kept as is when it needs no re-encoding, else the
    decoded RGB image; UnreadableImage naming `where` when it does not decode in full."""
    try:
        image = Image.open(io.BytesIO(data))
        fmt = {"JPEG": "jpg", "PNG": "png"}.get(image.format)
        if fmt == image_format and image.mode == "RGB" and "transparency" not in image.info \
                and (not max_size or min(image.size) <= max_size):
            size = image.size
            # Decoding is the only check that finds a truncated body behind an intact header
            # (verify() reads headers). The bytes are kept, so decode as small as libjpeg can
            # (1/8 scale, `draft`): it still reads every entropy-coded byte.
            image.draft("RGB", (1, 1))
            image.load()
            return fmt, data, size
        image.load()
        return to_rgb(image)
    except OPEN_ERRORS as e:  # DataError (from to_rgb) is a ValueError
        raise UnreadableImage(f"{where}: not a readable image ({e})") from e


def _list_tree(root: Path, classes: tuple[str, ...] | None) -> tuple[tuple[str, ...], list]:
    """Class names (sorted subfolders) and sorted (path, label) items of an ImageFolder tree."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if classes is None:
        classes = names
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise DataError(f"{root}: class folders {unknown[:5]} are not training classes")
    index = {c: i for i, c in enumerate(classes)}
    per_class = {c: [(str(p), index[c]) for p in sorted((root / c).rglob("*"))
                     if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()] for c in names}
    if not any(per_class.values()):
        raise DataError(f"image folder {root} holds no {'/'.join(IMAGE_SUFFIXES)} files in "
                        f"class subfolders")
    empty = [c for c in names if not per_class[c]]
    if empty:  # an error, not a warning: the class would get an output but never a sample
        raise DataError(f"image folder {root} holds no {'/'.join(IMAGE_SUFFIXES)} files in "
                        f"{len(empty)} class folder(s): {empty[:5]}; remove or fill them")
    return classes, [it for c in names for it in per_class[c]]


def imagefolder(src: str, *, val_src: str | None, val_fraction: float, seed: int,
                image_format: str, image_size: int) -> Source:
    """A tree `src/<class>/*.jpg|png` (ImageNet's train layout); val from `val_src` or a split."""
    classes, items = _list_tree(Path(src), None)
    rng = np.random.default_rng(seed)
    if val_src:
        _, val_items = _list_tree(Path(val_src), classes)
        train = [items[i] for i in rng.permutation(len(items))]
        val = [val_items[i] for i in rng.permutation(len(val_items))]
    else:
        tr, va = _split_indices(len(items), val_fraction, seed)
        train, val = [items[i] for i in tr], [items[i] for i in va]
    load = partial(load_file, image_format=image_format, max_size=image_size)
    return Source("imagefolder", classes, {"train": train, "val": val}, load, image_size)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle CIFAR batches without running arbitrary code: only numpy arrays are allowed."""

    ALLOWED = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
                         ("numpy._core.multiarray", "_reconstruct"), ("numpy", "dtype"),
                         ("_codecs", "encode")})  # protocol-2 bytes written by Python 3

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only the allow-listed globals."""
        if (module, name) not in self.ALLOWED:
            raise DataError(f"CIFAR pickle refers to {module}.{name}; only numpy arrays allowed")
        return super().find_class(module, name)


def _cifar_members(tar: tarfile.TarFile) -> dict[str, dict]:
    """Unpickle every data/meta member of a CIFAR archive, keyed by base name."""
    out = {}
    for m in tar.getmembers():
        base = m.name.rsplit("/", 1)[-1]
        if m.isfile() and (base.startswith(("data_batch", "test", "train")) or "meta" in base):
            out[base] = _NumpyOnlyUnpickler(tar.extractfile(m), encoding="bytes").load()
    return out


def _cifar_arrays(batches: list[dict], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Stack batches into (N, 32, 32, 3) uint8 images (stored channel-major) and labels."""
    data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _check_label_range(labels: np.ndarray, num_classes: int, where: str) -> None:
    """All labels in [0, num_classes), else a one-line summary (not the whole array)."""
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        values = np.unique(bad)
        shown = ", ".join(str(v) for v in values[:5]) + (", ..." if values.size > 5 else "")
        raise DataError(f"{where}: {bad.size} of {labels.size} labels outside "
                        f"[0, {num_classes}) (values {shown}; range {bad.min()}..{bad.max()})")


def _find_cifar(src: str) -> Path:
    """The archive itself, or the one CIFAR archive inside a directory."""
    path = Path(src)
    if path.is_dir():
        found = [path / a for a in CIFAR_ARCHIVES if (path / a).is_file()]
        if len(found) != 1:
            raise DataError(f"{path}: expected exactly one of {CIFAR_ARCHIVES}, found "
                            f"{[p.name for p in found]}")
        path = found[0]
    if not path.is_file():
        raise DataError(f"CIFAR archive {path} does not exist")
    return path


def cifar(src: str, *, seed: int) -> Source:
    """CIFAR-10/100 "python version" tar.gz, read in place; the official test split is val."""
    path = _find_cifar(src)
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = _cifar_members(tar)
    except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise DataError(f"{path}: not a readable CIFAR archive ({e})") from e
    if "batches.meta" in members:  # CIFAR-10
        train_b = [members[k] for k in sorted(members) if k.startswith("data_batch")]
        test_b, key = [members.get("test_batch")], b"labels"
        names = members["batches.meta"][b"label_names"]
    elif "meta" in members:  # CIFAR-100 (fine labels)
        train_b, test_b, key = [members.get("train")], [members.get("test")], b"fine_labels"
        names = members["meta"][b"fine_label_names"]
    else:
        raise DataError(f"{path}: neither batches.meta (CIFAR-10) nor meta (CIFAR-100) found")
    if not train_b or None in train_b + test_b:
        raise DataError(f"{path}: missing train or test batches (found {sorted(members)})")
    classes = tuple(n.decode() for n in names)
    rng = np.random.default_rng(seed)
    split_items = {}
    for split, batches in (("train", train_b), ("val", test_b)):
        images, labels = _cifar_arrays(batches, key)
        _check_label_range(labels, len(classes), f"{path}: split {split!r}")
        order = rng.permutation(len(labels)) if split == "train" else range(len(labels))
        split_items[split] = [(images[i], int(labels[i])) for i in order]
    return Source(f"cifar{len(classes)}", classes, split_items, load_array, 32)


def digits(*, val_fraction: float, seed: int) -> Source:
    """The 1,797 8x8 UCI handwritten digits that scikit-learn ships (no download)."""
    from sklearn.datasets import load_digits  # scikit-learn only for this source

    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)  # values are 0..16
    tr, va = _split_indices(len(images), val_fraction, seed)
    split_items = {s: [(images[i], int(d.target[i])) for i in idx]
                   for s, idx in (("train", tr), ("val", va))}
    return Source("digits", tuple(str(c) for c in range(10)), split_items, load_array, 8)


def digits_mirror(*, holdout_fraction: float, val_fraction: float, seed: int) -> Source:
    """A downstream set for few-shot probes of models pre-trained on `digits`: the images that
    `digits(val_fraction=holdout_fraction, seed=seed)` holds out as its val split (so never
    trained on, in any orientation), mirrored left-right (digits are not mirror-symmetric and
    the digits recipe trains without flips: a domain shift), cut again into train (the k-shot
    draws) and val (the test images)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images[:, :, ::-1] * (255 / 16)).astype(np.uint8)
    _, held_out = _split_indices(len(images), holdout_fraction, seed)
    tr, va = _split_indices(len(held_out), val_fraction, seed + 1)
    split_items = {s: [(images[held_out[i]], int(d.target[held_out[i]])) for i in idx]
                   for s, idx in (("train", tr), ("val", va))}
    return Source("digits-mirror", tuple(str(c) for c in range(10)), split_items, load_array, 8)


def shapes_source(*, num_samples: int, val_fraction: float, seed: int, image_size: int,
                  difficulty: float = 1.0) -> Source:
    """`num_samples` procedural shapes (train + val) at `image_size` px, deterministic per seed
    (`difficulty`: shapes.render)."""
    if num_samples < 1 or image_size < 4:
        raise ValueError(f"num_samples={num_samples}, image_size={image_size}; expected >= 1, >= 4")
    n_val = round(num_samples * val_fraction)
    items = {"train": [("train", i) for i in range(num_samples - n_val)],
             "val": [("val", i) for i in range(n_val)]}
    load = partial(load_shape_item, seed=seed, size=image_size, difficulty=difficulty)
    return Source("shapes", shapes.CLASSES, items, load, image_size)


def load_shape_item(item: tuple[str, int], *, seed: int, size: int,
                    difficulty: float = 1.0) -> tuple[Image.Image, int]:
    """(split, index) -> a shapes sample (picklable, for pool workers)."""
    split, index = item
    return shapes.make_sample(index, seed=seed, split=split, size=size, difficulty=difficulty)

"""The downstream data sets of the few-shot probes (scaling.fewshot): a shard dir checked up
front (splits, enough train images per class, memory), its k-shot sets drawn per seed, and its
k-shot and val images decoded once into memory as uint8, as the loaders decode them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from scaling.data import DatasetInfo, load_dataset_info
from scaling.data.samples import make_decode, shard_counts
from scaling.data.shardread import checked_samples

log = logging.getLogger("scaling.fewshot")

MEMORY_LIMIT_BYTES = 4 << 30  # decoded k-shot + val images of one downstream data set


def draw_shots(labels: np.ndarray, shots, seed: int, num_classes: int) -> dict[int, np.ndarray]:
    """{k: sorted train indices, k per class} for one seed (nested in k: a seed's 1-shot set lies inside its 5-shot set)."""
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    return {k: np.sort(np.concatenate([p[:k] for p in perms])) for k in shots}


def read_split(info: DatasetInfo, split: str, keep: set | None = None):
    """(labels of every sample in shard order, -1 if unreadable; uint8 (M, 3, S, S) eval crops
    of the samples whose index is in `keep` (all if None) and that decode; their indices).
    Samples are decoded as the loaders decode them (scaling.data.samples: the dataset's image
    and label keys), and every shard read is checked against its listed count."""
    sp, size = info.split(split), info.image_size
    decode = make_decode(info, size, None, strict=False)
    labels, images, index = [], [], []
    for i, sample in enumerate(checked_samples(sp.urls, shard_counts(sp))):
        label = decode.label(sample)
        labels.append(-1 if label is None else label)
        if label is None or (keep is not None and i not in keep):
            continue
        image = decode.image(sample, rng=None)
        if image is None:
            log.warning("few-shot: skipping the corrupt image %s in %s", sample.get("__key__"),
                        sample.get("__url__"))
            continue
        images.append(image)
        index.append(i)
    pixels = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous() if images
              else torch.zeros(0, 3, size, size, dtype=torch.uint8))
    return np.asarray(labels, np.int64), pixels, np.asarray(index, np.int64)


@dataclass
class Downstream:
    """One downstream shard dir: checked and its train labels read on open(), its images
    decoded on the first load() (rank 0)."""

    name: str
    info: DatasetInfo
    labels: np.ndarray
    sets: dict = field(default_factory=dict)  # (seed, k) -> train indices
    train: tuple | None = None  # (uint8 images, labels) of the union of the k-shot sets
    rows: dict = field(default_factory=dict)  # train index -> row of train[0]
    val: tuple | None = None

    @classmethod
    def open(cls, path: str, shots, seeds: int) -> Downstream:
        """Check a dir (dataset.json, train and val splits, k-shot sets that fit in memory,
        enough train images of every class); ValueError naming the problem otherwise."""
        info = load_dataset_info(path, verify=True)
        missing = [s for s in ("train", "val") if not info.has_split(s)]
        if missing:
            raise ValueError(f"few-shot data {info.root} has no {' or '.join(missing)} split "
                             f"(splits: {sorted(info.splits)})")
        c, most = info.num_classes, max(shots)
        need = (min(most * c * seeds, info.split("train").num_samples)
                + info.split("val").num_samples) * 3 * info.image_size**2
        if need > MEMORY_LIMIT_BYTES:
            raise ValueError(f"few-shot data {info.root}: its k-shot sets and val split need "
                             f"{need / 2**30:.1f} GiB decoded (limit {MEMORY_LIMIT_BYTES >> 30}"
                             " GiB); use fewer shots or seeds, or a smaller val split")
        labels = read_split(info, "train", keep=set())[0]
        counts = np.bincount(labels[labels >= 0], minlength=c)
        short = [info.classes[i] for i in np.flatnonzero(counts < most)]
        if short:
            raise ValueError(f"few-shot data {info.root}: {len(short)} class(es) have fewer "
                             f"than {most} train images (e.g. {short[:3]}, fewest "
                             f"{counts.min()}); lower the largest shots")
        return cls(info.root.name, info, labels)

    def load(self, shots, seeds: int) -> None:
        """Decode the k-shot images of every seed and the val split (once)."""
        if self.val is not None:
            return
        c = self.info.num_classes
        self.sets = {(s, k): idx for s in range(seeds)
                     for k, idx in draw_shots(self.labels, shots, s, c).items()}
        want = set(np.concatenate(list(self.sets.values())).tolist())
        _, images, index = read_split(self.info, "train", keep=want)
        self.train = images, self.labels[index]
        self.rows = {int(i): r for r, i in enumerate(index)}
        labels, images, index = read_split(self.info, "val")
        self.val = images, labels[index]


def open_downstream(dirs, shots, seeds: int) -> list[Downstream]:
    """Downstream.open for each dir; their names (basenames) must differ."""
    sets = [Downstream.open(d, shots, seeds) for d in dirs]
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"few-shot data dirs share a basename ({names}); rows are keyed by it")
    return sets

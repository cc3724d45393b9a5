"""Webdataset loaders: resampled training epochs with exact resume, exactly-once evaluation.

Training follows open_clip (`data.py`, `ResampledShards2`): each (rank, worker) draws shards
with replacement, every random choice seeded inside the worker, and a resumed epoch skips its
first batches undecoded, so it yields exactly the batches of an uninterrupted one. Batches are
uint8; scaling.data.device turns them into model inputs. Spec: docs/data.md, "Loading".
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scaling.data.info import DataError, DatasetInfo
from scaling.data.samples import (
    Decode,
    as_info,
    check_loader_args,
    epoch_steps,
    make_decode,
    shard_counts,
    stream_seed,
)
from scaling.data.shardread import checked_samples
from scaling.data.transforms import Augment, collate_uint8

SHUFFLE_BUFFER, SHUFFLE_INITIAL = 5000, 1000  # open_clip's _SAMPLE_SHUFFLE_SIZE / _INITIAL


def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in-process."""
    w = get_worker_info()
    return (0, 1) if w is None else (w.id, w.num_workers)


def _batch(items: list, labels: list, keys: list, skipped: int) -> dict:
    """Collate what Decode.item made into the batch dict of the data contract: "image" uint8
    (B, 3, H, W), or with --decode-on device "jpeg" (encoded bytes), "crop_box" (B, 4) float64
    in stored-image pixels and "flip" (B,) bool, for scaling.data.device to decode."""
    batch = {"label": torch.tensor(labels, dtype=torch.int64), "skipped": skipped, "key": keys}
    if items and isinstance(items[0], tuple):
        batch["jpeg"] = [data for data, _, _ in items]
        batch["crop_box"] = torch.tensor([box for _, box, _ in items], dtype=torch.float64)
        batch["flip"] = torch.tensor([flip for _, _, flip in items], dtype=torch.bool)
    else:
        batch["image"] = collate_uint8(items)
    return batch


def _resampled_urls(urls: list[str], rng: random.Random) -> Iterator[str]:
    """Shards drawn with replacement, forever (webdataset/open_clip ResampledShards)."""
    while True:
        yield urls[rng.randrange(len(urls))]


class _Stream(IterableDataset):
    """Base of the streams: a DataError in a worker travels as a message and is raised in the
    main process (a worker that raises stalls the DataLoader's shutdown for 5 s, and torch
    re-wraps the message)."""

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self._iter()
        except DataError as e:
            yield {"error": str(e)}

    def _iter(self) -> Iterator[dict]:
        raise NotImplementedError


class _TrainStream(_Stream):
    """One rank's training batches for one epoch; each worker makes its share (see module doc)."""

    def __init__(self, counts: dict[str, int], decode: Decode, *, batch_size: int, steps: int,
                 rank: int, seed: int, epoch: int, start_step: int, shuffle_buffer: int):
        super().__init__()
        self.counts, self.urls = counts, list(counts)
        self.decode, self.batch_size, self.steps = decode, batch_size, steps
        self.rank, self.seed, self.epoch, self.start_step = rank, seed, epoch, start_step
        self.shuffle_buffer = shuffle_buffer

    def _shuffled(self, v: int) -> Iterator[dict]:
        """Worker v's infinite stream of raw samples: resampled shards through a buffer."""
        shard_rng = random.Random(stream_seed(self.seed, self.epoch, self.rank, v, 0))
        sample_rng = random.Random(stream_seed(self.seed, self.epoch, self.rank, v, 1))
        raw = checked_samples(_resampled_urls(self.urls, shard_rng), self.counts)
        initial = min(SHUFFLE_INITIAL, self.shuffle_buffer)
        return wds.shuffle(self.shuffle_buffer, initial, rng=sample_rng)(raw)

    def _iter(self) -> Iterator[dict]:
        wid, nw = _worker()
        v = (wid + self.start_step) % nw  # the worker this one stands in for (module doc)
        skip = len(range(v, self.start_step, nw))  # v's batches before start_step
        todo = range(v + skip * nw, self.steps, nw)  # global indices of v's remaining batches
        samples = self._shuffled(v)
        for _ in itertools.islice(samples, skip * self.batch_size):
            pass  # skipped as raw bytes: resume costs tar reads, not decodes
        for i in todo:
            yield self._make_batch(list(itertools.islice(samples, self.batch_size)), i)

    def _make_batch(self, raw: list[dict], index: int) -> dict:
        """Decode and augment one batch; corrupt slots are refilled from the same batch."""
        rng = random.Random(stream_seed(self.seed, self.epoch, self.rank, index, 2))
        images, labels, keys = [], [], []
        for sample in raw:
            label = self.decode.label(sample)
            image = self.decode.item(sample, rng) if label is not None else None
            if image is not None:
                images.append(image), labels.append(label), keys.append(sample["__key__"])
        skipped = len(raw) - len(images)
        if not images:
            raise DataError(f"all {len(raw)} samples of batch {index} are corrupt (last shard "
                            f"{raw[-1].get('__url__') if raw else None})")
        for k in range(skipped):  # keep the batch size fixed (see module doc)
            images.append(images[k]), labels.append(labels[k]), keys.append(keys[k])
        return _batch(images, labels, keys, skipped)


def _eval_plan(shards: list[str], rank: int, world: int, wid: int,
               nw: int) -> tuple[list[str], int, int]:
    """(shards, modulus, residue): this (rank, worker) reads these shards and keeps sample
    number i (counted over them, in order) iff i % modulus == residue."""
    if len(shards) >= world:
        shards, mod, res = shards[rank::world], 1, 0
    else:  # fewer shards than ranks: every rank reads all, keeps every world-th sample
        mod, res = world, rank
    if len(shards) >= nw:
        return shards[wid::nw], mod, res
    return shards, mod * nw, res + mod * wid  # i = res + mod * j, keep j % nw == wid


def rank_eval_samples(counts: list[int], rank: int, world: int) -> int:
    """How many val samples rank `rank` evaluates (before skipping corrupt images)."""
    if len(counts) >= world:
        return sum(counts[rank::world])
    return len(range(rank, sum(counts), world))


class _EvalStream(_Stream):
    """One rank's share of a split, in order, in batches of at most batch_size."""

    def __init__(self, urls: list[str], counts: list[int], decode: Decode, *, batch_size: int,
                 rank: int, world_size: int):
        self.urls, self.counts, self.decode, self.batch_size = urls, counts, decode, batch_size
        self.rank, self.world_size = rank, world_size

    def _iter(self) -> Iterator[dict]:
        wid, nw = _worker()
        urls, mod, res = _eval_plan(self.urls, self.rank, self.world_size, wid, nw)
        if not urls:
            return
        raw = checked_samples(urls, dict(zip(self.urls, self.counts)))
        mine = (sample for i, sample in enumerate(raw) if i % mod == res)
        pending, images, labels, keys, skipped = None, [], [], [], 0
        for sample in mine:
            label = self.decode.label(sample)
            image = self.decode.item(sample, None) if label is not None else None
            if image is None:
                skipped += 1
                continue
            images.append(image), labels.append(label), keys.append(sample["__key__"])
            if len(images) == self.batch_size:
                if pending:
                    yield _batch(*pending)
                pending, images, labels, keys, skipped = (images, labels, keys, skipped), [], [], \
                    [], 0
        if images:
            if pending:
                yield _batch(*pending)
            pending = (images, labels, keys, skipped)
        elif pending:  # corrupt samples after the last full batch are counted in it
            pending = pending[:3] + (pending[3] + skipped,)
        elif skipped:  # only corrupt samples: an empty batch carries the count
            size = self.decode.image_size
            yield {"image": torch.empty(0, 3, size, size, dtype=torch.uint8), "key": [],
                   "skipped": skipped, "label": torch.empty(0, dtype=torch.int64)}
        if pending:
            yield _batch(*pending)


def _batches(dataset: _Stream, num_workers: int, pin_memory: bool | None) -> Iterator[dict]:
    """Batches from a DataLoader whose workers assemble them (batch_size=None)."""
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    # A DataLoader iterator draws its workers' base seed from `generator`, torch's global one
    # when None: a resumed run makes an iterator where the uninterrupted one did not, and its
    # dropout masks would then differ. The streams seed themselves (module doc), so a private
    # generator changes nothing else.
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin,
                        persistent_workers=False, in_order=True, generator=torch.Generator())
    for batch in loader:
        if "error" in batch:
            raise DataError(batch["error"])
        yield batch


class TrainLoader:
    """Resampled training epochs of `steps_per_epoch` batches for one rank (see module doc)."""

    def __init__(self, counts: dict[str, int], decode: Decode, *, batch_size: int,
                 steps_per_epoch: int, rank: int, seed: int, num_workers: int,
                 shuffle_buffer: int, pin_memory: bool | None):
        self.steps_per_epoch, self.batch_size = steps_per_epoch, batch_size
        self.num_workers, self._pin = num_workers, pin_memory
        self._kw = {"counts": counts, "decode": decode, "batch_size": batch_size,
                    "steps": steps_per_epoch, "rank": rank, "seed": seed,
                    "shuffle_buffer": shuffle_buffer}

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """Batches start_step .. steps_per_epoch - 1 of `epoch` (a resume skips the others)."""
        if epoch < 0 or not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"epoch={epoch}, start_step={start_step}; expected epoch >= 0 and "
                             f"0 <= start_step <= steps_per_epoch={self.steps_per_epoch}")
        # A new dataset object per epoch: non-persistent workers receive (epoch, start_step)
        # with it when the DataLoader iterator starts them.
        stream = _TrainStream(**self._kw, epoch=epoch, start_step=start_step)
        return _batches(stream, self.num_workers, self._pin)


class EvalLoader:
    """One rank's share of a split, each sample once over all ranks; iterate it once per eval."""

    def __init__(self, stream: _EvalStream, num_samples: int, num_workers: int,
                 pin_memory: bool | None):
        self.num_samples, self._stream = num_samples, stream
        self._num_workers, self._pin = num_workers, pin_memory

    def __iter__(self) -> Iterator[dict]:
        return _batches(self._stream, self._num_workers, self._pin)


def epoch_length(split_samples: int, batch_size: int, world_size: int,
                 samples_per_epoch: int | None = None, steps_per_epoch: int | None = None
                 ) -> int:
    """Batches per epoch of a train loader (both kinds): `steps_per_epoch` as given (a
    TrainPlan's, scaling.config), else an epoch of samples_per_epoch (default: the split's
    `split_samples`) in global batches of batch_size x world_size, the last one filled up."""
    if steps_per_epoch is not None and samples_per_epoch is not None:
        raise ValueError("give steps_per_epoch or samples_per_epoch, not both")
    if steps_per_epoch is not None:
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch={steps_per_epoch}; expected >= 1")
        return steps_per_epoch
    samples = split_samples if samples_per_epoch is None else samples_per_epoch
    if samples < 1:
        raise ValueError(f"samples_per_epoch={samples_per_epoch}; expected >= 1")
    return epoch_steps(samples, batch_size, world_size)


def make_train_loader(info: DatasetInfo | str | os.PathLike, *, image_size: int, batch_size: int,
                      rank: int, world_size: int, seed: int, num_workers: int = 2,
                      samples_per_epoch: int | None = None, strict: bool = False,
                      augment: Augment | None = None, shuffle_buffer: int = SHUFFLE_BUFFER,
                      split: str = "train", pin_memory: bool | None = None,
                      steps_per_epoch: int | None = None,
                      decode_on: str = "workers") -> TrainLoader:
    """Training loader of the data contract; `batch_size` is per rank. An epoch is
    `steps_per_epoch` batches when given (training passes its TrainPlan's), else
    ceil(samples_per_epoch / (batch_size x world_size)) (default: the split's size).
    decode_on="device": batches carry encoded images with their drawn crops (`_batch`)."""
    check_loader_args(batch_size, rank, world_size, num_workers, image_size)
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer={shuffle_buffer}; expected >= 1")
    info = as_info(info)
    sp = info.split(split)
    steps = epoch_length(sp.num_samples, batch_size, world_size, samples_per_epoch,
                         steps_per_epoch)
    shuffle_buffer = min(shuffle_buffer, sp.num_samples)  # a bigger buffer only holds repeats
    decode = make_decode(info, image_size, augment, strict, decode_on)
    return TrainLoader(shard_counts(sp), decode, batch_size=batch_size, steps_per_epoch=steps,
                       rank=rank, seed=seed, num_workers=num_workers,
                       shuffle_buffer=shuffle_buffer, pin_memory=pin_memory)


def make_eval_loader(info: DatasetInfo | str | os.PathLike, *, image_size: int, batch_size: int,
                     rank: int, world_size: int, num_workers: int = 2, strict: bool = False,
                     split: str = "val", augment: Augment | None = None,
                     pin_memory: bool | None = None, decode_on: str = "workers") -> EvalLoader:
    """Evaluation loader of the data contract: over all ranks, every sample of `split` once
    (encoded, for the device to decode, with decode_on="device")."""
    check_loader_args(batch_size, rank, world_size, num_workers, image_size)
    info = as_info(info)
    sp = info.split(split)
    counts = [s.num_samples for s in sp.shards]
    decode = make_decode(info, image_size, augment, strict, decode_on)
    stream = _EvalStream(sp.urls, counts, decode, batch_size=batch_size, rank=rank,
                         world_size=world_size)
    return EvalLoader(stream, rank_eval_samples(counts, rank, world_size), num_workers,
                      pin_memory)

"""The parts of the training loop that are not the step: batches, evaluation, and when the
loop asks whether to stop (where the time goes: scaling.meter)."""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
from collections.abc import Iterator

import torch

from scaling import dist
from scaling.data import make_eval_loader, make_train_loader
from scaling.data.device import DeviceInputs, Mixing
from scaling.data.memory import (
    MixedSizes,
    make_memory_eval_loader,
    make_memory_train_loader,
    use_memory,
)
from scaling.data.samples import jpeg_draft_setting
from scaling.data.transforms import default_augment

log = logging.getLogger("scaling.loop")


class Batches:
    """One optimizer step's micro-batches for this rank, step after step, across epochs.

    The loader yields one uint8 batch per optimizer step (scaling.data.loader). With
    data_order="sharded" each rank reads its own resampled shards (the scalable default); with
    "global" every rank reads the whole global batch and keeps its slice, which makes the run
    independent of the world size (each rank decodes every image: meant for small data and
    reproducibility checks). Data read into memory (`in_memory`, scaling.data.memory) is cut
    into the same global batches either way. Everything after the copy (decoding with
    --decode-on device, float conversion, normalisation, mixup/cutmix) runs on the training
    device (scaling.data.device), inside the step's time (`inputs`).
    """

    def __init__(self, cfg, data_info, plan, dist_info: dist.DistInfo, device: torch.device):
        self.cfg, self.data_info, self.plan, self.dist_info = cfg, data_info, plan, dist_info
        aug = default_augment(data_info.source)
        if cfg.min_crop_scale is not None:
            aug = dataclasses.replace(aug, scale=(cfg.min_crop_scale, 1.0))
        if cfg.hflip is not None:
            aug = dataclasses.replace(aug, hflip=cfg.hflip)
        self.augment = aug
        self.device_inputs = DeviceInputs(device, aug, plan.image_size, strict=cfg.strict_data,
                                          jpeg_draft=jpeg_draft_setting())
        self.mixing = Mixing(plan.num_classes, cfg.seed, cfg.mixup_alpha, cfg.cutmix_alpha,
                             cfg.label_smoothing)
        per_rank = plan.micro_batch * plan.accumulation
        shared = cfg.data_order == "global"
        self.in_memory = use_memory(data_info, cfg.in_memory, plan.total_steps * cfg.batch_size)
        kw = dict(image_size=plan.image_size, seed=cfg.seed,
                  batch_size=cfg.batch_size if shared else per_rank,
                  rank=0 if shared else dist_info.rank,
                  world_size=1 if shared else dist_info.world_size,
                  steps_per_epoch=plan.steps_per_epoch,
                  strict=cfg.strict_data, augment=aug)
        self.loader = None
        if self.in_memory:
            try:
                self.loader = make_memory_train_loader(data_info, **kw)
            except MixedSizes:
                if cfg.in_memory == "on":
                    raise
                self.in_memory = False  # auto: images of several sizes are streamed
        if self.in_memory and cfg.decode_on == "device" and dist_info.is_main:
            log.info("--decode-on device: the data is read into memory, decoded once at the "
                     "start; nothing is left to decode per step")
        if self.loader is None:
            self.loader = make_train_loader(data_info, num_workers=cfg.num_workers,
                                            decode_on=cfg.decode_on, **kw)
        mine = slice(dist_info.rank * per_rank, (dist_info.rank + 1) * per_rank)
        self.slice = mine if shared else None
        self.count_skips = dist_info.is_main or not shared  # global order: every rank sees them all

    def iterate(self, start_step: int) -> Iterator[tuple[dict, int]]:
        """(batch on the device, corrupt samples the loader skipped) for steps start_step ..
        total_steps - 1; `inputs` makes the step's micro-batches of it.

        In-memory batches are made one step ahead in a thread (the DataLoader's workers do
        that for streaming): their torch and numpy work then overlaps the training step. On
        CUDA the copy to the device runs one batch ahead (DeviceInputs.feed).
        """
        batches = self._iterate(start_step)
        return self.device_inputs.feed(prefetch(batches, depth=2) if self.in_memory else batches)

    def _iterate(self, start_step: int) -> Iterator[tuple[dict, int]]:
        step, per_epoch = start_step, self.plan.steps_per_epoch
        while step < self.plan.total_steps:
            epoch, offset = divmod(step, per_epoch)
            for batch in self.loader.epoch(epoch, start_step=offset):
                yield batch, batch["skipped"] if self.count_skips else 0
                step += 1
                if step >= self.plan.total_steps:
                    return

    def inputs(self, batch: dict, step: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                                      int]:
        """(micro-batches of (normalised images, targets) on the device, corrupt images the
        device found) of step `step`: this rank's slice of a global batch, mixed per micro-batch
        with a generator of (seed, step, rank, micro-batch) (scaling.data.device.Mixing)."""
        micro, bad = self.device_inputs.train_inputs(
            batch, micro_batch=self.plan.micro_batch, mixing=self.mixing, step=step,
            rank=self.dist_info.rank, rows=self.slice)
        return micro, bad if self.count_skips else 0

    def eval_loader(self):
        """The val split for this rank (every sample once over all ranks)."""
        if not hasattr(self, "_eval"):
            kw = dict(image_size=self.plan.image_size, rank=self.dist_info.rank,
                      world_size=self.dist_info.world_size,
                      batch_size=self.cfg.eval_batch_size or self.plan.micro_batch,
                      strict=self.cfg.strict_data, augment=self.augment)
            if self.in_memory:
                self._eval = make_memory_eval_loader(self.data_info, **kw)
            else:
                self._eval = make_eval_loader(self.data_info, num_workers=self.cfg.num_workers,
                                              decode_on=self.cfg.decode_on, **kw)
        return self._eval


def prefetch(items: Iterator, depth: int) -> Iterator:
    """Iterate `items` in a daemon thread, up to `depth` ahead; its exceptions re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for item in items:
                q.put((item, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put((None, e))
        q.put((done, None))

    threading.Thread(target=produce, name="prefetch", daemon=True).start()
    while True:
        item, error = q.get()
        if error is not None:
            raise error
        if item is done:
            return
        yield item


GPU_STOP_POLL = 10  # steps between stop checks on a GPU (stop_poll_every=0); log_every's default


def stop_poll_every(cfg, device: torch.device) -> int:
    """Steps between stop checks: cfg.stop_poll_every, or with 0 every step on a CPU (a check
    there costs no host-device sync) and every GPU_STOP_POLL steps on a GPU."""
    if cfg.stop_poll_every:
        return cfg.stop_poll_every
    return GPU_STOP_POLL if device.type == "cuda" else 1


def is_stop_boundary(step: int, every: int, evals: set[int], ckpt_every: int,
                     total_steps: int) -> bool:
    """Whether the loop checks for a stop signal (an all-reduce that reads a device value back)
    after `step`: a multiple of `every`, an eval step, a checkpoint step (every ckpt_every
    steps, 0: none) or the last one. A function of the step alone, so every rank checks at the
    same steps; a signal is acted on at the first boundary after it arrived."""
    return (step % every == 0 or step in evals or step == total_steps
            or bool(ckpt_every) and step % ckpt_every == 0)


@torch.no_grad()
def evaluate(engine, loader, inputs: DeviceInputs, dtype: torch.dtype) -> dict:
    """Loss, top-1 and top-5 over the val split, summed over ranks, and the per-image loss's
    sample sd (`loss_sd`: the analysis's interval on the mean loss); `inputs` turns each uint8
    (or encoded) batch into normalised images on the device (scaling.data.device).

    Ranks may hold different numbers of batches; they step in lockstep and a rank that has run
    out does a throw-away forward, because under ZeRO-3 every forward gathers parameters
    collectively and all ranks must take part.
    """
    device = inputs.device
    engine.eval()
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, top-1 hits, top-5 hits, samples, squared losses
    it, dummy = iter(inputs.feed((b, 0) for b in loader)), None
    while True:
        batch = next(it, (None, 0))[0]
        if not dist.all_reduce_max(int(batch is not None), device):
            break
        images, labels = inputs.eval_inputs(batch) if batch is not None else (None, [])
        if len(labels) == 0:
            if dummy is None:
                size = engine.module.config.image_size
                dummy = torch.zeros(1, 3, size, size, device=device, dtype=dtype)
            engine(dummy)
            continue
        logits = engine(images.to(dtype)).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none").double()
        total, squares = torch.stack([losses.sum(), losses.square().sum()]).tolist()  # one sync
        sums[0] += total
        sums[4] += squares
        sums[1] += hits[:, 0].sum().item()
        sums[2] += hits.any(dim=1).sum().item()
        sums[3] += len(labels)
    engine.train()
    loss, top1, top5, n, squares = dist.all_reduce_sum(sums, device)
    if n == 0:
        raise RuntimeError("evaluation saw no samples")
    return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "num_samples": int(n),
            "loss_sd": loss_sd(loss, squares, n)}


def loss_sd(total: float, squares: float, n: float) -> float | None:
    """The sample sd of n per-image losses from their sum and sum of squares (None for n < 2);
    summed in float64, so the cancellation in squares - total^2 / n is harmless at eval sizes."""
    if n < 2:
        return None
    return math.sqrt(max(squares - total * total / n, 0.0) / (n - 1))

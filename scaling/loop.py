"""The parts of the training loop that are not the step: batches, timing, evaluation, and
when the loop asks whether to stop."""

from __future__ import annotations

import dataclasses
import os
import queue
import resource
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from scaling import dist
from scaling.data import make_eval_loader, make_train_loader
from scaling.data.memory import (
    MixedSizes,
    make_memory_eval_loader,
    make_memory_train_loader,
    use_memory,
)
from scaling.data.transforms import default_augment, mixup_cutmix
from scaling.flops import mfu, peak_tflops


class Batches:
    """One optimizer step's micro-batches for this rank, step after step, across epochs.

    The loader yields one batch per optimizer step. With data_order="sharded" each rank reads
    its own resampled shards (the scalable default); with "global" every rank reads the whole
    global batch and keeps its slice, which makes the run independent of the world size (each
    rank decodes every image: meant for small data and reproducibility checks). Data read into
    memory (`in_memory`, scaling.data.memory) is cut into the same global batches either way.
    """

    def __init__(self, cfg, data_info, plan, dist_info: dist.DistInfo):
        self.cfg, self.data_info, self.plan, self.dist_info = cfg, data_info, plan, dist_info
        aug = default_augment(data_info.source)
        if cfg.min_crop_scale is not None:
            aug = dataclasses.replace(aug, scale=(cfg.min_crop_scale, 1.0))
        if cfg.hflip is not None:
            aug = dataclasses.replace(aug, hflip=cfg.hflip)
        self.augment = aug
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
        if self.loader is None:
            self.loader = make_train_loader(data_info, num_workers=cfg.num_workers, **kw)
        mine = slice(dist_info.rank * per_rank, (dist_info.rank + 1) * per_rank)
        self.slice = mine if shared else None
        self.count_skips = dist_info.is_main or not shared  # global order: every rank sees them all

    def iterate(self, start_step: int) -> Iterator[tuple[list, int]]:
        """(micro-batches, corrupt samples skipped) for steps start_step .. total_steps - 1.

        In-memory batches are made one step ahead in a thread (the DataLoader's workers do
        that for streaming): their torch and numpy work then overlaps the training step.
        """
        batches = self._iterate(start_step)
        return prefetch(batches, depth=2) if self.in_memory else batches

    def _iterate(self, start_step: int) -> Iterator[tuple[list, int]]:
        step, per_epoch = start_step, self.plan.steps_per_epoch
        while step < self.plan.total_steps:
            epoch, offset = divmod(step, per_epoch)
            for batch in self.loader.epoch(epoch, start_step=offset):
                yield self._split(batch, step), batch["skipped"] if self.count_skips else 0
                step += 1
                if step >= self.plan.total_steps:
                    return

    def _split(self, batch: dict, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = batch["image"], batch["label"]
        if self.slice is not None:
            images, labels = images[self.slice], labels[self.slice]
        out = []
        for i, (x, y) in enumerate(zip(images.split(self.plan.micro_batch),
                                       labels.split(self.plan.micro_batch))):
            out.append(self._targets(x, y, step, i))
        return out

    def _targets(self, x, y, step, micro) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if not (cfg.mixup_alpha or cfg.cutmix_alpha or cfg.label_smoothing):
            return x, y
        # A generator seeded by (seed, step, rank, micro-batch): resume-exact, no state to save.
        g = torch.Generator().manual_seed(
            hash((cfg.seed, step, self.dist_info.rank, micro)) & 0x7FFF_FFFF_FFFF_FFFF)
        return mixup_cutmix(x, y, self.plan.num_classes, mixup_alpha=cfg.mixup_alpha,
                            cutmix_alpha=cfg.cutmix_alpha, label_smoothing=cfg.label_smoothing,
                            generator=g)

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
                                              **kw)
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


class StepClock:
    """Seconds in training steps. On a GPU a pair of CUDA events per step, read back only by
    `drain` (at log steps, saves and the end, where the loop reads the device anyway), so the
    timing adds no host-device sync per step; on a CPU the wall clock around the step."""

    def __init__(self, device: torch.device | None = None):
        self.cuda = device is not None and device.type == "cuda"
        self._start, self._pending = None, []

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> float:
        """The step's seconds on a CPU; 0 on a GPU, where they come with the next drain."""
        if not self.cuda:
            return time.perf_counter() - self._start
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((self._start, end))
        return 0.0

    def drain(self) -> float:
        """GPU seconds of the steps stopped since the last drain (waits for the last one)."""
        if not self._pending:
            return 0.0
        self._pending[-1][1].synchronize()
        seconds = sum(a.elapsed_time(b) for a, b in self._pending) / 1e3
        self._pending.clear()
        return seconds


class Meter:
    """Wall time, time in training steps, where the rest went, and skipped samples; carried
    across restarts (a resumed run adds each process's time from its own start)."""

    # Wall time outside training steps, by part (final.json's overhead_breakdown_s):
    PARTS = (
        "startup",     # process start to build: interpreter, imports, config and data checks
        "build",       # process group, model, DeepSpeed engine, loaders, resuming
        "data_wait",   # waiting for the next batch
        "eval",        # evaluations
        "checkpoint",  # checkpoint saves
        "export",      # the safetensors export
        "fewshot",     # few-shot linear probes at eval points (--fewshot, scaling.fewshot)
    )

    def __init__(self):
        self._t0 = process_start_time()  # interpreter start and imports count as overhead
        self._wall_before = 0.0  # wall seconds of earlier processes, up to their checkpoint
        self.compute_s = 0.0
        self.parts = dict.fromkeys(self.PARTS, 0.0)
        # compiling DeepSpeed's CPU comm op on its first multi-rank use on a machine: inside
        # "build", but a cost of the machine, so left out of device_hours
        self.op_build_s = 0.0
        self.skipped = 0  # this rank, cumulative
        self.window_step, self._window_t0 = 0, time.perf_counter()
        self.clock = StepClock()

    def use_device(self, device: torch.device) -> None:
        """Time the steps on `device`: CUDA events on a GPU (StepClock)."""
        self.clock = StepClock(device)

    def wall(self) -> float:
        return self._wall_before + time.time() - self._t0

    def process_s(self) -> float:
        """Seconds since this process started."""
        return time.time() - self._t0

    def start_step(self) -> None:
        self.clock.start()

    def end_step(self, skipped: int) -> None:
        """A training step ended; `skipped`: corrupt samples its batch skipped on this rank."""
        self.compute_s += self.clock.stop()
        self.skipped += skipped

    def flush(self) -> None:
        """Add the GPU time of the steps timed since the last flush (a sync on a GPU)."""
        self.compute_s += self.clock.drain()

    def add(self, part: str, seconds: float) -> None:
        """Count `seconds` outside training steps as `part` (one of PARTS)."""
        self.parts[part] += seconds
        if part in ("eval", "checkpoint", "export", "fewshot"):
            self._window_t0 += seconds  # not training throughput

    def start_window(self, step: int) -> None:
        self.window_step, self._window_t0 = step, time.perf_counter()

    def end_window(self, step: int) -> float:
        """Seconds since the window started (eval/checkpoint time excluded); opens the next."""
        self.flush()  # a train row: the loop has just read the device anyway
        now = time.perf_counter()
        seconds, self.window_step, self._window_t0 = now - self._window_t0, step, now
        return seconds

    skipped_global = 0  # over all ranks, as of the last train row

    def overhead_fraction(self, wall: float) -> float:
        """Share of `wall` (a reading of wall()) outside training steps (start-up, data
        stalls, eval, saves)."""
        self.flush()
        return max(0.0, 1.0 - self.compute_s / wall) if wall > 0 else 0.0

    def breakdown(self, wall: float) -> dict[str, float]:
        """Seconds of wall time by part: PARTS, "steps", and "other" (logging, the loop's
        all-reduces, anything unmeasured); the values sum to `wall` (a reading of wall()). On a
        GPU "steps" is the GPU's time in them (CUDA events), which can overlap the host's
        data_wait, so "other" can then be slightly negative."""
        self.flush()
        parts = {**self.parts, "steps": self.compute_s}
        parts["other"] = wall - sum(parts.values())
        return parts

    def mfu(self, tflops: float, given_peak: float | None) -> float | None:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        return mfu(tflops * 1e12, given_peak or peak_tflops(name))

    def state(self) -> dict:
        self.flush()
        return {"wall": self.wall(), "compute": self.compute_s, "skipped": self.skipped,
                "parts": dict(self.parts), "op_build": self.op_build_s}

    def restore(self, state: dict, *, skipped: int) -> None:
        """Carry on from a checkpoint's state: this process's time so far (its start-up and
        build) is added to the saved wall time; the saved run's time after it is lost."""
        self._wall_before = state["wall"]
        self.compute_s, self.skipped = state["compute"], skipped
        for part, seconds in state.get("parts", {}).items():
            self.parts[part] += seconds
        self.op_build_s += state.get("op_build", 0.0)


def process_start_time() -> float:
    """Wall-clock time at which this process started (Linux /proc), else now."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        hz = os.sysconf("SC_CLK_TCK")
        return time.time() - (uptime - ticks / hz)
    except (OSError, ValueError, IndexError):
        return time.time()


def memory_gb() -> float:
    """Peak memory of this process: CUDA max allocated, or CPU max resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


@torch.no_grad()
def evaluate(engine, loader, device: torch.device, dtype: torch.dtype) -> dict:
    """Loss, top-1 and top-5 over the val split, summed over ranks.

    Ranks may hold different numbers of batches; they step in lockstep and a rank that has run
    out does a throw-away forward, because under ZeRO-3 every forward gathers parameters
    collectively and all ranks must take part.
    """
    engine.eval()
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, top-1 hits, top-5 hits, samples
    it, dummy = iter(loader), None
    while True:
        batch = next(it, None)
        if not dist.all_reduce_max(int(batch is not None), device):
            break
        if batch is None or len(batch["label"]) == 0:
            if dummy is None:
                size = engine.module.config.image_size
                dummy = torch.zeros(1, 3, size, size, device=device, dtype=dtype)
            engine(dummy)
            continue
        logits = engine(batch["image"].to(device, dtype)).float()
        labels = batch["label"].to(device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        sums[0] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        sums[1] += hits[:, 0].sum().item()
        sums[2] += hits.any(dim=1).sum().item()
        sums[3] += len(labels)
    engine.train()
    loss, top1, top5, n = dist.all_reduce_sum(sums, device)
    if n == 0:
        raise RuntimeError("evaluation saw no samples")
    return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "num_samples": int(n)}

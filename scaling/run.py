"""The state and loop of one training run on one rank (`Run`), and `execute`, which runs it to
the end and turns its outcome into an exit code; its evaluation, checkpoints and result rows are
in scaling.run_records. Stop signals only set a flag here, read at the loop's stop boundaries.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from scaling import branch, dist, pretrained, results, tracking
from scaling.config import TrainConfig, TrainPlan, ckpt_interval, eval_steps, lr_at, pinned_steps
from scaling.flops import training_flops
from scaling.loop import Batches, is_stop_boundary, stop_poll_every
from scaling.meter import Meter, memory_gb
from scaling.model import create_model
from scaling.run_records import RunRecords
from scaling.segments import Segments
from scaling.writes import DiskFull

log = logging.getLogger("scaling.train")  # one logger name for the run (tests read it)


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


FAULTS = ("nan", "kill_in_save", "eval_error", "sigterm", "pace")


def faults_from_env() -> dict[str, int]:
    """Fault injection for tests, e.g. VIT_SCALING_FAULTS="nan@7,kill_in_save@10": make step
    7's loss NaN; SIGKILL this process inside the checkpoint save of step 10 (after DeepSpeed
    wrote its files, before the checkpoint is marked complete); eval_error@N raises in the
    evaluation after step N; sigterm@N sends this process SIGTERM right after step N; pace@MS
    sleeps MS milliseconds after every step (a run's length in seconds, whatever the machine's
    speed: the SLURM time-limit test)."""
    spec = os.environ.get("VIT_SCALING_FAULTS", "")
    faults = {}
    for item in filter(None, spec.split(",")):
        name, _, step = item.partition("@")
        if name not in FAULTS or not step.isdigit():
            raise ValueError(f"VIT_SCALING_FAULTS item {item!r}; expected NAME@STEP with NAME "
                             f"in {FAULTS}")
        faults[name] = int(step)
    return faults


class RunDirRefused(RuntimeError):
    """The run dir belongs to another live process: exit 2, nothing written to it."""


class Run(RunRecords):
    """The state of one run on one rank."""

    def __init__(self, cfg: TrainConfig, data_info, vit_cfg, plan: TrainPlan,
                 dist_info: dist.DistInfo, fewshot=None):
        self.cfg, self.data_info, self.vit_cfg, self.plan = cfg, data_info, vit_cfg, plan
        self.dist_info = dist_info
        self.fewshot = fewshot  # scaling.fewshot.TrainingProbe (--fewshot) or None
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / results.CHECKPOINT_DIR
        self.step, self.best_top1, self.last_eval = 0, None, None
        self.meter = Meter()
        self.segments = Segments(plan.world_size)  # replaced by a resume's (scaling.segments)
        self.window = None  # this rank's summed loss since the last train row
        self.faults = faults_from_env()
        self.ckpt_steps, self.ckpt_minutes = ckpt_interval(cfg.ckpt_every)
        self.pinned = pinned_steps(cfg)  # --ckpt-at: checkpointed and never rotated away
        self.ckpt_cost, self.tracker = tracking.CheckpointCost(), None
        self.pretrained = pretrained.Pretrained.open(cfg.init_from) if cfg.init_from else None

    # -- set-up -------------------------------------------------------------------------------
    def build(self) -> None:
        """Process group, model, engine; resume if a complete checkpoint exists."""
        from scaling import engine as eng  # late: DeepSpeed takes seconds to import

        self.meter.add("startup", self.meter.process_s())
        t0 = time.perf_counter()
        self.meter.op_build_s += eng.init_distributed(self.dist_info)
        self.device = dist.device_for(self.dist_info)
        self.meter.use_device(self.device)  # steps timed by CUDA events on a GPU
        if self.cfg.compile:
            self.meter.use_compile()  # compile seconds: their own part, not training time
        self.poll_every = stop_poll_every(self.cfg, self.device)
        self._own_run_dir()
        torch.manual_seed(self.cfg.seed)  # identical initial weights on every rank
        model = create_model(self.vit_cfg)
        if self.pretrained is not None and not eng.complete_checkpoints(self.ckpt_dir):
            pretrained.init_weights(model, self.pretrained)  # a fine-tune's first start only
        self.engine = eng.initialize(model, self.cfg, micro=self.plan.micro_batch,
                                     accum=self.plan.accumulation,
                                     total_steps=self.plan.total_steps)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision,
                                                                       torch.float32)
        if self.dist_info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if not (self.out / results.CONFIG_FILE).exists():
                results.write_json(self.out / results.CONFIG_FILE, self.cfg.to_dict())
            results.write_json(self.out / results.PLAN_FILE, dataclasses.asdict(self.plan))
            removed = eng.remove_incomplete(self.ckpt_dir)
            if removed:
                log.warning("removed incomplete checkpoints %s", removed)
            if self.cfg.trunk_run is not None:  # a branch's first start: the trunk's state
                seeded = branch.seed_from_trunk(self.out, self.cfg.trunk_run, self.cfg.branch_step)
                log.info("branch: %s", seeded or "seeded earlier, resuming its own checkpoints")
            kept = results.set_aside_final(self.out)  # a retry keeps the earlier outcome
            if kept:
                log.warning("retrying a failed/diverged run; its final.json is kept as %s",
                            kept.name)
        dist.barrier()
        self.batches = Batches(self.cfg, self.data_info, self.plan, self.dist_info, self.device)
        self.window = torch.zeros((), dtype=torch.float64, device=self.device)
        self._resume()
        if self.dist_info.is_main:
            self.tracker = tracking.Tracker.open(self.cfg, self.out, self.step)
        self._last_save = time.monotonic()
        self.meter.add("build", time.perf_counter() - t0)

    def _own_run_dir(self) -> None:
        """Rank 0 takes the run dir's lock; every rank stops (RunDirRefused) if it could not."""
        refused = None
        if self.dist_info.is_main:
            try:
                self.lock = results.RunLock(self.out).acquire()
            except (results.RunDirInUse, DiskFull) as e:  # exit 2 on every rank, nothing written
                refused = str(e)
        if dist.all_reduce_max(int(refused is not None), self.device):
            raise RunDirRefused(refused or "rank 0 could not take the run dir's lock")

    lock = None
    rows_logged = 0  # rank 0: rows in metrics.jsonl, saved with each checkpoint
    transfer_rows = 0  # rank 0: rows in transfer.jsonl, saved with each checkpoint

    def _resume(self) -> None:
        from scaling import engine as eng  # late: DeepSpeed takes seconds to import

        done = eng.complete_checkpoints(self.ckpt_dir)
        if done:
            tag = done[-1][1]
            saved_world = eng.saved_world_size(self.ckpt_dir, tag)
            try:  # at another world size, through a universal checkpoint (scaling.engine)
                client = eng.load_checkpoint(self.engine, self.ckpt_dir, tag)
            except eng.ResumeRefused as e:
                raise RunDirRefused(str(e)) from None
            self.step, self.best_top1 = client["step"], client.get("best_top1")
            self.last_eval = client.get("last_eval")
            self.ckpt_cost = tracking.CheckpointCost.restore(client.get("ckpt_cost"),
                                                             self.ckpt_dir / tag / eng.COMPLETE)
            # Totals over ranks were saved; rank 0 carries them on so all-reduces stay exact.
            main = self.dist_info.is_main
            self.meter.restore(client["meter"], skipped=client["skipped"] if main else 0)
            # the window's loss was summed over saved_world ranks; rows divide by world_size
            scale = self.plan.world_size / saved_world
            self.window.fill_(client["window_loss"] * scale if main else 0.0)
            self.segments = Segments.resume(client, saved_world, self.plan.world_size)
            self.meter.window_step = client["window_step"]
        if self.dist_info.is_main:  # a start without a checkpoint re-runs from step 0
            rows = client.get("metrics_rows") if done else 0
            dropped = results.truncate_metrics(self.out, self.step, rows)
            self.rows_logged = len(results.read_metrics(self.out))
            kept = client.get("transfer_rows") if done else 0  # the same rule (results.py)
            dropped_t = results.truncate_rows(self.out, results.TRANSFER_FILE, self.step, kept)
            self.transfer_rows = len(results.read_transfer(self.out))
            if done or dropped or dropped_t:
                log.info("%s (step %d; dropped %d later metric rows and %d transfer rows of a "
                         "lost attempt)", f"resumed from {done[-1][1]}" if done else
                         "no complete checkpoint: starting over", self.step, dropped, dropped_t)

    # -- the loop -----------------------------------------------------------------------------
    def train(self) -> None:
        """Run optimizer steps until the budget is spent or a stop signal arrives."""
        cfg, plan = self.cfg, self.plan
        bar = self._progress_bar()
        evals = eval_steps(cfg, plan.total_steps)
        self.meter.start_window(self.meter.window_step)
        if self.step in evals and (self.last_eval or {}).get("step") != self.step:
            self.run_eval()  # a stop signal at an eval step saved before evaluating
        batches = self.batches.iterate(self.step)
        while True:
            t0 = time.perf_counter()
            item = next(batches, None)
            t1 = time.perf_counter()
            self.meter.add("data_wait", t1 - t0)
            if item is None:
                break
            batch, skipped = item
            self.meter.start_step()
            micro_batches, bad = self.batches.inputs(batch, self.step)  # on the device
            self.window += self._step(micro_batches)
            self.meter.end_step(skipped + bad)
            self.step += 1
            if self.faults.get("sigterm") == self.step:
                os.kill(os.getpid(), signal.SIGTERM)  # fault injection: a real signal, here
            if "pace" in self.faults:
                time.sleep(self.faults["pace"] / 1000)
            if bar is not None:
                bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == plan.total_steps:
                self._log_train()
            if self._stop_boundary(evals) and self._should_stop():
                self.save()
                raise SystemExit(results.EXIT_PREEMPTED)
            last = self.step == plan.total_steps
            if self.step in evals:
                self.run_eval()
            if not last and self._ckpt_due():
                self.save()
        if bar is not None:
            bar.close()

    def _step(self, micro_batches) -> torch.Tensor:
        """One optimizer step over `accumulation` micro-batches; returns the summed loss."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for images, targets in micro_batches:  # on the device already (Batches.inputs)
            logits = self.engine(images.to(self.dtype))
            loss = F.cross_entropy(logits.float(), targets)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().double() / self.plan.accumulation
        if self.faults.get("nan") == self.step + 1:
            total *= float("nan")  # fault injection (tests): this step's loss is NaN
        return total

    def _log_train(self) -> None:
        first, steps = self.meter.window_step + 1, self.step - self.meter.window_step
        loss_sum, skipped, wait = self._global_window(self.meter.window_wait_fraction())
        loss = loss_sum / (steps * self.plan.world_size)
        self.window.zero_()
        images = steps * self.cfg.batch_size
        flops = training_flops(self.vit_cfg, images)
        seconds = self.meter.end_window(self.step)
        tflops = flops / max(seconds, 1e-9) / self.plan.world_size / 1e12
        lr = lr_at(self.cfg, self.step - 1, self.plan.total_steps)
        row = self._row("train", loss=loss, lr=lr,
                        images_per_s=images / max(seconds, 1e-9), tflops=tflops,
                        mfu=self.meter.mfu(tflops, self.cfg.peak_tflops), mem_gb=memory_gb(),
                        skipped_samples=int(skipped), data_wait_fraction=wait)
        self._emit(row)
        if wait > results.INPUT_BOUND and self.dist_info.is_main:
            self._warn_input_bound(wait, first)

    def _warn_input_bound(self, wait: float, first: int) -> None:
        """The one warning line of a window whose data_wait_fraction passed INPUT_BOUND."""
        cfg = self.cfg
        now = (f"--num-workers {cfg.num_workers}, --in-memory {cfg.in_memory} ("
               f"{'in memory' if self.batches.in_memory else 'streamed'}), "
               f"--decode-on {cfg.decode_on}")
        log.warning("input-bound: steps %d-%d spent %.0f%% of their time waiting for the next "
                    "batch (data_wait_fraction %.3f > %g, max over ranks): the loader, not the "
                    "model, set their speed; raise --num-workers, read the data into memory "
                    "(--in-memory on) or decode on the device (--decode-on device) (now: %s)",
                    first, self.step, 100 * wait, wait, results.INPUT_BOUND, now)

    def _global_window(self, wait: float = 0.0) -> tuple[float, int, float]:
        """(loss summed over the window and all ranks, skipped samples over all ranks, the max
        of `wait` over ranks), one all-reduce; raises Diverged on a NaN/inf loss, so nothing is
        logged or saved after a divergence."""
        (loss_sum, skipped), (wait,) = dist.all_reduce_sum_max(
            [float(self.window), self.meter.skipped], [wait], self.device)
        if not math.isfinite(loss_sum):
            raise Diverged(f"loss is {loss_sum} in the steps up to {self.step}")
        self.meter.skipped_global = int(skipped)
        return loss_sum, int(skipped), wait

    def _ckpt_due(self) -> bool:
        """--ckpt-every N: every N steps. Nm: once N minutes passed since the last save (or
        the start) by rank 0's clock, asked at log steps only, where all ranks take the same
        decision from one all-reduce."""
        if self.step in self.pinned:
            return True
        if self.ckpt_steps:
            return self.step % self.ckpt_steps == 0
        if not self.ckpt_minutes or self.step % self.cfg.log_every:
            return False
        due = time.monotonic() - self._last_save >= 60 * self.ckpt_minutes
        return bool(dist.all_reduce_max(int(due and self.dist_info.is_main), self.device))

    def _stop_boundary(self, evals: set[int]) -> bool:
        """Whether to check for a stop here (scaling.loop.is_stop_boundary): every
        poll_every steps, at eval and checkpoint steps and at the last one."""
        return is_stop_boundary(self.step, self.poll_every, evals, self.ckpt_steps,
                                self.plan.total_steps)

    def _should_stop(self) -> bool:
        """Whether a stop signal reached any rank; raises RunDirRefused (on every rank) when
        rank 0 lost the run dir's lock, since another process now trains in it."""
        lost = self.lock is not None and self.lock.lost
        code = dist.all_reduce_max(_LOCK_LOST if lost else _STOP["signal"], self.device)
        if code == _LOCK_LOST:
            raise RunDirRefused(f"another process took over the lock of {self.out} (this one "
                                "stalled past the lock's stale time?); stopped without "
                                "writing anything more")
        return bool(code)

    def _progress_bar(self):
        if not (self.dist_info.is_main and self.cfg.progress and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        self._bar = tqdm(total=self.plan.total_steps, initial=self.step, unit="step")
        return self._bar


_LOCK_LOST = 1000  # above every signal number
_STOP = {"signal": 0}  # set by the handler; the loop checks it (all ranks agree) at each
# stop boundary (Run._stop_boundary: every stop_poll_every steps, eval and checkpoint steps)


def install_signal_handlers() -> None:
    """SIGTERM (preemption, torchrun) and SIGUSR2 (SLURM's warning before a time limit) only
    set a flag, so a signal delivered twice, or during start-up, is harmless: the run saves a
    checkpoint at the next stop boundary (Run._stop_boundary) and exits with EXIT_PREEMPTED."""
    def handler(signum, frame):
        _STOP["signal"] = signum
        log.warning("received %s: will checkpoint and exit", signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, handler)


def execute(run: Run) -> int:
    """Train to the end (or to a signal) and record the outcome; returns the exit code."""
    try:
        run.build()
        run.train()
        run.finish()
        return results.EXIT_OK
    except SystemExit as e:
        if e.code == results.EXIT_PREEMPTED:
            log.warning("checkpointed at step %d; rerun the same command to resume", run.step)
        return int(e.code or 0)
    except RunDirRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return results.EXIT_BAD_INPUT
    except Diverged as e:
        log.error("diverged: %s", e)
        run.record_final(results.STATUS_DIVERGED, str(e))
        return results.EXIT_DIVERGED
    except DiskFull as e:
        log.error("%s", e)
        run.record_final(results.STATUS_FAILED, str(e))
        return results.EXIT_FAILED
    except Exception as e:
        log.exception("run failed")
        run.record_final(results.STATUS_FAILED, f"{type(e).__name__}: {e}")
        return results.EXIT_FAILED
    finally:
        if run.tracker is not None:
            run.tracker.close()
        if run.lock is not None:
            run.lock.release()
        dist.shutdown()


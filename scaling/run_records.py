"""Evaluation, checkpoints and result rows of a run (scaling.run.Run inherits them): the eval
rows, the checkpoint's client state, the export and final.json; a full disk in one line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from scaling import dist, pretrained, results
from scaling.flops import training_flops
from scaling.loop import evaluate
from scaling.segments import device_hours
from scaling.writes import DiskFull, disk_full_message, is_disk_full

log = logging.getLogger("scaling.train")  # one logger name for the run (tests read it)


def checkpoint_disk_full(error: Exception, what: str, ckpt_dir: Path) -> Exception:
    """`error` turned into a results.DiskFull when the disk under ckpt_dir is full (a partial
    checkpoint removed, the last complete one kept and named), else `error` itself. torch.save
    on a full disk raises RuntimeError("... iostream error"), without errno, hence the check of
    the free space."""
    full = is_disk_full(error)
    try:
        full = full or shutil.disk_usage(ckpt_dir).free < (1 << 20)
    except OSError:
        pass
    if not full:
        return error
    from scaling import engine as eng  # late: DeepSpeed takes seconds to import

    eng.remove_incomplete(ckpt_dir)
    done = eng.complete_checkpoints(ckpt_dir)
    kept = f"{ckpt_dir / done[-1][1]} kept" if done else "none"
    head = str(error) if isinstance(error, DiskFull) else disk_full_message(what)
    return DiskFull(f"{head}; last complete checkpoint: {kept}. Free space and rerun to resume")


class RunRecords:
    """The evaluation, checkpoint and result-writing methods of scaling.run.Run (a mixin: they
    use the run's state, set up by Run)."""

    def run_eval(self) -> dict:
        """Evaluate on the val split (all ranks) and log an eval row."""
        self._global_window()  # a diverged model is not evaluated
        if self.faults.get("eval_error") == self.step:
            raise RuntimeError(f"injected eval failure at step {self.step}")
        t0 = time.perf_counter()
        stats = evaluate(self.engine, self.batches.eval_loader(), self.batches.device_inputs,
                         self.dtype)
        self.meter.add("eval", time.perf_counter() - t0)
        row = self._row("eval", **stats)
        self.last_eval = {k: row[k] for k in ("top1", "top5", "loss", "step")}
        if self.best_top1 is None or row["top1"] > self.best_top1:
            self.best_top1 = row["top1"]
        self._emit(row)
        if self.fewshot is not None:
            t0 = time.perf_counter()
            for probe in self.fewshot.evaluate(self.engine, self.vit_cfg, self.dist_info,
                                               self.device):
                self._emit({**probe, "source": "train", **{k: row[k] for k in (
                    "step", "images_seen", "flops_seen")}}, results.TRANSFER_FILE)
            self.meter.add("fewshot", time.perf_counter() - t0)
        return row

    def save(self) -> None:
        """A complete checkpoint at the current step (all ranks)."""
        from scaling import engine as eng  # late: DeepSpeed takes seconds to import

        t0 = time.perf_counter()
        window_loss, skipped, _ = self._global_window()  # never checkpoint a diverged model
        client = {"step": self.step, "best_top1": self.best_top1, "last_eval": self.last_eval,
                  "meter": self.meter.state(), "skipped": skipped, "window_loss": window_loss,
                  "window_step": self.meter.window_step, "metrics_rows": self.rows_logged,
                  "transfer_rows": self.transfer_rows, "ckpt_cost": self.ckpt_cost.state(),
                  "segments": self.segments.upto(self.step, self.meter.wall(),
                                                 self.meter.not_charged_s())}
        error = None
        try:
            eng.save_checkpoint(self.engine, self.ckpt_dir, self.step, client,
                                self.cfg.keep_ckpts, pinned=self.pinned,
                                crash=self.faults.get("kill_in_save") == self.step)
        except (OSError, RuntimeError) as e:
            error = checkpoint_disk_full(e, f"writing a checkpoint under {self.ckpt_dir}",
                                         self.ckpt_dir)
        if error is not None:  # raised out here, so the frames holding the partial files'
            raise error  # handles (in the save's traceback) are gone and their space is freed
        self.meter.add("checkpoint", time.perf_counter() - t0)
        self.ckpt_cost.add(time.perf_counter() - t0)
        self._last_save = time.monotonic()

    def finish(self) -> dict:
        """Checkpoint (before anything that can still fail), final eval, export, final.json."""
        from scaling import engine as eng  # late: DeepSpeed takes seconds to import

        self.data_wait_global = dist.all_reduce_sum_max(
            [], [self.meter.run_wait_fraction()], self.device)[1][0]  # all ranks are here
        saved = [step for step, _ in eng.complete_checkpoints(self.ckpt_dir)]
        if not saved or saved[-1] != self.step:
            self.save()
        if self.last_eval is None or self.last_eval["step"] != self.step:
            self.run_eval()
        meta = {"vit_config": json.dumps(dataclasses.asdict(self.vit_cfg)), "step": str(self.step)}
        t0 = time.perf_counter()
        try:
            eng.export_safetensors(self.engine, self.out / results.EXPORT_FILE, meta)
        except (OSError, RuntimeError) as e:
            raise checkpoint_disk_full(e, f"writing {self.out / results.EXPORT_FILE}",
                                       self.ckpt_dir) from None
        self.meter.add("export", time.perf_counter() - t0)
        if self.pretrained is not None and self.dist_info.is_main:  # its row, in the pre-training
            pretrained.record_transfer(self.cfg, self.pretrained, self.out, self.data_info)
        return self.record_final(results.STATUS_OK)

    def record_final(self, status: str, error: str | None = None) -> dict:
        """final.json, written by rank 0 only while it owns the run dir."""
        wall = self.meter.wall()
        ev = self.last_eval or {}
        segments = self.segments.upto(self.step, wall, self.meter.not_charged_s())
        final = {
            "status": status, "final_top1": ev.get("top1"), "best_top1": self.best_top1,
            "final_top5": ev.get("top5"), "final_loss": ev.get("loss"), "steps": self.step,
            "images_seen": self.step * self.cfg.batch_size,
            "total_flops": training_flops(self.vit_cfg, self.step * self.cfg.batch_size),
            "params": self.plan.params, "macs_per_image": self.plan.macs_per_image,
            "model": self.vit_cfg.name, "wall_hours": wall / 3600,
            "device_hours": device_hours(segments),
            "op_build_s": self.meter.op_build_s,
            "world_size": self.plan.world_size, "segments": segments,
            "skipped_samples": self.meter.skipped_global,
            "overhead_fraction": self.meter.overhead_fraction(wall),
            "data_wait_fraction": (self.meter.run_wait_fraction() if self.data_wait_global is None
                                   else self.data_wait_global),
            "overhead_breakdown_s": self.meter.breakdown(wall), "error": error,
            **self.ckpt_cost.final(self._last_complete()),
            **(pretrained.final_fields(self.pretrained) if self.pretrained else {}),
        }
        if self.dist_info.is_main and self.lock is not None:
            try:
                results.write_json(self.out / results.FINAL_FILE, final)
            except OSError as e:
                log.error("could not write %s: %s", self.out / results.FINAL_FILE, e)
        return final

    data_wait_global = None  # over all ranks, set by finish (record_final falls back on rank 0's)

    def _last_complete(self) -> Path | None:
        """The newest complete checkpoint's folder, or None."""
        from scaling import engine as eng  # late: DeepSpeed takes seconds to import

        done = eng.complete_checkpoints(self.ckpt_dir)
        return self.ckpt_dir / done[-1][1] if done else None

    def _row(self, kind: str, **values) -> dict:
        images = self.step * self.cfg.batch_size
        return {"kind": kind, "step": self.step, "epoch": images / self.plan.samples_per_epoch,
                "images_seen": images, "flops_seen": training_flops(self.vit_cfg, images),
                "wall_s": self.meter.wall(), **values}

    def _emit(self, row: dict, name: str = results.METRICS_FILE) -> None:
        if not self.dist_info.is_main:
            return
        metrics = name == results.METRICS_FILE
        try:
            (results.append_metrics if metrics else results.append_transfer)(self.out, row)
        except OSError as e:
            raise checkpoint_disk_full(e, str(e), self.ckpt_dir) from None
        self.rows_logged += metrics
        self.transfer_rows += not metrics
        if self.tracker is not None:
            self.tracker.log(row)
        if self._bar is None and metrics:
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()
                     if k in ("step", "loss", "lr", "top1", "images_per_s", "mfu")}
            log.info("%s %s", row["kind"], " ".join(f"{k}={v}" for k, v in shown.items()))

    _bar = None  # the progress bar (Run._progress_bar) when one is shown

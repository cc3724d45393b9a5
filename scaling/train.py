"""One training run: `python -m scaling.train --model NAME --data DIR --out RUN_DIR --steps N`.

Parse and validate (before any training), build the model and the DeepSpeed engine, resume from
the newest complete checkpoint if RUN_DIR has one, train, evaluate, checkpoint, export, and write
final.json. Exit codes are in scaling.results (0 ok, 2 bad input, 3 diverged, 75 preempted).
This module parses and validates; the run itself is scaling.run (its records scaling.run_records).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from scaling import branch, clihelp, dist, pretrained, results, tracking
from scaling.config import RESUMABLE_FIELDS, TrainConfig, resolve_plan
from scaling.data import load_dataset_info
from scaling.data.labels import check_labels
from scaling.data.samples import jpeg_draft_setting
from scaling.fewshot import TrainingProbe
from scaling.run import Run, execute, install_signal_handlers

log = logging.getLogger("scaling.train")


def prepare(cfg: TrainConfig, world_size: int):
    """Validate data, batch layout, budget, few-shot data and run dir; raises ValueError before
    any training. Returns (dataset info, model config, TrainPlan, few-shot probe or None)."""
    if not Path(cfg.data).is_dir():
        raise ValueError(f"data dir {cfg.data!r} does not exist")
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--precision fp16 needs a GPU (DeepSpeed's CPU accelerator has no "
                         "fp16); use bf16 or fp32 on a CPU")
    data_info = load_dataset_info(cfg.data, verify=True)
    check_labels(data_info)  # shards that record no label range: read once (cached)
    jpeg_draft_setting()  # a bad VIT_SCALING_JPEG_DRAFT is a DataError (ValueError) here
    if not data_info.has_split("val"):
        raise ValueError(f"dataset {cfg.data} has no val split (splits: "
                         f"{sorted(data_info.splits)}); every run evaluates on it: rebuild it "
                         "with a val split (make_shards --val-fraction > 0)")
    plan = resolve_plan(cfg, data_info, world_size)
    vit_cfg = cfg.vit(num_classes=data_info.num_classes, image_size=data_info.image_size)
    fewshot = TrainingProbe.from_config(cfg, vit_cfg)  # None without --fewshot
    tracking.check(cfg)  # --tensorboard / --wandb can run here
    results.check_writable(cfg.out)
    results.check_readable(cfg.out)
    results.check_config(cfg.out, cfg.to_dict(), resumable=RESUMABLE_FIELDS,
                         defaults=TrainConfig.defaults())
    if cfg.trunk_run is not None:  # a branch: its trunk's recipe and checkpoint (scaling.branch)
        branch.check_branch(cfg.to_dict(), TrainConfig.defaults(), RESUMABLE_FIELDS)
    if cfg.init_from is not None:  # a fine-tune: a finished run's export (scaling.finetune)
        pretrained.check(cfg, vit_cfg, data_info.root)
    return data_info, vit_cfg, plan, fewshot


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    install_signal_handlers()
    dist_info = dist.dist_info()
    logging.basicConfig(level=logging.INFO if dist_info.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {dist_info.rank}] %(levelname)s %(message)s")
    try:
        cfg = TrainConfig.from_args(argv)
        data_info, vit_cfg, plan, fewshot = prepare(cfg, dist_info.world_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return results.EXIT_BAD_INPUT
    log.info("rank %d of %d (local rank %d, launcher: %s, master %s:%d)", dist_info.rank,
             dist_info.world_size, dist_info.local_rank, dist_info.launcher,
             dist_info.master_addr, dist_info.master_port)
    final = results.read_final(cfg.out)
    if final and final["status"] == results.STATUS_OK:
        log.info("%s already finished (final.json status ok); nothing to do", cfg.out)
        return results.EXIT_OK
    return execute(Run(cfg, data_info, vit_cfg, plan, dist_info, fewshot))


if __name__ == "__main__":
    clihelp.exit_now(main())

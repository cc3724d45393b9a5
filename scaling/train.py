"""One training run: `python -m scaling.train --model NAME --data DIR --out RUN_DIR --steps N`.

Parse and validate (before any training), build the model and the DeepSpeed engine, resume from
the newest complete checkpoint if RUN_DIR has one, train, evaluate, checkpoint, export, and write
final.json. Exit codes are in scaling.results (0 ok, 2 bad input, 3 diverged, 75 preempted).
This module parses and validates; the run itself is scaling.run (its records scaling.run_records).
"""

from __future__ import annotations

import logging
import sys

from scaling import clihelp, dist, results
from scaling.checks import check_run
from scaling.config import TrainConfig
from scaling.run import Run, execute, install_signal_handlers

log = logging.getLogger("scaling.train")


def prepare(cfg: TrainConfig, world_size: int):
    """Every up-front check (scaling.checks.check_run, the sweep's too); raises ValueError
    before any training. Returns (dataset info, model config, TrainPlan, few-shot probe or
    None)."""
    checked = check_run(cfg, world_size)
    return checked.data_info, checked.vit_cfg, checked.plan, checked.fewshot


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

"""A run's up-front checks, in one function (`check_run`) that `python -m scaling.train` (so
also scaling.finetune) calls before it builds anything, and that the sweep (launchers.launch)
calls for every run it is about to submit or start, before any claim or submission: bad input
is one ValueError line and exit 2 there, never a run dir left "failed". The sweep passes a
`cache`, so what depends only on the data dir, the environment or the few-shot sets is checked
once per distinct value. The list, and what only a run's own start can check:
docs/failure-model.md ("Checked before work").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from scaling import branch, pretrained, results, tracking
from scaling.config import RESUMABLE_FIELDS, TrainConfig, TrainPlan, resolve_plan
from scaling.data import DatasetInfo, load_dataset_info
from scaling.data.labels import check_labels
from scaling.data.samples import jpeg_draft_setting
from scaling.fewshot import TrainingProbe
from scaling.model import ViTConfig
from scaling.run import faults_from_env


@dataclass(frozen=True)
class Checked:
    """What the checks resolved, which training goes on with."""

    data_info: DatasetInfo
    vit_cfg: ViTConfig
    plan: TrainPlan
    fewshot: TrainingProbe | None  # None without --fewshot


def check_env() -> None:
    """The environment variables a run reads (VIT_SCALING_JPEG_DRAFT, VIT_SCALING_FAULTS)."""
    jpeg_draft_setting()  # a bad value is a DataError (a ValueError)
    faults_from_env()


def check_data(data: str) -> DatasetInfo:
    """A training data dir: dataset.json, its shards (size and cached sha256), every label in
    range, and a val split (every run evaluates on it)."""
    if not Path(data).is_dir():
        raise ValueError(f"data dir {data!r} does not exist")
    info = load_dataset_info(data, verify=True)
    check_labels(info)  # shards that record no label range: read once (cached)
    if not info.has_split("val"):
        raise ValueError(f"dataset {data} has no val split (splits: {sorted(info.splits)}); "
                         "every run evaluates on it: rebuild it with a val split (make_shards "
                         "--val-fraction > 0)")
    return info


def _once(cache: dict | None, key: tuple, check):
    """check() once per key of `cache` (None: every time)."""
    if cache is None:
        return check()
    if key not in cache:
        cache[key] = check()
    return cache[key]


def check_upstream(cfg: TrainConfig, vit_cfg: ViTConfig, data_root, *, planned: bool) -> None:
    """A branch's trunk and a fine-tune's pre-training run (scaling.branch, scaling.pretrained).
    `planned` (the sweep): an upstream run that has not got that far yet is checked when the
    run starts, since the sweep starts it only then."""
    if cfg.trunk_run is not None and (
            not planned or branch.ready(cfg.out, cfg.trunk_run, cfg.branch_step)):
        branch.check_branch(cfg.to_dict(), TrainConfig.defaults(), RESUMABLE_FIELDS)
    if cfg.init_from is not None:
        final = results.read_final(cfg.init_from) if Path(cfg.init_from).is_dir() else None
        if not planned or (final or {}).get("status") == results.STATUS_OK:
            pretrained.check(cfg, vit_cfg, data_root)


def check_run(cfg: TrainConfig, world_size: int, *, cache: dict | None = None,
              here: bool = True, planned: bool = False, run_dir: bool = True) -> Checked:
    """Every check of a run before work; ValueError (one line) naming the problem. `here`:
    the run executes on this machine (a GPU for fp16); `planned`: the sweep plans it (see
    check_upstream); `run_dir`: check (and make) its run dir, not in a dry run."""
    if here and cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--precision fp16 needs a GPU (DeepSpeed's CPU accelerator has no "
                         "fp16); use bf16 or fp32 on a CPU")
    _once(cache, ("env",), check_env)
    info = _once(cache, ("data", cfg.data), lambda: check_data(cfg.data))
    plan = resolve_plan(cfg, info, world_size)
    vit_cfg = cfg.vit(num_classes=info.num_classes, image_size=info.image_size)
    fewshot = _once(cache, ("fewshot", cfg.fewshot, cfg.fewshot_shots, cfg.fewshot_seeds,
                            cfg.eval_batch_size or cfg.batch_size, vit_cfg.patch_size),
                    lambda: TrainingProbe.from_config(cfg, vit_cfg))
    _once(cache, ("tracking", cfg.tensorboard, cfg.wandb), lambda: tracking.check(cfg))
    check_upstream(cfg, vit_cfg, info.root, planned=planned)  # before the run dir is made
    if run_dir:
        results.check_readable(cfg.out)
        results.check_config(cfg.out, cfg.to_dict(), resumable=RESUMABLE_FIELDS,
                             defaults=TrainConfig.defaults())
        results.check_writable(cfg.out)
    return Checked(info, vit_cfg, plan, fewshot)

"""The frozen config of one training run (`TrainConfig`), its CLI flags and their validation.

Every field is one CLI flag (`--batch-size` for `batch_size`), so `TrainConfig.from_args` and
`cfg.to_args()` round-trip, and `config.json` in the run dir is `dataclasses.asdict(cfg)`. What
a config resolves to (steps, batch layout, the learning rate at a step) is scaling.runplan's;
its names are re-exported here, where the launchers and the tests import them from.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from scaling.clihelp import DefaultsHelpFormatter
from scaling.data.memory import IN_MEMORY_CHOICES
from scaling.data.samples import DECODE_ON
from scaling.model import ViTConfig, split_name, vit_config
from scaling.runplan import (  # noqa: F401 (re-exported: the public names of scaling.config)
    EVALS_PER_DECADE,
    TrainPlan,
    batch_layout,
    check_schedule,
    cooldown_steps,
    eval_steps,
    lr_at,
    resolve_plan,
    resolve_steps,
    warmup_steps,
)
from scaling.schedule import COOLDOWN_SHAPES, SCHEDULES, STABLE

BUDGETS = ("steps", "epochs", "samples", "flops")
PRECISIONS = ("fp32", "bf16", "fp16")
DATA_ORDERS = ("sharded", "global")
OPTIMIZERS = ("adamw", "sgd")
EVAL_SPACINGS = ("linear", "log")
# Fields that may change between a run and its resumption without changing its results.
RESUMABLE_FIELDS = ("num_workers", "log_every", "progress", "out", "data", "eval_every",
                    "eval_spacing",
                    "ckpt_every", "keep_ckpts", "stop_poll_every", "tensorboard", "wandb",
                    "compile")  # compiled or eager: the same numbers up to float rounding


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class TrainConfig:
    """One run: model, data, budget, optimisation recipe, and run-time settings."""

    model: str = _f(None, "ViT name SIZE/PATCH, e.g. B/16 or mu/4", required=True)
    data: str = _f(None, "shard directory (with dataset.json)", required=True)
    out: str = _f(None, "run directory (created; rerunning resumes)", required=True)
    steps: int | None = _f(None, "budget: optimizer steps")
    epochs: float | None = _f(None, "budget: passes over the train split")
    samples: int | None = _f(None, "budget: training images")
    flops: float | None = _f(None, "budget: training FLOPs (6 x MACs x images)")
    batch_size: int = _f(128, "global batch size (micro batch x accumulation x world size)")
    micro_batch_size: int | None = _f(None, "per-rank micro batch (default: no accumulation)")
    image_size: int | None = _f(None, "input resolution (default: the dataset's)")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    min_lr: float = _f(0.0, "final learning rate of the decay")
    warmup_steps: int | None = _f(None, "linear warmup steps (default: warmup_fraction)")
    warmup_fraction: float = _f(0.05, "warmup as a fraction of the run when warmup_steps unset")
    schedule: str = _f("cosine", "after warmup: cosine/linear decay to the end, or constant/rsqrt "
                       "(lr / sqrt(1 + (step - warmup) / rsqrt_timescale)) with an optional "
                       "cooldown (scaling.schedule)", choices=SCHEDULES)
    cooldown_steps: int | None = _f(None, "constant/rsqrt: the final cooldown in steps "
                                    "(default: cooldown_fraction)")
    cooldown_fraction: float = _f(0.0, "constant/rsqrt: the final cooldown as a fraction of the "
                                  "run when cooldown_steps is unset (0: none)")
    cooldown_shape: str = _f("linear", "cooldown factor: linear (big_vision) or 1-sqrt "
                             "(Hagele et al. 2024)", choices=COOLDOWN_SHAPES)
    rsqrt_timescale: int = _f(10000, "rsqrt schedule's timescale in steps")
    optimizer: str = _f("adamw", "adamw (pre-training) or sgd with momentum (fine-tuning, ViT "
                        "paper App. B.1.1; scaling.finetune)", choices=OPTIMIZERS)
    momentum: float = _f(0.9, "SGD momentum (--optimizer sgd)")
    weight_decay: float = _f(0.05, "AdamW decoupled weight decay (not on norms/biases/pos/cls); "
                             "with sgd, L2 on the same parameters")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.999, "AdamW beta2")
    grad_clip: float = _f(1.0, "global gradient-norm clipping (0: off)")
    zero: int = _f(0, "DeepSpeed ZeRO stage", choices=(0, 1, 2, 3))
    precision: str = _f("fp32", "training precision", choices=PRECISIONS)
    grad_checkpointing: bool = _f(False, "recompute each block's activations in backward")
    pool: str = _f("cls", "classifier input: class token or global average pool",
                   choices=("cls", "gap"))
    dropout: float = _f(0.0, "dropout rate")
    drop_path: float = _f(0.0, "stochastic depth rate")
    label_smoothing: float = _f(0.0, "label smoothing")
    mixup_alpha: float = _f(0.0, "mixup alpha (0: off)")
    cutmix_alpha: float = _f(0.0, "cutmix alpha (0: off)")
    min_crop_scale: float | None = _f(None, "random-resized-crop smallest area fraction "
                                         "(default: the dataset's, see scaling.data.transforms)")
    hflip: bool | None = _f(None, "random horizontal flips (default: the dataset's)")
    seed: int = _f(0, "seed of initialisation, data order and augmentation")
    data_order: str = _f("sharded", "sharded: each rank reads its own shards; global: every "
                         "rank reads the global batch and keeps its slice (world-size invariant)",
                         choices=DATA_ORDERS)
    in_memory: str = _f("auto", "read the data into memory once and augment whole batches "
                        "(auto: when the decoded train and val splits fit in 1 GiB and the "
                        "run reads at least one epoch; scaling.data.memory)", choices=IN_MEMORY_CHOICES)
    decode_on: str = _f("workers", "where JPEGs are decoded: workers (PIL in the loader "
                        "processes) or device (the training process, on its device: nvJPEG "
                        "through torchvision on CUDA; on a CPU the workers' own decoder); "
                        "in-memory data is decoded once either way (scaling.data.device)",
                        choices=DECODE_ON)
    compile: bool = _f(False, "torch.compile the model (scaling.engine); the compile time is "
                       "final.json's overhead_breakdown_s['compile'], not training time")
    samples_per_epoch: int | None = _f(None, "images per epoch (default: train split size)")
    eval_every: int = _f(0, "evaluate every N steps (0: only at the end)")
    eval_spacing: str = _f("linear", "linear: at eval_every, 2 x eval_every, ...; log: at "
                           "eval_every x 10^(k/4), 4 per decade (even in log compute)",
                           choices=EVAL_SPACINGS)
    eval_batch_size: int | None = _f(None, "per-rank eval batch (default: micro batch)")
    fewshot: str | None = _f(None, "few-shot linear probes of the frozen features at every eval "
                             "point on these shard dirs, comma-separated (scaling.fewshot; rows "
                             "in RUN_DIR/transfer.jsonl)")
    fewshot_shots: str = _f("1,5,10,25", "few-shot train images per class, comma-separated")
    fewshot_seeds: int = _f(3, "few-shot draws of each k-shot train set (a row per seed)")
    ckpt_every: str = _f("0", "checkpoint every N steps, or every N minutes of wall time with "
                         "Nm (e.g. 30m); 0: only at the end and on a signal")
    keep_ckpts: int = _f(2, "complete checkpoints kept")
    ckpt_at: str | None = _f(None, "also checkpoint after these steps, comma-separated; never "
                             "rotated away (a branching trunk's branch points)")
    trunk_run: str | None = _f(None, "start from this run's checkpoint at branch_step (a "
                               "relative path is taken from --out's parent: a sibling run id)")
    branch_step: int | None = _f(None, "the trunk step this run branches at (with --trunk-run)")
    init_from: str | None = _f(None, "fine-tune: start from this finished run's export "
                               "(model.safetensors) with position embeddings resized and a new "
                               "zero head (scaling.finetune); a resume uses its own checkpoint")
    log_every: int = _f(10, "log a train row every N steps")
    stop_poll_every: int = _f(0, "check for a stop signal (SIGTERM, SIGUSR2) every N steps and at "
                              "every eval and checkpoint step; 0: every step on a CPU, every 10 "
                              "on a GPU, where a check syncs host and device (scaling.loop)")
    num_workers: int = _f(2, "data loader workers per rank")
    strict_data: bool = _f(False, "a corrupt image is an error instead of a counted skip")
    peak_tflops: float | None = _f(None, "device peak TFLOP/s for MFU (default: table)")
    progress: bool = _f(True, "progress bar on a terminal")
    tensorboard: bool = _f(True, "TensorBoard event files in RUN_DIR/tb (scaling.tracking)")
    wandb: str | None = _f(None, "also log to this Weights & Biases project (needs wandb; "
                           "WANDB_MODE=offline works without a network)")

    def __post_init__(self):
        object.__setattr__(self, "ckpt_every", str(self.ckpt_every).strip())  # 500 or "500"
        _validate(self)

    @property
    def budget(self) -> tuple[str, float]:
        """The budget kind and amount."""
        (kind,) = [b for b in BUDGETS if getattr(self, b) is not None]
        return kind, getattr(self, kind)

    @property
    def ckpt_at_steps(self) -> list[int]:
        """The --ckpt-at steps, in the order given (none without the flag)."""
        return parse_list(self.ckpt_at, "--ckpt-at", int) if self.ckpt_at else []

    def vit(self, *, num_classes: int, image_size: int) -> ViTConfig:
        """The model config of this run for a dataset's classes and resolution."""
        return vit_config(self.model, image_size=self.image_size or image_size,
                          num_classes=num_classes, pool=self.pool, dropout=self.dropout,
                          drop_path=self.drop_path, grad_checkpointing=self.grad_checkpointing)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def defaults(cls) -> dict:
        """{field: default} (None for required fields)."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def to_args(self) -> list[str]:
        """CLI flags that rebuild this config with from_args (defaults omitted)."""
        args = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default and not f.metadata.get("required") or value is None:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + flag[2:])
            else:
                args += [flag, str(value)]
        return args

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        """An argparse parser with one flag per field."""
        p = argparse.ArgumentParser(prog="python -m scaling.train",
                                    description="Train one ViT under DeepSpeed ZeRO.",
                                    formatter_class=DefaultsHelpFormatter)
        budget = p.add_mutually_exclusive_group(required=True)
        for f in dataclasses.fields(cls):
            kind = field_type(f)
            kw = dict(help=f.metadata["help"], dest=f.name)
            if kind is bool:
                kw.update(action=argparse.BooleanOptionalAction, default=f.default)
            else:
                kw.update(type=kind, default=f.default, choices=f.metadata.get("choices"))
                kw["required"] = bool(f.metadata.get("required"))
            (budget if f.name in BUDGETS else p).add_argument(
                "--" + f.name.replace("_", "-"), **kw)
        return p

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> TrainConfig:
        """Parse CLI flags; bad flags exit(2) via argparse, bad values raise ValueError."""
        return cls(**vars(cls.parser().parse_args(argv)))


def field_type(f: dataclasses.Field) -> type:
    """The Python type of a TrainConfig field (int, float, bool or str), Optional or not."""
    t = str(f.type).removesuffix(" | None")  # annotations are strings (postponed evaluation)
    return {"int": int, "float": float, "bool": bool, "str": str}[t]


# Fields whose valid values are a fraction in [0, 1): momentum coefficients (AdamW needs
# beta < 1), probabilities, and the smoothing mass moved off the true class.
FRACTIONS = ("beta1", "beta2", "label_smoothing", "dropout", "drop_path", "warmup_fraction",
             "cooldown_fraction", "momentum")


def _validate(c: TrainConfig) -> None:
    for name in ("model", "data", "out"):
        if not getattr(c, name):
            raise ValueError(f"--{name} is required")
    inf = [f"--{f.name.replace('_', '-')} {getattr(c, f.name)}" for f in dataclasses.fields(c)
           if isinstance(getattr(c, f.name), float) and not math.isfinite(getattr(c, f.name))]
    if inf:
        raise ValueError(f"{', '.join(inf)}: must be a finite number")
    frac = [f"--{n.replace('_', '-')} {getattr(c, n)}" for n in FRACTIONS
            if not 0 <= getattr(c, n) < 1]
    if frac:
        raise ValueError(f"{', '.join(frac)}: must be in [0, 1)")
    _, patch = split_name(c.model)
    vit_config(c.model, image_size=c.image_size or patch)  # patch must divide a given size
    given = [b for b in BUDGETS if getattr(c, b) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one budget of {list(BUDGETS)}, got {given or 'none'}")
    if not getattr(c, given[0]) > 0:
        raise ValueError(f"budget --{given[0]} must be positive, got {getattr(c, given[0])}")
    positive = ("batch_size", "lr", "keep_ckpts", "log_every", "fewshot_seeds", "rsqrt_timescale")
    bad = [f"{n}={getattr(c, n)}" for n in positive if not getattr(c, n) > 0]
    ckpt_interval(c.ckpt_every)
    nonneg = ("eval_every", "num_workers", "weight_decay", "grad_clip", "min_lr",
              "mixup_alpha", "cutmix_alpha", "label_smoothing", "stop_poll_every")
    bad += [f"{n}={getattr(c, n)}" for n in nonneg if getattr(c, n) < 0]
    for n in ("micro_batch_size", "image_size", "warmup_steps", "eval_batch_size",
              "samples_per_epoch", "peak_tflops", "cooldown_steps", "branch_step"):
        v = getattr(c, n)
        if v is not None and not v > 0:
            bad.append(f"{n}={v}")
    if bad:
        raise ValueError(f"invalid value(s): {', '.join(bad)} (must be positive / non-negative)")
    if c.min_lr > c.lr:
        raise ValueError(f"--min-lr {c.min_lr} is above the peak --lr {c.lr}")
    if c.micro_batch_size and c.batch_size % c.micro_batch_size:
        raise ValueError(f"batch_size {c.batch_size} is not a multiple of micro_batch_size "
                         f"{c.micro_batch_size}")
    choices = {"zero": (0, 1, 2, 3), "precision": PRECISIONS, "schedule": SCHEDULES,
               "data_order": DATA_ORDERS, "pool": ("cls", "gap"),
               "in_memory": IN_MEMORY_CHOICES, "eval_spacing": EVAL_SPACINGS,
               "cooldown_shape": COOLDOWN_SHAPES, "optimizer": OPTIMIZERS}
    for n, valid in choices.items():
        if getattr(c, n) not in valid:
            raise ValueError(f"{n}={getattr(c, n)!r}; valid: {list(valid)}")
    if not 0 < (c.min_crop_scale or 1) <= 1:
        raise ValueError(f"--min-crop-scale {c.min_crop_scale}: must be in (0, 1]")
    parse_list(c.fewshot_shots, "--fewshot-shots", int)
    _validate_schedule(c)
    if c.fewshot is not None:
        parse_list(c.fewshot, "--fewshot", str)


def ckpt_interval(value) -> tuple[int, float]:
    """(steps, minutes) of --ckpt-every, the one parser of the field: "N" steps or "Nm"
    minutes (one of the two is 0; both 0: only at the end and on a signal); ValueError (one
    line) for any other text."""
    text = str(value).strip()
    try:
        if text.isdigit():
            return int(text), 0.0
        if text.endswith("m") and math.isfinite(float(text[:-1])) and float(text[:-1]) >= 0:
            return 0, float(text[:-1])
    except ValueError:
        pass
    raise ValueError(f"--ckpt-every {value!r}: expected steps (e.g. 500) or minutes of wall "
                     "time (e.g. 30m)")


def _validate_schedule(c: TrainConfig) -> None:
    """Cooldown, checkpoint steps and branch fields (scaling.schedule, launchers.branching)."""
    if (c.cooldown_steps or c.cooldown_fraction) and c.schedule not in STABLE:
        raise ValueError(f"--cooldown-steps/--cooldown-fraction need --schedule constant or "
                         f"rsqrt; {c.schedule} already decays to the end of the run")
    if c.ckpt_at is not None:
        parse_list(c.ckpt_at, "--ckpt-at", int)
    if (c.trunk_run is None) != (c.branch_step is None):
        raise ValueError("--trunk-run and --branch-step go together: give both or neither")
    if c.trunk_run is not None and c.warmup_steps is None:
        raise ValueError("a branch (--trunk-run) needs --warmup-steps: a warmup fraction "
                         "depends on the run's length, so the trunk's would differ")


def pinned_steps(cfg: TrainConfig) -> frozenset[int]:
    """The --ckpt-at steps: checkpointed, and kept whatever keep_ckpts says."""
    return frozenset(cfg.ckpt_at_steps)


def parse_list(text: str, flag: str, kind: type) -> list:
    """The items of a comma-separated flag value: non-empty, distinct, and (int) positive;
    ValueError naming the flag otherwise."""
    items = [t.strip() for t in str(text).split(",")]
    try:
        if not all(items) or (kind is int and not all(t.isdigit() for t in items)):
            raise ValueError
        values = [kind(t) for t in items]
    except ValueError:
        what = "positive integers" if kind is int else "non-empty items"
        raise ValueError(f"{flag} {text!r}: expected comma-separated {what}") from None
    if len(set(values)) != len(values) or (kind is int and min(values) < 1):
        raise ValueError(f"{flag} {text!r}: items must be distinct" + (" and positive"
                                                                        if kind is int else ""))
    return values

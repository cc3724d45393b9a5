"""Named sweep recipes: sizes, compute budgets and the training recipe, as functions.

A preset fixes the *global* batch size; `--gpus` only splits it over ranks, so a run's results do
not depend on how many devices trained it. The peak learning rate follows DeiT's linear scaling
rule, lr = base_lr x batch_size / 512 (Touvron et al. 2021, Sec. 6 "Training details" and
Table 9), with `base_lr` the rate at a global batch of 512; `--lrs` sweeps base rates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

LR_REFERENCE_BATCH = 512  # DeiT: lr = 5e-4 x batchsize / 512


@dataclass(frozen=True)
class Preset:
    """A sweep recipe; `train` holds TrainConfig fields (flag names with underscores)."""

    name: str
    description: str
    sizes: tuple[str, ...]  # sizes of scaling.model.SIZES, without patch
    patch: int  # patch size for sizes given without one
    budgets: tuple[float, ...]  # in units of `budget_kind`
    budget_kind: str = "flops"  # a TrainConfig budget field: flops, steps, epochs, samples
    batch_size: int = 512  # global, fixed for every world size
    base_lr: float = 5e-4  # peak lr at a global batch of LR_REFERENCE_BATCH
    train: dict = field(default_factory=dict)
    device: str = "cuda"  # "cpu": ranks are CPU processes (gloo), no GPUs are requested
    gpus: int = 1  # default GPUs (ranks) per run
    builtin_data: str | None = None  # "digits"/"shapes": made on demand when --data is absent
    data_args: dict = field(default_factory=dict)  # scaling.data.make_builtin_shards kwargs
    # built-in downstream sets probed (scaling.fewshot) at every eval when the built-in data is
    # used: {"sets": ((name, source, make_builtin_shards kwargs), ...), "shots": "1,5",
    # "seeds": 3}; `name` is the folder's, so the `dataset` of the rows and of --metric
    fewshot_builtin: dict = field(default_factory=dict)
    slurm: dict = field(default_factory=dict)  # defaults for launchers.slurm (time, cpus...)
    # the dataset the recipe is made for (name, image_size, classes, train, val): a dry run
    # without --data plans with it, clearly marked as a placeholder (launchers.defaults)
    nominal_data: dict = field(default_factory=dict)

    def lr(self, base_lr: float | None = None, batch_size: int | None = None) -> float:
        """Peak lr for a global batch by the linear scaling rule (DeiT)."""
        base = self.base_lr if base_lr is None else base_lr
        return base * (batch_size or self.batch_size) / LR_REFERENCE_BATCH

    def replace(self, **changes) -> Preset:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


DEMO_VAL_FRACTION = 0.3  # the demo's digits val split, which its downstream set mirrors


def demo() -> Preset:
    """CPU demo: the micro ladder on built-in digits; minutes on 2 CPU cores."""
    return Preset(
        name="demo",
        description="micro ViTs on built-in 8x8 digits, CPU, minutes",
        sizes=("mu", "m1", "m2"),
        # 4x4 patches: 4 tokens per 8x8 digit. These learn several times faster per step than
        # 2x2 patches (16 tokens) on CPU, so the larger rungs catch up within minutes.
        patch=4,
        # mu gets 108 / 362 / 1086 / 3621 / 10865 steps, m2 10 / 33 / 101 / 337 / 1013: mu wins
        # the smaller budgets, m1 and m2 overtake it at the larger ones (measured table in
        # docs/sweeps.md); 3e11 gives runs of about a minute, the longest ones
        budgets=(3e9, 1e10, 3e10, 1e11, 3e11),
        batch_size=64,
        base_lr=3.2e-2,  # = 4e-3 at batch 64: micro models on 8x8 images take a high rate
        train={"weight_decay": 0.05, "warmup_fraction": 0.1, "label_smoothing": 0.0,
               # evals at steps 25, 44, 79, 141, ... (4 per decade) give each run a learning
               # curve evenly spread in log compute, so the frontier has more than one point per
               # budget to fit the law to, at a few evals per run (an eval of the 539 val images
               # costs about as much as 2-3 training steps)
               "eval_every": 25, "eval_spacing": "log", "ckpt_every": "0", "num_workers": 0,
               "precision": "fp32",
               "zero": 0, "log_every": 10, "progress": False},
        device="cpu",
        gpus=1,
        builtin_data="digits",
        data_args={"val_fraction": DEMO_VAL_FRACTION},  # 539 val images: top-1 steps of 0.2%
        # transfer: 1/5/10-shot linear probes at every eval point, 3 draws each, on mirrored
        # digits drawn only from the 539 val images (never trained on; half k-shot pool, half
        # test): a domain shift the features carry over to. Procedural shapes at 8 px stayed at
        # chance for every size and budget (docs/sweeps.md: that measurement, and the cost)
        fewshot_builtin={"sets": (("digits-mirror", "digits-mirror",
                                   {"holdout_fraction": DEMO_VAL_FRACTION,
                                    "val_fraction": 0.5}),),
                         "shots": "1,5,10", "seeds": 3},
        slurm={"time": 30, "cpus_per_task": 1, "max_parallel": 2},  # 2 runs on 2 cores
    )


def demo_full() -> Preset:
    """The longer CPU study (about 20 min on 2 cores): mu, m1, m2 on built-in 16 px shapes.

    What the 3-minute `demo` cannot show, and what this one does and does not, is measured in
    docs/sweeps.md ("demo-full"): the compute-optimal size grows with compute (every budget's
    IsoFLOP vertex inside the sizes, N_opt ~ C^0.31 [0.23, 0.39]), and m1 beats mu at the larger
    budgets by far more than the intervals; a law that extrapolates, and m2 winning, are out of
    reach of CPU budgets.
    """
    return demo().replace(
        name="demo-full",
        description="micro ViTs on built-in 16 px shapes (difficulty 0.5), CPU, ~20 min",
        sizes=("mu", "m1", "m2"),
        # mu gets 999 / 2999 / 9998 / 29996 / 99987 steps, m2 96 ... 9625: mu wins 1e11, m1 the
        # budgets from 3e11 (measured table in docs/sweeps.md); 1e13 costs ~2/3 of the time
        budgets=(1e11, 3e11, 1e12, 3e12, 1e13),
        builtin_data="shapes",
        # 36,000 train / 4,000 val images at 16 px (16 tokens at patch 4), made once in ~20 s;
        # 4,000 val images: 95 % intervals of about +-1.5 points at 50 % error
        data_args={"num_samples": 40_000, "val_fraction": 0.1, "image_size": 16,
                   "difficulty": 0.5},
        fewshot_builtin={},  # the demo's downstream set mirrors digits, not shapes
    )


def cifar() -> Preset:
    """CIFAR-10/100 from scratch at 32px, patch 4, DeiT-style recipe (needs --data)."""
    return Preset(
        name="cifar",
        description="ViTs from scratch on CIFAR shards (make_shards --from cifar), patch 4",
        sizes=("m3", "m4", "Ti", "S"),
        patch=4,
        budgets=(1e15, 3e15, 1e16, 3e16),
        batch_size=512,
        base_lr=1e-3,  # common from-scratch CIFAR ViT setting at batch 512
        train={"weight_decay": 0.05, "warmup_fraction": 0.05, "label_smoothing": 0.1,
               "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "drop_path": 0.1, "grad_clip": 0.0,
               "precision": "bf16", "zero": 1, "eval_every": 500, "ckpt_every": "1000",
               "num_workers": 4, "compile": True},  # CPU demos stay eager: docs/architecture.md
        device="cuda",
        gpus=1,
        slurm={"time": 240, "cpus_per_task": 6},
        nominal_data={"name": "CIFAR-10", "image_size": 32, "classes": 10, "train": 50_000,
                      "val": 10_000},
    )


def imagenet() -> Preset:
    """ImageNet-1k at 224px, the DeiT recipe (Touvron et al. 2021, Table 9).

    DeiT-B: AdamW, batch 1024, lr 5e-4 x batch/512, cosine decay to 1e-5, 5 warmup epochs of
    300 (a 1.7% fraction), weight decay 0.05, label smoothing 0.1, stochastic depth 0.1, mixup
    0.8, cutmix 1.0, no gradient clipping. The ViT paper's own ImageNet recipe (Appendix B.1,
    Table 3) uses Adam(0.9, 0.999), batch 4096, linear decay after 10k warmup steps, weight
    decay 0.1-0.3, dropout 0.1 and clipping at norm 1; pass those with --set to compare.
    """
    return Preset(
        name="imagenet",
        description="ViT/DeiT on ImageNet-1k shards at 224px (needs --data)",
        sizes=("Ti", "S", "B"),
        patch=16,
        budgets=(1e18, 3e18, 1e19, 3e19),
        batch_size=1024,
        base_lr=5e-4,
        train={"image_size": 224, "weight_decay": 0.05, "warmup_fraction": 5 / 300,
               "min_lr": 1e-5, "schedule": "cosine", "label_smoothing": 0.1, "mixup_alpha": 0.8,
               "cutmix_alpha": 1.0, "drop_path": 0.1, "grad_clip": 0.0, "precision": "bf16",
               "zero": 1, "eval_every": 2000, "ckpt_every": "2000", "num_workers": 8,
               "compile": True},  # torch.compile: not in the run id (RESUMABLE_FIELDS)
        device="cuda",
        gpus=8,
        slurm={"time": 24 * 60, "cpus_per_task": 10},
        nominal_data={"name": "ImageNet-1k", "image_size": 224, "classes": 1000,
                      "train": 1_281_167, "val": 50_000},
    )


PRESETS: dict[str, Callable[[], Preset]] = {"demo": demo, "demo-full": demo_full,
                                            "cifar": cifar, "imagenet": imagenet}


def get_preset(name: str) -> Preset:
    """The preset called `name`; a ValueError lists the valid names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {sorted(PRESETS)}")
    return PRESETS[name]()

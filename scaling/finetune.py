"""Fine-tuning transfer, the CLI: `python -m scaling.finetune --from RUN_DIR --data DIR --out OUT`
builds a fine-tune's TrainConfig (the ViT paper's recipe, App. B.1.1, with `init_from` set) and
runs it as `python -m scaling.train` would. What training does with the pre-trained weights is
scaling.pretrained's; the recipe, the rules and the bad inputs: docs/architecture.md,
"Fine-tuning".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scaling import results, train
from scaling.clihelp import exit_now
from scaling.config import TrainConfig
from scaling.pretrained import Pretrained

# App. B.1.1: SGD, momentum 0.9, no weight decay, clipping at 1, cosine decay. The lr is the
# middle of the paper's grid {0.001, 0.003, 0.01, 0.03}; no augmentation beyond the dataset's.
RECIPE = {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0, "grad_clip": 1.0,
          "schedule": "cosine", "lr": 0.01, "min_lr": 0.0, "label_smoothing": 0.0,
          "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "dropout": 0.0, "drop_path": 0.0}
# Taken from the pre-training run's config.json unless given: the architecture (model, pool)
# cannot be changed, the rest are defaults.
INHERITED = ("model", "pool", "zero", "precision", "batch_size")
FIXED = ("model", "pool")


# -- the config -------------------------------------------------------------------------------

def fine_tune_config(pretrain: dict, *, init_from: str, **given) -> TrainConfig:
    """The fine-tune's TrainConfig: `pretrain`'s (a config.json) INHERITED fields, RECIPE, then
    `given` (TrainConfig fields, e.g. data, out, steps, image_size, lr), which win; a `given`
    model or pool other than the pre-training's is a ValueError."""
    for name in FIXED:
        if given.get(name) is not None and given[name] != pretrain.get(name):
            raise ValueError(f"--{name} {given[name]}: a fine-tune keeps the pre-training run's "
                             f"{name} ({pretrain.get(name)})")
    values = {k: pretrain[k] for k in INHERITED if k in pretrain}
    values.update(RECIPE)
    values.update({k: v for k, v in given.items() if v is not None})
    values["init_from"] = str(Path(init_from).resolve())
    return TrainConfig(**values)


def parse_args(argv: list[str]) -> TrainConfig:
    """--from and every scaling.train flag (defaults: the pre-training run's and RECIPE);
    ValueError (one line) for bad input. argparse errors exit 2 themselves."""
    parser = TrainConfig.parser()
    parser.prog = "python -m scaling.finetune"
    parser.description = ("Fine-tune a finished run's export (ViT paper App. B.1.1) as an "
                          "ordinary run dir. Every flag but --from is scaling.train's, "
                          "defaulting to the pre-training run's model, pool, zero, precision "
                          "and batch size, and to SGD momentum 0.9, lr 0.01, cosine, no weight "
                          "decay, clipping at 1 (the defaults shown are scaling.train's).")
    parser.add_argument("--from", dest="init_from", required=True, metavar="RUN_DIR",
                        help="the finished pre-training run (its model.safetensors)")
    for action in parser._actions:
        if action.dest == "model":  # the pre-training run's
            action.required = False
        if action.option_strings == ["--init-from"]:  # --from says it
            action.help = argparse.SUPPRESS
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message} (see "
                                               "--help)\n")
    parser.allow_abbrev = False  # a flag is given only as itself (see _given)
    parsed = vars(parser.parse_args(argv))
    pre = Pretrained.open(parsed.pop("init_from"))
    given = {a.dest: parsed[a.dest] for a in parser._actions
             if a.dest in parsed and _given(a, argv)}  # the rest: fine_tune_config's defaults
    # the rest (data, sizes, the pre-training run's export and rows, the run dir) is checked by
    # scaling.checks.check_run, as in every run, when main() hands the config to scaling.train
    return fine_tune_config(pre.config, init_from=str(pre.run), **given)


def _given(action: argparse.Action, argv: list[str]) -> bool:
    """Whether one of the action's flags (or --no-FLAG) is on the command line."""
    flags = set(action.option_strings)
    return any(a.split("=", 1)[0] in flags for a in argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build the fine-tune config, then run it as `python -m scaling.train`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return results.EXIT_BAD_INPUT
    return train.main(cfg.to_args())


if __name__ == "__main__":
    exit_now(main())

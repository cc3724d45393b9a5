"""Fine-tuning transfer: `python -m scaling.finetune --from RUN_DIR --data DIR --out OUT
[--image-size N] [--steps|--epochs|--samples|--flops N] [--lr LR] [any scaling.train flag]`.

The recipe of the ViT paper (Dosovitskiy et al. 2021, Sec. 3.2 and App. B.1.1): SGD with momentum
0.9, a cosine decay, no weight decay, gradient clipping at global norm 1, the pre-trained head
(and the pre-logits, if any) replaced by one zero-initialised linear layer for the downstream
classes, and a higher resolution than pre-training with the position embeddings 2D-interpolated
to the new patch grid (scaling.model.resize_pos_embed).

A fine-tune is an ordinary run: `fine_tune_config` builds its TrainConfig (the model and pool of
the pre-training run's config.json, the recipe above, then the flags given, which win) with
`init_from` set to the pre-training run dir, and `python -m scaling.train` runs it. So it has the
same run-dir schema, checkpoints, resume, preemption handling and DeepSpeed engine as any run.
Training, on the run's first start only (no complete checkpoint of its own), loads the export
into the new model (`init_weights`); a resume loads its own checkpoint and never the export. At
the end it appends one row of kind "finetune" to the PRE-TRAINING run's transfer.jsonl
(`record_transfer`: schema in scaling.results; under that run's lock; at most once), and its own
final.json adds `pretrain_run` and `pretrain_flops` (`final_fields`). A second invocation on a
finished OUT does nothing (scaling.train's rule for a run whose final.json is ok).

Bad input (one line, exit 2, before any work): a --from that is not a finished run (config.json,
final.json status ok, model.safetensors with its vit_config), data without dataset.json, an image
size that the patch size does not divide, a --model other than the pre-training run's, or a
fine-tune row of the same (dataset, seed, step) in the pre-training run that another fine-tune
run wrote (the analysis keeps one per key).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from scaling import results
from scaling.config import TrainConfig
from scaling.flops import training_flops
from scaling.model import ViTConfig

log = logging.getLogger("scaling.finetune")

# App. B.1.1: SGD, momentum 0.9, no weight decay, clipping at 1, cosine decay. The lr is the
# middle of the paper's grid {0.001, 0.003, 0.01, 0.03}; no augmentation beyond the dataset's.
RECIPE = {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0, "grad_clip": 1.0,
          "schedule": "cosine", "lr": 0.01, "min_lr": 0.0, "label_smoothing": 0.0,
          "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "dropout": 0.0, "drop_path": 0.0}
# Taken from the pre-training run's config.json unless given: the architecture (model, pool)
# cannot be changed, the rest are defaults.
INHERITED = ("model", "pool", "zero", "precision", "batch_size")
FIXED = ("model", "pool")
# The architecture fields an export and a fine-tune model must share (image size and classes
# are what a fine-tune changes).
ARCH = ("width", "depth", "heads", "mlp_dim", "patch_size", "in_chans", "pool")
DROPPED = ("head.", "pre_logits.")  # replaced: a fresh zero head, no pre-logits
LOCK_WAIT_S = 120.0


@dataclass(frozen=True)
class Pretrained:
    """A finished pre-training run and its export."""

    run: Path
    config: dict  # its config.json
    vit: ViTConfig  # of its export
    step: int  # of its export
    images_seen: int
    flops: float  # its training FLOPs at the export

    @classmethod
    def open(cls, run_dir: str) -> Pretrained:
        """Check a --from run dir; ValueError (one line) naming what is missing."""
        run = Path(run_dir).resolve()
        if not run.is_dir():
            raise ValueError(f"--from {run_dir}: not a directory")
        if not (run / results.CONFIG_FILE).is_file():
            raise ValueError(f"--from {run}: no {results.CONFIG_FILE} (not a run dir)")
        final = results.read_final(run)
        if final is None or final["status"] != results.STATUS_OK:
            state = final["status"] if final else "not finished"
            raise ValueError(f"--from {run}: {state}; fine-tune from a run whose "
                             f"{results.FINAL_FILE} is ok")
        export = run / results.EXPORT_FILE
        if not export.is_file():
            raise ValueError(f"--from {run}: no export {results.EXPORT_FILE}")
        meta = _export_meta(export)
        config = results.read_json(run / results.CONFIG_FILE)
        vit = ViTConfig(**json.loads(meta["vit_config"]))
        step = int(meta["step"])
        images = step * int(config["batch_size"])
        return cls(run, config, vit, step, images, training_flops(vit, images))


def _export_meta(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        raise ValueError(f"--from: {path} is not a readable safetensors file ({e})") from None
    if "vit_config" not in meta or "step" not in meta:
        raise ValueError(f"--from: {path} has no vit_config/step metadata (not written by "
                         "scaling.train)")
    return meta


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
    cfg = fine_tune_config(pre.config, init_from=str(pre.run), **given)
    from scaling.data import load_dataset_info

    info = load_dataset_info(cfg.data, verify=False)  # DataError (a ValueError), one line
    check(cfg, cfg.vit(num_classes=info.num_classes, image_size=info.image_size), info.root)
    return cfg


def _given(action: argparse.Action, argv: list[str]) -> bool:
    """Whether one of the action's flags (or --no-FLAG) is on the command line."""
    flags = set(action.option_strings)
    return any(a.split("=", 1)[0] in flags for a in argv)


# -- during training (scaling.train) -----------------------------------------------------------

def check(cfg: TrainConfig, vit_cfg: ViTConfig, data_root) -> Pretrained:
    """prepare()'s checks of a run with init_from: the pre-training run is finished and its
    export fits this model; ValueError (one line) otherwise."""
    if cfg.trunk_run is not None:
        raise ValueError("--init-from and --trunk-run exclude each other")
    pre = Pretrained.open(cfg.init_from)
    old, new = dataclasses.asdict(pre.vit), dataclasses.asdict(vit_cfg)
    differ = [f"{k}: {old[k]} vs {new[k]}" for k in ARCH if old[k] != new[k]]
    if differ:
        raise ValueError(f"--init-from {pre.run}: its export is another architecture "
                         f"({', '.join(differ)})")
    key = (Path(data_root).name, cfg.seed, pre.step)
    other = _owner(pre.run, key)
    if other is not None and Path(other) != Path(cfg.out).resolve():
        raise ValueError(f"--init-from {pre.run}: its {results.TRANSFER_FILE} already has a "
                         f"fine-tune row for (dataset, seed, step) {key} from {other}; use "
                         "another --seed (the analysis keeps one row per key)")
    return pre


def _owner(run: Path, key: tuple) -> str | None:
    """The finetune_run of `run`'s fine-tune row of (dataset, seed, step) `key`, or None."""
    for r in results.read_transfer(run, strict=False):
        if r["kind"] == "finetune" and (r["dataset"], r["seed"], r["step"]) == key:
            return r.get("finetune_run", "?")
    return None


def init_weights(model: torch.nn.Module, pre: Pretrained) -> None:
    """Load `pre`'s export into `model` (every rank, before the engine is built): position
    embeddings interpolated to model's grid, head and pre-logits left out, the head zeroed."""
    from scaling.export import load_exported

    source = load_exported(str(pre.run / results.EXPORT_FILE))
    if source.config.image_size != model.config.image_size:
        source.resize_image(model.config.image_size)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith(DROPPED)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    left = [k for k in missing if not k.startswith(DROPPED)]
    if left or unexpected:
        raise RuntimeError(f"export of {pre.run} does not fit the model: missing {left}, "
                           f"unexpected {unexpected}")
    with torch.no_grad():
        for p in model.head.parameters():
            p.zero_()


def final_fields(pre: Pretrained) -> dict:
    """What a fine-tune's final.json adds."""
    return {"pretrain_run": str(pre.run), "pretrain_flops": pre.flops}


def transfer_row(cfg: TrainConfig, pre: Pretrained, out: Path, data_info) -> dict:
    """The fine-tune row for the pre-training run, from the fine-tune's last eval row."""
    ev = [r for r in results.read_metrics(out) if r["kind"] == "eval"][-1]
    return {"kind": "finetune", "dataset": Path(data_info.root).name, "shots": None,
            "seed": cfg.seed, "top1": ev["top1"], "step": pre.step,
            "images_seen": pre.images_seen, "flops_seen": pre.flops,
            "num_test": ev["num_samples"], "num_train": data_info.split("train").num_samples,
            "image_size": cfg.image_size or data_info.image_size, "finetune_run": str(out),
            "finetune_steps": ev["step"], "finetune_flops": ev["flops_seen"],
            "source": "finetune"}


def record_transfer(cfg: TrainConfig, pre: Pretrained, out: Path, data_info) -> bool:
    """Append the fine-tune row to the pre-training run's transfer.jsonl under its lock (rank
    0, at the end of the fine-tune); False when its (dataset, seed, step) is there already
    (this run's row from an earlier attempt: nothing to do; another run's: a warning)."""
    row = transfer_row(cfg, pre, Path(out).resolve(), data_info)
    lock = _lock(pre.run)
    try:
        owner = _owner(pre.run, (row["dataset"], row["seed"], row["step"]))
        if owner is not None:
            if owner != row["finetune_run"]:
                log.warning("%s already has a fine-tune row of %s from %s; not adding ours",
                            pre.run, (row["dataset"], row["seed"], row["step"]), owner)
            return False
        results.append_transfer(pre.run, row)
        log.info("fine-tune top1=%.4g appended to %s", row["top1"],
                 pre.run / results.TRANSFER_FILE)
        return True
    finally:
        lock.release()


def _lock(run: Path) -> results.RunLock:
    """The pre-training run's lock, waited for (a few-shot CLI or another fine-tune's row)."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            return results.RunLock(run).acquire()
        except results.RunDirInUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build the fine-tune config, then run it as `python -m scaling.train`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return results.EXIT_BAD_INPUT
    from scaling import train

    return train.main(cfg.to_args())


if __name__ == "__main__":
    from scaling.train import exit_now

    exit_now(main())

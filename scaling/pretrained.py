"""A fine-tune's pre-trained weights, as scaling.train uses them (the CLI is scaling.finetune).

A run with `init_from` checks the pre-training run and its export before any work (`check`),
loads the export into its new model on its first start only (`init_weights`; a resume loads its
own checkpoint), appends one row of kind "finetune" to the PRE-TRAINING run's transfer.jsonl at
the end (`record_transfer`: schema in scaling.results; under that run's lock; at most once), and
adds `pretrain_run` and `pretrain_flops` to its own final.json (`final_fields`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from scaling import results
from scaling.config import RESUMABLE_FIELDS, TrainConfig
from scaling.export import load_exported
from scaling.flops import training_flops
from scaling.model import ViTConfig

log = logging.getLogger("scaling.finetune")

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
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        raise ValueError(f"--from: {path} is not a readable safetensors file ({e})") from None
    if "vit_config" not in meta or "step" not in meta:
        raise ValueError(f"--from: {path} has no vit_config/step metadata (not written by "
                         "scaling.train)")
    return meta


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
    key = (Path(data_root).name, cfg.seed, pre.step, recipe_id(cfg))
    other = _owner(pre.run, key, str(Path(cfg.out).resolve()))
    if other is not None and Path(other) != Path(cfg.out).resolve():
        raise ValueError(f"--init-from {pre.run}: its {results.TRANSFER_FILE} already has a "
                         f"fine-tune row for (dataset, seed, step, recipe) {key} from {other} "
                         "(the same fine-tune); use another --seed or another recipe")
    return pre


def recipe_id(cfg: TrainConfig) -> str:
    """What tells two fine-tunes of one run on one data set apart (the `recipe` of their rows):
    six hex digits of SHA-1 over the fine-tune's result-changing fields that neither the row's
    key (data, seed) nor its place (out, init_from) holds, left out at their defaults (so a
    field added to TrainConfig later keeps the ids)."""
    defaults = TrainConfig.defaults()
    skip = {"data", "seed", "out", "init_from", *RESUMABLE_FIELDS}
    fields = {k: v for k, v in cfg.to_dict().items()
              if k not in skip and v is not None and v != defaults.get(k)}
    return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:6]


def _owner(run: Path, key: tuple, out: str) -> str | None:
    """The finetune_run of `run`'s fine-tune row of (dataset, seed, step, recipe) `key`, or of
    the fine-tune in `out` (a row written before rows had a recipe), or None."""
    for r in results.read_transfer(run, strict=False):
        if r["kind"] != "finetune" or (r["dataset"], r["seed"], r["step"]) != key[:3]:
            continue
        if r.get("recipe") == key[3] or r.get("finetune_run") == out:
            return r.get("finetune_run", "?")
    return None


def init_weights(model: torch.nn.Module, pre: Pretrained) -> None:
    """Load `pre`'s export into `model` (every rank, before the engine is built): position
    embeddings interpolated to model's grid, head and pre-logits left out, the head zeroed."""
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
            "recipe": recipe_id(cfg), "source": "finetune"}


def record_transfer(cfg: TrainConfig, pre: Pretrained, out: Path, data_info) -> bool:
    """Append the fine-tune row to the pre-training run's transfer.jsonl under its lock (rank
    0, at the end of the fine-tune); False when its (dataset, seed, step, recipe) is there
    already (this run's row from an earlier attempt: nothing to do; another run's: a warning)."""
    row = transfer_row(cfg, pre, Path(out).resolve(), data_info)
    lock = _lock(pre.run)
    try:
        key = (row["dataset"], row["seed"], row["step"], row["recipe"])
        owner = _owner(pre.run, key, row["finetune_run"])
        if owner is not None:
            if owner != row["finetune_run"]:
                log.warning("%s already has a fine-tune row of %s from %s; not adding ours",
                            pre.run, key, owner)
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

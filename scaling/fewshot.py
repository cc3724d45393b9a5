"""Few-shot linear probes of frozen ViT features (big_vision's `fewshot_lsr` protocol, ViT paper
Sec. 4.1): the closed-form probe, the features, the --fewshot hook of training, and
`python -m scaling.fewshot`, which probes finished runs. The protocol, our choices where
big_vision leaves room, and the rows: docs/architecture.md, "Transfer". The downstream data sets
are scaling.downstream's.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scaling import dist, results
from scaling.clihelp import DefaultsHelpFormatter
from scaling.config import parse_list
from scaling.data import default_augment
from scaling.downstream import Downstream, open_downstream
from scaling.export import load_exported
from scaling.flops import training_flops
from scaling.model import VisionTransformer

log = logging.getLogger("scaling.fewshot")

L2 = 2.0**10  # big_vision's fixed penalty
STD_EPS = 1e-5
SHOTS = (1, 5, 10, 25)


# -- the probe ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Probe:
    """A fitted probe: scores(x) = ((x - mean) / std) @ w + bias."""

    mean: np.ndarray
    std: np.ndarray
    w: np.ndarray
    bias: np.ndarray
    dual: bool

    def scores(self, x) -> np.ndarray:
        return ((np.asarray(x, np.float64) - self.mean) / self.std) @ self.w + self.bias


def fit_probe(train_x, train_y, *, l2: float = L2, num_classes: int | None = None,
              solve: str = "auto") -> Probe:
    """The closed-form probe of the module doc; solve: "auto" (the smaller system), "primal" or
    "dual" (the same solution, for tests)."""
    x, y = np.asarray(train_x, np.float64), np.asarray(train_y, np.int64)
    if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"train features {x.shape} and labels {y.shape} do not match")
    mean, std = x.mean(0), x.std(0) + STD_EPS
    z = (x - mean) / std
    c = num_classes or int(y.max()) + 1
    t = np.where(np.arange(c)[None, :] == y[:, None], 1.0, -1.0)
    bias = t.mean(0)  # the unregularised bias's optimum, since z is centred
    t -= bias
    n, d = z.shape
    dual = n < d if solve == "auto" else solve == "dual"
    if dual:
        w = z.T @ np.linalg.solve(z @ z.T + l2 * np.eye(n), t)
    else:
        w = np.linalg.solve(z.T @ z + l2 * np.eye(d), z.T @ t)
    return Probe(mean, std, w, bias, dual)


def linear_probe(train_x, train_y, test_x, test_y, *, l2: float = L2,
                 num_classes: int | None = None) -> float:
    """Top-1 accuracy on (test_x, test_y) of the probe fitted on (train_x, train_y)."""
    test_y = np.asarray(test_y)
    c = num_classes or int(max(np.max(train_y), np.max(test_y))) + 1
    pred = fit_probe(train_x, train_y, l2=l2, num_classes=c).scores(test_x).argmax(1)
    return float((pred == test_y).mean())


def summarise(rows: list[dict]) -> list[tuple[str, int, float, float]]:
    """(dataset, shots, mean top-1, std over seeds) of one step's rows."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["shots"]), []).append(r["top1"])
    return [(d, k, float(np.mean(v)), float(np.std(v))) for (d, k), v in groups.items()]


# -- features -------------------------------------------------------------------------------------

def prelogits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The representation before the head: forward_features (+ tanh(pre_logits) if present);
    a model without forward_features is taken to return features itself."""
    if not hasattr(model, "forward_features"):
        return model(images)
    x = model.forward_features(images)
    pre = getattr(model, "pre_logits", None)
    return torch.tanh(pre(x)) if pre is not None else x


def at_size(model: torch.nn.Module, image_size: int) -> torch.nn.Module:
    """The model itself at its own resolution, else a copy at `image_size` (pos-embed resize)."""
    config = getattr(model, "config", None)
    if config is None or config.image_size == image_size:
        return model
    model = copy.deepcopy(model)
    model.resize_image(image_size)
    return model


@torch.no_grad()
def extract_features(model: torch.nn.Module, images: torch.Tensor, aug, *, device,
                     batch_size: int = 256, features=prelogits) -> np.ndarray:
    """float64 (N, D) features of uint8 (N, 3, H, W) images, normalised as the loaders do, in
    batches on `device`, with the model in eval mode (its mode is restored)."""
    was = model.training
    model.eval()
    mean = torch.tensor(aug.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(aug.std, device=device).view(1, 3, 1, 1) * 255
    out = []
    try:
        for lo in range(0, len(images), batch_size):
            x = (images[lo:lo + batch_size].to(device).float() - mean) / std
            out.append(features(model, x).float().cpu())
    finally:
        model.train(was)
    return torch.cat(out).double().numpy() if out else np.zeros((0, 0))


def probe_model(model: torch.nn.Module, sets: list[Downstream], shots, seeds: int, *,
                device, batch_size: int = 256, wanted=None) -> list[dict]:
    """Rows (results.TRANSFER_KEYS less step, images_seen, flops_seen) of every dataset, shots
    and seed; `wanted`: only these (dataset, shots, seed) (a dataset with none is not run)."""
    rows = []
    for ds in sets:
        keys = [(ds.name, k, s) for s in range(seeds) for k in shots]
        if wanted is not None and not set(keys) & wanted:
            continue
        ds.load(shots, seeds)
        m, aug = at_size(model, ds.info.image_size), default_augment(ds.info.source)
        train_x = extract_features(m, ds.train[0], aug, device=device, batch_size=batch_size)
        test_x = extract_features(m, ds.val[0], aug, device=device, batch_size=batch_size)
        for name, k, s in keys:
            if wanted is not None and (name, k, s) not in wanted:
                continue
            r = [ds.rows[i] for i in ds.sets[s, k].tolist() if i in ds.rows]
            top1 = linear_probe(train_x[r], ds.train[1][r], test_x, ds.val[1],
                                num_classes=ds.info.num_classes)
            rows.append({"kind": "fewshot", "dataset": name, "shots": k, "seed": s,
                         "top1": top1, "num_train": len(r), "num_test": len(test_x),
                         "l2": L2, "image_size": ds.info.image_size})
    return rows


# -- during training ------------------------------------------------------------------------------

@contextlib.contextmanager
def rng_kept(device: torch.device):
    """Restore the torch (CPU and this CUDA device), numpy and python RNG states on exit."""
    py, npy = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


class TrainingProbe:
    """The --fewshot hook of scaling.train: checked up front, run at every eval point."""

    def __init__(self, sets: list[Downstream], shots, seeds: int, batch_size: int):
        self.sets, self.shots, self.seeds, self.batch_size = sets, shots, seeds, batch_size

    @classmethod
    def from_config(cls, cfg, vit) -> TrainingProbe | None:
        """None without --fewshot; ValueError for a dir that cannot be probed."""
        if not cfg.fewshot:
            return None
        shots = parse_list(cfg.fewshot_shots, "--fewshot-shots", int)
        sets = open_downstream(parse_list(cfg.fewshot, "--fewshot", str), shots,
                               cfg.fewshot_seeds)
        for ds in sets:
            if ds.info.image_size % vit.patch_size:
                raise ValueError(f"few-shot data {ds.info.root} is {ds.info.image_size}px, not "
                                 f"a multiple of {vit.name}'s patch size {vit.patch_size}")
        return cls(sets, shots, cfg.fewshot_seeds, cfg.eval_batch_size or cfg.batch_size)

    def evaluate(self, engine, vit, where, device) -> list[dict]:
        """All ranks call this (ZeRO-3 gathers the weights); rank 0 returns the rows."""
        from scaling import engine as eng  # late: DeepSpeed takes seconds to import

        state = eng.full_state_dict(engine)  # fp32 on CPU, rank 0; never the training module
        rows = []
        if where.is_main:
            with rng_kept(device):
                model = VisionTransformer(vit)
                model.load_state_dict(state)
                rows = probe_model(model.to(device), self.sets, self.shots, self.seeds,
                                   device=device, batch_size=self.batch_size)
            for name, k, top1, spread in summarise(rows):
                log.info("fewshot %s %d-shot top1=%.4g +- %.2g (%d seeds)", name, k, top1,
                         spread, self.seeds)
        dist.barrier()
        return rows


# -- after training -------------------------------------------------------------------------------

def _weights(run: Path, checkpoints: bool):
    """(step, source, loader of a state dict) of the export and the complete checkpoints."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    export = run / results.EXPORT_FILE
    with safe_open(str(export), framework="pt") as f:
        step = int(f.metadata()["step"])
    found = [(step, "export", lambda: load_file(str(export)))]
    if checkpoints:
        from scaling import engine as eng  # late: DeepSpeed takes seconds to import

        root = run / results.CHECKPOINT_DIR
        found += [(step, "checkpoint", lambda d=root / tag: eng.checkpoint_state(d))
                  for step, tag in eng.complete_checkpoints(root)]
    return found


def posthoc_run(run: Path, sets: list[Downstream], shots, seeds: int, *, checkpoints: bool,
                device, batch_size: int = 256) -> int:
    """Probe a finished run's weights, appending the missing rows; returns rows added."""
    final = results.read_final(run)
    if final is None or final["status"] != results.STATUS_OK:
        state = final["status"] if final else "running or stopped"
        print(f"skip {run}: not finished ok ({state}); a resume would truncate rows added now")
        return 0
    try:
        lock = results.RunLock(run).acquire()
    except results.RunDirInUse as e:
        print(f"skip {run}: {e}")
        return 0
    try:
        model = load_exported(str(run / results.EXPORT_FILE))
        batch = results.read_json(run / results.CONFIG_FILE)["batch_size"]
        patch = model.config.patch_size
        for ds in sets:
            if ds.info.image_size % patch:
                print(f"skip {run} on {ds.name}: {ds.info.image_size}px is not a multiple of "
                      f"patch {patch}")
        fits = [ds for ds in sets if ds.info.image_size % patch == 0]
        added = 0
        for step, source, load in _weights(run, checkpoints):
            have = {(r["dataset"], r["shots"], r["seed"], r["step"])
                    for r in results.read_transfer(run)}
            wanted = {(ds.name, k, s) for ds in fits for k in shots for s in range(seeds)
                      if (ds.name, k, s, step) not in have}
            if not wanted:
                continue
            model.load_state_dict({k: v.float() for k, v in load().items()})
            images = step * batch
            for row in probe_model(model.to(device), fits, shots, seeds, device=device,
                                   batch_size=batch_size, wanted=wanted):
                results.append_transfer(run, {**row, "step": step, "images_seen": images,
                                              "source": source, "flops_seen": training_flops(
                                                  model.config, images)})
                added += 1
        return added
    finally:
        lock.release()


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scaling.fewshot",
                                description="Few-shot linear probes of finished runs' exports "
                                "and checkpoints; rows appended to RUN_DIR/transfer.jsonl.",
                                formatter_class=DefaultsHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", help="one run dir")
    where.add_argument("--results", help="every run dir (with config.json) below this dir")
    p.add_argument("--data", required=True, help="downstream shard dirs, comma-separated")
    p.add_argument("--shots", default=",".join(map(str, SHOTS)), help="train images per class")
    p.add_argument("--seeds", type=int, default=3, help="draws of each k-shot set")
    p.add_argument("--checkpoints", action="store_true",
                   help="also every complete checkpoint (a curve per run)")
    p.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 when done (runs in use or unfinished are skipped), 2 on bad input
    (no runs found under --results included)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = _parse(argv)
    try:
        shots = parse_list(args.shots, "--shots", int)
        if args.seeds < 1 or args.batch_size < 1:
            raise ValueError(f"--seeds {args.seeds}, --batch-size {args.batch_size}: must be >= 1")
        root = Path(args.run or args.results)
        if not root.is_dir():
            raise ValueError(f"{'--run' if args.run else '--results'} {root} is not a directory")
        runs = [root] if args.run else list(results.iter_run_dirs(root))
        if not runs:
            raise ValueError(f"--results {root}: no runs found (no run dir with "
                             f"{results.CONFIG_FILE} below it)")
        sets = open_downstream(parse_list(args.data, "--data", str), shots, args.seeds)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return results.EXIT_BAD_INPUT
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for run in runs:
        added = posthoc_run(run, sets, shots, args.seeds, checkpoints=args.checkpoints,
                            device=device, batch_size=args.batch_size)
        print(f"{run}: {added} row(s) added")
    return results.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""Few-shot linear probes of frozen ViT features: during training and over finished runs.

The protocol is the one of the ViT paper (Dosovitskiy et al. 2021, Sec. 4.1, "Metrics") and of
"Scaling Vision Transformers" (Zhai et al. 2022, Sec. 2 and Fig. 2, which track 10-shot linear
ImageNet accuracy against compute), as big_vision's `fewshot_lsr` evaluator implements it:
take the frozen pre-logit features of k train images per class, fit a linear map to targets
that are +1 for the true class and -1 for the others by L2-regularised least squares, solved in
closed form with a fixed penalty of 2^10, and report top-1 accuracy of its argmax on the test
split, for k in 1, 5, 10, 25, over three draws (seeds) of the k-shot set.

Our choices, where big_vision leaves room:
- Features are standardised with the k-shot set's mean and (population) std + 1e-5, as there.
- The bias is not regularised. big_vision appends a constant feature of 100, which makes its
  penalty nearly vanish; here it vanishes exactly: with standardised (centred) features the
  optimal bias is the mean target, and W is the ridge solution for the centred targets.
- The solve is primal, (Z'Z + l2 I)^-1 Z'T, when there are at least as many images as features,
  else dual, Z'(ZZ' + l2 I)^-1 T: a D^3 or N^3 cost, whichever is smaller.
- Draw `seed` takes, per class, a permutation of its train images (numpy Generator seeded by the
  seed alone: every run and step sees the same k-shot sets) and its first k, so a seed's 1-shot
  set lies inside its 5-shot set. A class with fewer than max(shots) train images is an error.
- Features are the pre-logits: the class token after the final LayerNorm (the pooled tokens for
  pool="gap"; tanh(pre_logits) when the model has a representation layer), computed in fp32 in
  eval mode. Images are read at the downstream data's own size (centre crop of its eval
  transform); a size other than the model's is served by a copy of the model whose position
  embedding is interpolated (paper Sec. 3.2; `VisionTransformer.resize_image`).
- The k-shot images (all seeds) and the val split are decoded once into memory as uint8
  (at most MEMORY_LIMIT_BYTES, checked up front); features are recomputed at each evaluation.

During training (--fewshot DIR[,DIR...]) rank 0 probes a fp32 copy of the weights at every eval
point while the other ranks wait at a barrier; the RNG states are restored afterwards, so the
training trajectory is unchanged. After training, `python -m scaling.fewshot` probes the export
and (--checkpoints) every complete checkpoint of finished runs. Rows: results.TRANSFER_KEYS.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scaling import dist, results
from scaling.clihelp import DefaultsHelpFormatter
from scaling.config import parse_list
from scaling.data import DatasetInfo, default_augment, load_dataset_info
from scaling.data.samples import make_decode, shard_counts
from scaling.data.shardread import checked_samples
from scaling.export import load_exported
from scaling.flops import training_flops
from scaling.model import VisionTransformer

log = logging.getLogger("scaling.fewshot")

L2 = 2.0**10  # big_vision's fixed penalty
STD_EPS = 1e-5
SHOTS = (1, 5, 10, 25)
MEMORY_LIMIT_BYTES = 4 << 30  # decoded k-shot + val images of one downstream data set


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


def draw_shots(labels: np.ndarray, shots, seed: int, num_classes: int) -> dict[int, np.ndarray]:
    """{k: sorted train indices, k per class} for one seed (nested in k; module doc)."""
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    return {k: np.sort(np.concatenate([p[:k] for p in perms])) for k in shots}


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


# -- downstream data ------------------------------------------------------------------------------

def read_split(info: DatasetInfo, split: str, keep: set | None = None):
    """(labels of every sample in shard order, -1 if unreadable; uint8 (M, 3, S, S) eval crops
    of the samples whose index is in `keep` (all if None) and that decode; their indices).
    Samples are decoded as the loaders decode them (scaling.data.samples: the dataset's image
    and label keys), and every shard read is checked against its listed count."""
    sp, size = info.split(split), info.image_size
    decode = make_decode(info, size, None, strict=False)
    labels, images, index = [], [], []
    for i, sample in enumerate(checked_samples(sp.urls, shard_counts(sp))):
        label = decode.label(sample)
        labels.append(-1 if label is None else label)
        if label is None or (keep is not None and i not in keep):
            continue
        image = decode.image(sample, rng=None)
        if image is None:
            log.warning("few-shot: skipping the corrupt image %s in %s", sample.get("__key__"),
                        sample.get("__url__"))
            continue
        images.append(image)
        index.append(i)
    pixels = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous() if images
              else torch.zeros(0, 3, size, size, dtype=torch.uint8))
    return np.asarray(labels, np.int64), pixels, np.asarray(index, np.int64)


@dataclass
class Downstream:
    """One downstream shard dir: checked and its train labels read on open(), its images
    decoded on the first load() (rank 0)."""

    name: str
    info: DatasetInfo
    labels: np.ndarray
    sets: dict = field(default_factory=dict)  # (seed, k) -> train indices
    train: tuple | None = None  # (uint8 images, labels) of the union of the k-shot sets
    rows: dict = field(default_factory=dict)  # train index -> row of train[0]
    val: tuple | None = None

    @classmethod
    def open(cls, path: str, shots, seeds: int) -> Downstream:
        """Check a dir (dataset.json, train and val splits, k-shot sets that fit in memory,
        enough train images of every class); ValueError naming the problem otherwise."""
        info = load_dataset_info(path, verify=True)
        missing = [s for s in ("train", "val") if not info.has_split(s)]
        if missing:
            raise ValueError(f"few-shot data {info.root} has no {' or '.join(missing)} split "
                             f"(splits: {sorted(info.splits)})")
        c, most = info.num_classes, max(shots)
        need = (min(most * c * seeds, info.split("train").num_samples)
                + info.split("val").num_samples) * 3 * info.image_size**2
        if need > MEMORY_LIMIT_BYTES:
            raise ValueError(f"few-shot data {info.root}: its k-shot sets and val split need "
                             f"{need / 2**30:.1f} GiB decoded (limit {MEMORY_LIMIT_BYTES >> 30}"
                             " GiB); use fewer shots or seeds, or a smaller val split")
        labels = read_split(info, "train", keep=set())[0]
        counts = np.bincount(labels[labels >= 0], minlength=c)
        short = [info.classes[i] for i in np.flatnonzero(counts < most)]
        if short:
            raise ValueError(f"few-shot data {info.root}: {len(short)} class(es) have fewer "
                             f"than {most} train images (e.g. {short[:3]}, fewest "
                             f"{counts.min()}); lower the largest shots")
        return cls(info.root.name, info, labels)

    def load(self, shots, seeds: int) -> None:
        """Decode the k-shot images of every seed and the val split (once)."""
        if self.val is not None:
            return
        c = self.info.num_classes
        self.sets = {(s, k): idx for s in range(seeds)
                     for k, idx in draw_shots(self.labels, shots, s, c).items()}
        want = set(np.concatenate(list(self.sets.values())).tolist())
        _, images, index = read_split(self.info, "train", keep=want)
        self.train = images, self.labels[index]
        self.rows = {int(i): r for r, i in enumerate(index)}
        labels, images, index = read_split(self.info, "val")
        self.val = images, labels[index]


def open_downstream(dirs, shots, seeds: int) -> list[Downstream]:
    """Downstream.open for each dir; their names (basenames) must differ."""
    sets = [Downstream.open(d, shots, seeds) for d in dirs]
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"few-shot data dirs share a basename ({names}); rows are keyed by it")
    return sets


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
    """CLI entry point: 0 when done (runs in use or unfinished are skipped), 2 on bad input."""
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

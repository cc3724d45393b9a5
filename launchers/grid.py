"""The sweep grid: sizes x budgets x seeds x learning rates -> validated runs with stable ids.

Each grid point is a `TrainConfig` built from values (the preset's recipe, then `--set`),
validated where it is built and made a command line only where a process starts. A run id
`<size><patch>_<budget>_<hash>` hashes the recipe and the data, not the world size (older ids:
launchers.legacy). What the hash covers: docs/sweeps.md ("Run ids and layout").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from launchers import legacy
from launchers.presets import Preset
from scaling.config import BUDGETS, RESUMABLE_FIELDS, TrainConfig, field_type, resolve_plan
from scaling.data import DatasetInfo
from scaling.flops import flops_for_images
from scaling.model import split_name

BUDGET_TOKENS = {"flops": "", "steps": "st", "epochs": "ep", "samples": "im"}
TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
GRID_FIELDS = ("model", "data", "out", "steps", "epochs", "samples", "flops", "batch_size",
               "lr", "seed")  # set by the grid itself, not by --set


@dataclass(frozen=True)
class RunSpec:
    """One grid point: its id, its full TrainConfig and what the sweep needs to place it."""

    run_id: str
    model: str
    budget: float
    budget_kind: str
    seed: int
    base_lr: float
    world_size: int
    total_steps: int
    cfg: TrainConfig
    macs_per_image: int = 0  # forward MACs of the model on this data (scaling.flops)

    @property
    def train_flops(self) -> float:
        """The run's training compute, 6 x MACs x images (what progress and ETAs weigh)."""
        return flops_for_images(self.macs_per_image, self.total_steps * self.cfg.batch_size)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)

    @property
    def size(self) -> str:
        """'S' of 'S/16'."""
        return split_name(self.model)[0]

    def record(self) -> dict:
        """The fields of job.json that describe the run (launchers.runs adds the job's, and
        whoever starts it the train flags it runs with, `train_args`)."""
        return {"run_id": self.run_id, "model": self.model, "size": self.size,
                "budget": self.budget, "budget_kind": self.budget_kind, "seed": self.seed,
                "base_lr": self.base_lr, "lr": self.cfg.lr, "batch_size": self.cfg.batch_size,
                "world_size": self.world_size, "total_steps": self.total_steps}


@dataclass(frozen=True)
class GridOptions:
    """What the sweep CLI varies; None means the preset's value."""

    sizes: tuple[str, ...]
    budgets: tuple[float, ...]
    seeds: tuple[int, ...] = (0,)
    lrs: tuple[float, ...] | None = None  # base learning rates (per 512 images)
    batch_size: int | None = None
    budget_kind: str | None = None
    world_size: int = 1
    overrides: tuple[tuple[str, object], ...] = ()  # --set FIELD=VALUE as field values, in order


def resolve_size(name: str, patch: int) -> str:
    """'S' -> 'S/<patch>', 'S/8' stays (scaling.model.split_name reads it); an unknown size or
    a bad patch raises ValueError listing the valid sizes."""
    name = name.strip()
    try:
        size, given = split_name(name if "/" in name else f"{name}/{patch}")
    except ValueError as e:
        raise ValueError(f"--sizes {name!r}: {e}") from None
    return f"{size}/{given}"


def node_layout(devices: int, gpus_per_node: int) -> tuple[int, int]:
    """(nodes, tasks per node) for a run of `devices` ranks, one task each, whole nodes of
    `gpus_per_node` beyond one."""
    if devices < 1 or gpus_per_node < 1:
        raise ValueError(f"--gpus {devices} and --gpus-per-node {gpus_per_node} must be >= 1")
    if devices <= gpus_per_node:
        return 1, devices
    if devices % gpus_per_node:
        lo = devices // gpus_per_node * gpus_per_node
        raise ValueError(f"--gpus {devices} is not a whole number of nodes of --gpus-per-node "
                         f"{gpus_per_node}; use at most {gpus_per_node} or a multiple of it "
                         f"(e.g. {lo} or {lo + gpus_per_node})")
    return devices // gpus_per_node, gpus_per_node


def gpu_request(layout: tuple[int, int], device: str) -> int:
    """The GPUs each node of a run's SLURM job asks for (sbatch --gpus-per-node): one per task
    on a GPU preset; none on a CPU preset, whose devices are CPU processes."""
    return layout[1] if device == "cuda" else 0


def budget_token(amount: float, kind: str) -> str:
    """1e15 -> '1e15', 3.5e10 -> '3.5e10', steps 8 -> '8st' (run-id friendly)."""
    text = f"{amount:g}".replace("e+", "e").replace("e0", "e")
    return text + BUDGET_TOKENS[kind]


def model_token(model: str) -> str:
    """'S/16' -> 'S16'; 'm1/2' -> 'm1-2' (a size ending in a digit keeps the two apart)."""
    size, patch = split_name(model)
    return f"{size}-{patch}" if size[-1].isdigit() else f"{size}{patch}"


# Builder arguments (dataset.json "args") that change a data set's images or its split without
# changing its size, with the value that leaves run ids as they were before they counted: a
# shapes set at difficulty 0.5, or any set split with another seed, is another data set.
CONTENT_ARGS = {"difficulty": 1.0, "seed": 0}


def data_fingerprint(data_info: DatasetInfo) -> dict:
    """What identifies a dataset independent of where it lies."""
    out = {"source": data_info.source, "image_size": data_info.image_size,
           "classes": data_info.num_classes,
           "splits": {k: v.num_samples for k, v in sorted(data_info.splits.items())}}
    content = {k: data_info.args[k] for k, default in CONTENT_ARGS.items()
               if data_info.args.get(k, default) != default}
    return {**out, "content": content} if content else out


def recipe_payload(cfg: TrainConfig, data: dict) -> dict:
    """What a run id hashes: the result-changing, non-default config fields and the data's
    identity (`data_fingerprint`)."""
    fields = {k: v for k, v in cfg.to_dict().items()
              if k not in RESUMABLE_FIELDS and v is not None and v != TRAIN_FIELDS[k].default}
    if "fewshot" in fields:  # downstream sets by name (their rows' `dataset`), not location
        fields["fewshot"] = [Path(d).name for d in fields["fewshot"].split(",")]
    return {"cfg": fields, "data": data}


def config_hash(cfg: TrainConfig, data: dict) -> str:
    """Six hex digits of SHA-1 over the run's recipe (`recipe_payload`)."""
    payload = json.dumps(recipe_payload(cfg, data), sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:6]


def run_id(parts: list[str], cfg: TrainConfig, data: dict, sweep_dir: Path,
           unhashed: tuple[str, ...] = ()) -> str:
    """The id of the run of `cfg` on `data` in `sweep_dir`: `parts` (size, budget...) and the
    config_hash of `cfg` without the fields `unhashed`, joined by '_'; or, where no dir has that
    id, the run dir made for the same recipe under an id that also hashed the world size
    (launchers.legacy), which keeps its name."""
    hashed = dataclasses.replace(cfg, **dict.fromkeys(unhashed))
    new = "_".join([*parts, config_hash(hashed, data)])
    found = legacy.find(sweep_dir, new, recipe_payload(hashed, data), cfg.to_dict())
    return found or new


def field_value(name: str, value: object) -> object:
    """`value` as TrainConfig field `name` holds it, by the field's own type (the one
    `python -m scaling.train` parses the flag with): text from --set ('0.05', 'true'), or a
    preset's Python value (an int for a float field becomes a float, so a run's config and id
    do not depend on how the value was written). ValueError naming the flag otherwise."""
    kind, flag = field_type(TRAIN_FIELDS[name]), "--" + name.replace("_", "-")
    if value is None and str(TRAIN_FIELDS[name].type).endswith("| None"):
        return None
    if kind is bool:
        text = str(value).strip().lower()
        if isinstance(value, bool) or text in ("true", "false"):
            return value if isinstance(value, bool) else text == "true"
        raise ValueError(f"{flag} takes true or false, not {value!r}")
    try:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise TypeError
        out = kind(value.strip() if isinstance(value, str) else value)
        if not isinstance(value, str) and out != value:  # 2.5 for an int, 5 for a str
            raise TypeError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{flag} takes {'an' if kind is int else 'a'} {kind.__name__}, "
                         f"not {value!r}") from None
    return out


def parse_overrides(pairs: list[str]) -> tuple[tuple[str, object], ...]:
    """--set FIELD=VALUE pairs, checked against TrainConfig's fields and typed by them."""
    out = []
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in TRAIN_FIELDS or name in GRID_FIELDS:
            valid = sorted(set(TRAIN_FIELDS) - set(GRID_FIELDS))
            raise ValueError(f"--set {pair!r}: expected FIELD=VALUE with FIELD one of {valid}")
        try:
            out.append((name, field_value(name, value)))
        except ValueError as e:
            raise ValueError(f"--set {pair!r}: {e}") from None
    return tuple(out)


def recipe(preset: Preset, opts: GridOptions) -> dict:
    """The TrainConfig fields every run shares, typed by TrainConfig: the preset's recipe, then
    --set (later wins)."""
    values = {}
    for source, pairs in ((f"preset {preset.name}", preset.train.items()),
                          ("--set", opts.overrides)):
        for name, value in pairs:
            if name not in TRAIN_FIELDS:
                raise ValueError(f"{source}: unknown training field {name!r}")
            try:
                values[name] = field_value(name, value)
            except ValueError as e:
                raise ValueError(f"{source}: {e}") from None
    return values


def grid_point(preset: Preset, opts: GridOptions, data_info: DatasetInfo, sweep_dir: Path,
               point: tuple[str, float, int, float | None], shared: dict) -> RunSpec:
    """The validated run of one grid point (model, budget, seed, base lr or None) with the
    recipe `shared`: its TrainConfig (checked by TrainConfig itself), its numbers
    (scaling.config.resolve_plan, as training resolves them) and its id."""
    model, budget, seed, base_lr = point
    kind = opts.budget_kind or preset.budget_kind
    if kind not in BUDGETS:
        raise ValueError(f"budget kind {kind!r}; valid: {list(BUDGETS)}")
    batch = int(opts.batch_size or preset.batch_size)
    cfg = TrainConfig(**{  # the grid's own fields first: the recipe may override (as flags did)
        "model": model, "data": str(data_info.root), "out": str(sweep_dir / "_pending"),
        kind: field_type(TRAIN_FIELDS[kind])(budget), "batch_size": batch,
        "lr": float(preset.lr(base_lr, batch)), "seed": int(seed), **shared})
    plan = resolve_plan(cfg, data_info, opts.world_size)  # what training resolves, too
    rid = run_id([model_token(model), budget_token(budget, kind)], cfg,
                 data_fingerprint(data_info), sweep_dir)
    cfg = dataclasses.replace(cfg, out=str(sweep_dir / rid))
    return RunSpec(run_id=rid, model=model, budget=budget, budget_kind=kind, seed=seed,
                   base_lr=preset.base_lr if base_lr is None else base_lr,
                   world_size=plan.world_size, total_steps=plan.total_steps, cfg=cfg,
                   macs_per_image=plan.macs_per_image)


def build_grid(preset: Preset, opts: GridOptions, data_info: DatasetInfo, sweep_dir: Path
               ) -> list[RunSpec]:
    """Every grid point, validated (a ValueError names the first bad value)."""
    models = [resolve_size(size, preset.patch) for size in opts.sizes]
    shared = recipe(preset, opts)
    specs = []
    for model in models:
        for budget in opts.budgets:
            if not budget > 0:
                raise ValueError(f"--budgets: {budget:g} must be positive")
            for seed in opts.seeds:
                for lr in opts.lrs or (None,):
                    try:
                        specs.append(grid_point(preset, opts, data_info, sweep_dir,
                                                (model, budget, seed, lr), shared))
                    except ValueError as e:
                        raise ValueError(f"{model} at budget {budget:g}: {e}") from None
    ids = [spec.run_id for spec in specs]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"the grid repeats run(s) {dupes}: remove duplicate sizes/budgets")
    return specs

"""What a sweep uses where the flags leave it open: the cluster, the preset and the data.

The default preset follows where the runs will execute (SLURM or a local GPU: `imagenet`; local
without a GPU: `demo`), not the machine that runs sweep.py; a preset without built-in data takes
its shards from --data, VIT_SCALING_DATA_<PRESET> or a config file. The rules in order:
docs/sweeps.md ("Which preset, which data").
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from launchers.cli import SweepOptions
from launchers.grid import resolve_size
from launchers.presets import PRESETS, Preset, get_preset
from scaling.data import DataError, DatasetInfo, SplitInfo, load_dataset_info, make_builtin_shards
from scaling.model import split_name

MICRO_SIZES = ("mu", "m1", "m2", "m3", "m4")  # the ladder a CPU trains in minutes
CONFIG_NAME = "vit-scaling.yaml"
CONFIG_KEYS = ("data",)
PLACEHOLDER = "<DATA>"  # --data of a dry run planned without data


def pick_cluster(choice: str, dry_run: bool) -> tuple[str, str]:
    """(slurm or local, why); auto means SLURM where sbatch exists and sinfo answers (a dry
    run does not ask sinfo)."""
    if choice != "auto":
        return choice, f"--cluster {choice}"
    if shutil.which("sbatch") is None:
        return "local", "no sbatch on PATH"
    if dry_run:
        return "slurm", "sbatch found"
    try:
        subprocess.run(["sinfo", "-h"], capture_output=True, timeout=15, check=True)
        return "slurm", "sbatch found and sinfo answers"
    except (OSError, subprocess.SubprocessError):
        print("sbatch exists but SLURM does not answer (sinfo failed): running locally")
        return "local", "sbatch found but sinfo does not answer"


def cuda_devices() -> int:
    """CUDA GPUs on this machine (0 without CUDA)."""
    import torch  # late: `status`, --help and explicit CPU presets need no torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass(frozen=True)
class Choice:
    """The default preset, what its runs execute on ("slurm", "local-gpu", "cpu") and why."""

    preset: str
    runs_on: str
    reason: str
    local_gpus: int = 0


def choose_preset(cluster: str, why: str, cuda: int | None = None) -> Choice:
    """The default preset for runs on `cluster` (`why`: how the cluster was chosen); `cuda`
    is this machine's CUDA GPU count, probed when None (only needed for local runs)."""
    if cluster == "slurm":
        return Choice("imagenet", "slurm", f"the runs go to SLURM ({why}), so the GPU study")
    gpus = cuda_devices() if cuda is None else cuda
    if gpus:
        return Choice("imagenet", "local-gpu", f"the runs are local ({why}) and this machine "
                      f"has {gpus} CUDA GPU(s), so the GPU study on them", gpus)
    return Choice("demo", "cpu", f"no CUDA GPU here and the runs are local ({why}), "
                  "so the CPU demo")


def _size_of(name: str) -> str | None:
    """'S' of 'S' or 'S/16'; None for a name that is no size (the grid reports it)."""
    try:
        return split_name(resolve_size(name, 1))[0]
    except ValueError:
        return None


def gpu_flags(opts: SweepOptions) -> list[str]:
    """The flags of `opts` that only make sense with GPUs: sizes above the micro ladder,
    more than one device per run."""
    asked = []
    if opts.sizes is not None:
        sizes = [_size_of(name) for name in opts.sizes]
        if any(size is not None and size not in MICRO_SIZES for size in sizes):
            asked.append(f"--sizes {','.join(opts.sizes)}")
    if opts.devices is not None and opts.devices > 1:
        asked.append(f"--gpus {opts.devices}")
    return asked


def default_preset(opts: SweepOptions, cluster: str, why: str,
                   cuda: int | None = None) -> tuple[Preset, Choice | None]:
    """--preset, or the default for where the runs go (one line says which and why); on a
    machine with neither GPU nor SLURM, a GPU-sized request is an error naming what works."""
    if opts.preset:
        return get_preset(opts.preset), None
    choice = choose_preset(cluster, why, cuda)
    asked = gpu_flags(opts) if choice.runs_on == "cpu" else []
    if asked:
        raise ValueError(
            f"no GPU here and the runs stay local ({why}): {' '.join(asked)} needs GPUs. "
            "Run the CPU demo here instead: python launchers/sweep.py --preset demo --cluster "
            "local (micro ViTs mu,m1,m2 on built-in digits, about 1.5 min on 2 cores; "
            "--gpus N there means N CPU processes per run); on a SLURM login node or a CUDA "
            "machine this command runs as asked")
    print(f"preset {choice.preset} (default): {choice.reason}; --preset NAME for another")
    return get_preset(choice.preset), choice


# -- data ----------------------------------------------------------------------------------------

def data_env_var(preset: str) -> str:
    """VIT_SCALING_DATA_IMAGENET for `imagenet` (VIT_SCALING_DATA is the built-in data's
    cache dir, a different thing)."""
    return f"VIT_SCALING_DATA_{preset.upper()}"


def config_files(env: dict | None = None, cwd: Path | None = None) -> list[Path]:
    """Where a config file may name the data, first wins."""
    env = os.environ if env is None else env
    home = Path(env.get("XDG_CONFIG_HOME") or Path(env.get("HOME") or Path.home()) / ".config")
    return [(cwd or Path.cwd()) / CONFIG_NAME, home / "vit-scaling" / "config.yaml"]


def read_config(path: Path) -> dict:
    """A vit-scaling config file: {'data': {preset: dir}} (dirs relative to the file)."""
    import yaml  # as launchers.slurm_config.load_slurm_yaml

    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ValueError(f"config {path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    data = raw.get("data", {}) if isinstance(raw, dict) else None
    if not isinstance(data, dict) or sorted(set(raw) - set(CONFIG_KEYS)):
        raise ValueError(f"config {path}: expected a mapping with key(s) {list(CONFIG_KEYS)}, "
                         "e.g. 'data: {imagenet: /datasets/in1k-shards}'")
    bad = sorted(set(data) - set(PRESETS))
    if bad or not all(isinstance(v, str) and v.strip() for v in data.values()):
        raise ValueError(f"config {path}: data must map preset names {sorted(PRESETS)} to "
                         f"directories{f'; unknown {bad}' if bad else ''}")
    return {name: str((path.parent / Path(v).expanduser()).resolve()) for name, v in data.items()}


def data_default(preset: str, env: dict | None = None, cwd: Path | None = None
                 ) -> tuple[str, str] | None:
    """(data dir, where it came from) for a preset without --data, or None."""
    env = os.environ if env is None else env
    var = data_env_var(preset)
    if env.get(var, "").strip():
        return env[var], var
    for path in config_files(env, cwd):
        if path.is_file():
            found = read_config(path).get(preset)
            if found:
                return found, str(path)
    return None


def how_to_give_data(name: str) -> str:
    """Every way to give preset `name` its data."""
    return (f"give --data DIR (shards with dataset.json, from python -m scaling.data.make_shards)"
            f", or set {data_env_var(name)}=DIR, or write 'data: {{{name}: DIR}}' into "
            f"./{CONFIG_NAME} or ~/.config/vit-scaling/config.yaml")


def missing_data(preset: Preset) -> str:
    """The error of a preset that has no data."""
    return f"preset {preset.name} needs data: {how_to_give_data(preset.name)}; " \
           "--dry-run plans without it"


def placeholder_data(preset: Preset) -> DatasetInfo:
    """The preset's nominal dataset, without shards, for a dry run planned without data."""
    n = preset.nominal_data
    print(f"data: none given; this dry run plans with a placeholder of {n['name']}'s nominal "
          f"size ({n['train']:,} train / {n['val']:,} val images, {n['classes']} classes, "
          f"{n['image_size']} px), shown as --data '{PLACEHOLDER}': run ids and steps are "
          "indicative only")
    print(f"  to run it, {how_to_give_data(preset.name)}")
    return DatasetInfo(root=Path(PLACEHOLDER), source=f"placeholder:{n['name']}",
                       image_size=int(n["image_size"]), image_format="jpg",
                       classes=tuple(str(i) for i in range(int(n["classes"]))),
                       splits={k: SplitInfo(k, int(n[k]), ()) for k in ("train", "val")})


def _builtin(source: str, data_args: dict, what: str, name: str | None = None) -> DatasetInfo:
    """Built-in shards of `source`, made once under $VIT_SCALING_DATA (default ./data) in the
    folder `name` (default: named by the arguments), then reused; made again if its arguments
    change."""
    tag = name or "-".join([source] + [f"{k}{v}" for k, v in sorted(data_args.items())])
    out = Path(os.environ.get("VIT_SCALING_DATA", "data")) / tag
    print(f"{what}: {out} ({source}; made once, then reused)")
    return make_builtin_shards(source, out, **data_args)


def with_builtin_fewshot(opts: SweepOptions, preset: Preset) -> Preset:
    """The preset with its built-in downstream sets (made once, like its built-in data) as
    few-shot probes of every run: only when its built-in data is used (no --data) and the
    recipe names no --fewshot of its own (--set fewshot=... still wins)."""
    spec = preset.fewshot_builtin
    if not spec or opts.data or not preset.builtin_data or "fewshot" in preset.train:
        return preset
    dirs = [str(_builtin(src, kw, "downstream data", name).root)
            for name, src, kw in spec["sets"]]
    train = {"fewshot": ",".join(dirs), "fewshot_shots": spec["shots"],
             "fewshot_seeds": spec["seeds"]}
    return preset.replace(train={**preset.train, **train})


def resolve_data(opts: SweepOptions, preset: Preset) -> tuple[DatasetInfo, bool]:
    """(dataset, whether it is a placeholder): --data, the preset's built-in shards (made once
    in a cache dir), the documented defaults, or (dry run) the nominal dataset."""
    if opts.data:
        return load_dataset_info(opts.data, verify="size"), False  # DataError names it
    if preset.builtin_data:
        return _builtin(preset.builtin_data, preset.data_args, "built-in data"), False
    found = data_default(preset.name)
    if found:
        print(f"data: {found[0]} (from {found[1]})")
        try:
            return load_dataset_info(found[0], verify="size"), False
        except DataError as e:
            raise DataError(f"{e} (the data dir set by {found[1]})") from None
    if opts.dry_run and preset.nominal_data:
        return placeholder_data(preset), True
    raise ValueError(missing_data(preset))

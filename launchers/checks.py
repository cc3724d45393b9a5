"""Warnings about a planned sweep that is valid but probably not what was meant.

- a GPU preset for a SLURM partition whose nodes have no GPUs (`sinfo` shows no gpu gres), or a
  partition sinfo does not list: the jobs would never start, or sbatch refuses them;
- a recipe's resolution far above the data's (a 224 px recipe on 8 px digits);
- a GPU preset run locally on a machine without a CUDA GPU: the runs train on the CPU.
"""

from __future__ import annotations

import subprocess

from launchers.grid import RunSpec, gpu_request, node_layout
from launchers.presets import Preset
from scaling.data import DatasetInfo

UPSCALE_WARN = 2  # warn when the recipe's images are at least this many times the data's


def partitions() -> dict[str, list[str]] | None:
    """{partition: [gres of its node groups]} from sinfo (the default one marked with a
    trailing '*'), or None when sinfo does not answer."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P|%G"], capture_output=True, text=True,
                             timeout=15, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        name, _, gres = line.strip().partition("|")
        if name:
            found.setdefault(name, []).append(gres.strip())
    return found


def partition_warning(partition: str | None, gpu_request: int) -> str | None:
    """Why a GPU job on `partition` (None: the default one), asking for `gpu_request` GPUs per
    node, would not run, or None."""
    found = partitions()
    if not found:
        return None  # SLURM did not answer: nothing to say
    if partition is None:
        name = next((p for p in found if p.endswith("*")), None)
        if name is None:
            return None
        gres, partition = found[name], name.rstrip("*")
    else:
        gres = found.get(partition, found.get(partition + "*"))
        if gres is None:
            names = sorted(p.rstrip("*") for p in found)
            return (f"sinfo lists no partition {partition!r} (partitions: {', '.join(names)}): "
                    "sbatch would refuse the jobs")
    if any("gpu" in g.lower() for g in gres):
        return None
    shown = ", ".join(sorted({g for g in gres if g not in ("", "(null)")})) or "none"
    return (f"partition {partition!r} has no GPUs (sinfo shows gres: {shown})"
            f": this GPU preset's jobs request --gpus-per-node={gpu_request} and would not "
            "start there; pick a GPU partition with --partition, or a CPU preset (--preset demo)")


def resolution_warning(preset: Preset, specs: list[RunSpec], info: DatasetInfo) -> str | None:
    """The recipe trains at many times the data's resolution, or None."""
    sizes = sorted({spec.cfg.image_size for spec in specs if spec.cfg.image_size})
    if not sizes or sizes[-1] < UPSCALE_WARN * info.image_size:
        return None
    return (f"the {preset.name} recipe trains at {sizes[-1]} px but {info.root} holds "
            f"{info.image_size} px images ({sizes[-1] / info.image_size:.0f}x upscaled, "
            "nothing the model can learn from the extra pixels); use a preset made for such "
            "images (demo: 8 px digits, cifar: 32 px) or data at the recipe's resolution")


def plan_warnings(preset: Preset, specs: list[RunSpec], info: DatasetInfo, cluster: str,
                  placement: dict, *, placeholder: bool, local_gpus: int | None) -> list[str]:
    """Every warning for this plan (`placement`: the merged SLURM settings,
    launch.placement_settings; `local_gpus`: CUDA GPUs here, None when not probed)."""
    found = []
    if preset.device == "cuda" and cluster == "slurm":
        layout = node_layout(max(spec.world_size for spec in specs),
                             int(placement["gpus_per_node"]))
        found.append(partition_warning(placement.get("partition"),
                                       gpu_request(layout, preset.device)))
    if preset.device == "cuda" and cluster == "local" and local_gpus == 0:
        found.append(f"preset {preset.name} is a GPU recipe but this machine has no CUDA GPU: "
                     "its runs would train on the CPU (slowly); --preset demo is the CPU one")
    if not placeholder:
        found.append(resolution_warning(preset, specs, info))
    return [w for w in found if w]

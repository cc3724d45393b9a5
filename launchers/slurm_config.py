"""`--slurm-config FILE`: SLURM settings from a YAML mapping, each key checked for its type (as
the flag of the same name parses it) before anything is planned. Flags override the file
(launchers.launch.placement_settings); launchers.slurm turns the merged settings into sbatch
parameters."""

from __future__ import annotations

import os
from pathlib import Path

# key -> (the type it must have, what an error calls it); ints as the flags take them
TEXT = (str, "a string")
WHOLE = (int, "a whole number")
TEXTS = (list, "a list of strings")
SLURM_KEYS = {"partition": TEXT, "account": TEXT, "qos": TEXT, "time": WHOLE,
              "gpus_per_node": WHOLE, "cpus_per_task": WHOLE, "mem_gb": WHOLE,
              "max_parallel": WHOLE, "max_requeues": WHOLE, "signal": TEXT, "constraint": TEXT,
              "exclude": TEXT, "setup": TEXTS, "srun_args": TEXTS,
              "additional_parameters": (dict, "a mapping of sbatch options to values")}
UNITS = {"time": " (minutes)", "mem_gb": " (GB)"}


def _fits(value, kind: type) -> bool:
    if kind is int:  # 8.5, true or "8" are not a whole number here: YAML gave them a type
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is str:  # an account or partition may be all digits (YAML reads it as an int)
        return isinstance(value, (str, int)) and not isinstance(value, bool)
    if kind is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind)


def load_slurm_yaml(path: str | os.PathLike) -> dict:
    """SLURM settings from a YAML mapping with keys of SLURM_KEYS; ValueError (one line)
    naming the file, the key and the type it needs."""
    import yaml  # late: only a sweep given --slurm-config needs it

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ValueError(f"--slurm-config {path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--slurm-config {path}: not valid YAML "
                         f"({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ValueError(  # noqa: TRY004 - bad user input, reported like every other (exit 2)
            f"--slurm-config {path}: expected a mapping, got {type(data).__name__}")
    bad = sorted(map(str, set(data) - set(SLURM_KEYS)))
    if bad:
        raise ValueError(f"--slurm-config {path}: unknown key(s) {bad}; valid: {list(SLURM_KEYS)}")
    for key, value in data.items():
        kind, what = SLURM_KEYS[key]
        if value is not None and not _fits(value, kind):
            raise ValueError(f"--slurm-config {path}: {key} must be {what}{UNITS.get(key, '')}, "
                             f"not {value!r}")
    return {k: str(v) if SLURM_KEYS[k] is TEXT else v for k, v in data.items() if v is not None}

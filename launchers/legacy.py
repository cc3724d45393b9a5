"""Run dirs named by ids that hashed the world size (made before run ids were the recipe alone).

Such a dir keeps its name: `find` returns it as the id of its recipe's grid point, so a finished
run is skipped, an unfinished one resumes in it (at any --gpus), and the analysis, which reads
the run dirs it finds, sees one dir per recipe. The old hash is computed here only, and only to
recognise those dirs (docs/sweeps.md, "Run ids made before the world size left them").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from scaling.config import RESUMABLE_FIELDS, TrainConfig
from scaling.results import (
    CONFIG_FILE,
    JOB_FILE,
    PLAN_FILE,
    check_config,
    read_final,
    read_json,
)

DIGEST = re.compile(r"[0-9a-f]{6}")
# world sizes tried for a dir whose config.json is the recipe's, beyond those it records (a run
# resumed on another world size records only its latest in job.json and plan.json)
WORLD_SIZES = range(1, 1025)


def legacy_hash(payload: dict, world_size: int) -> str:
    """The old id's six hex digits: launchers.grid.recipe_payload and the world size."""
    body = json.dumps({**payload, "world_size": world_size}, sort_keys=True, default=str)
    return hashlib.sha1(body.encode()).hexdigest()[:6]


def _hashes(payload: dict, sizes) -> set[str]:
    """legacy_hash for every world size of `sizes`, the JSON written once ("world_size" sorts
    last, so only its digits change)."""
    head = json.dumps({**payload, "world_size": 0}, sort_keys=True, default=str)
    assert head.endswith("0}"), head  # the key order legacy_hash relies on
    return {hashlib.sha1(f"{head[:-2]}{n}}}".encode()).hexdigest()[:6] for n in sizes}


def recorded_world_sizes(run_dir: Path) -> set[int]:
    """The world sizes a run dir records: job.json, plan.json, final.json and its segments."""
    found = set()
    for name in (JOB_FILE, PLAN_FILE):
        try:
            found.add(int(read_json(run_dir / name)["world_size"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    try:
        final = read_final(run_dir) or {}
    except ValueError:
        final = {}
    found |= {int(s["world_size"]) for s in final.get("segments") or [] if "world_size" in s}
    if isinstance(final.get("world_size"), int):
        found.add(final["world_size"])
    return found


def same_recipe(run_dir: Path, digest: str, payload: dict, config: dict) -> bool:
    """Whether `run_dir`, whose id ends in `digest`, was made for this recipe under the old id:
    its config.json (when it has one) is `config` up to resumable fields, and `digest` is the
    old hash of `payload` at a world size it records (or, with a config.json, any up to 1024)."""
    has_config = (run_dir / CONFIG_FILE).exists()
    if has_config:
        try:
            check_config(run_dir, config, resumable=RESUMABLE_FIELDS,
                         defaults=TrainConfig.defaults())
        except ValueError:
            return False
    sizes = recorded_world_sizes(run_dir)
    return digest in _hashes(payload, sorted(sizes | set(WORLD_SIZES) if has_config else sizes))


def find(sweep_dir: Path, new_id: str, payload: dict, config: dict) -> str | None:
    """The name of the run dir in `sweep_dir` made for this recipe under its old id, where no
    dir has `new_id`; None otherwise. Of several (an old sweep rerun on another --gpus after the
    run finished trained it again), a finished one, then the first by name; a warning names
    them all (the analysis counts the one it keeps, analysis/load/sweeps.py)."""
    if (sweep_dir / new_id).exists() or not sweep_dir.is_dir():
        return None
    prefix = new_id.rsplit("_", 1)[0] + "_"
    names = sorted(n for n in os.listdir(sweep_dir) if n.startswith(prefix)
                   and DIGEST.fullmatch(n[len(prefix):]))
    found = [n for n in names if same_recipe(sweep_dir / n, n[len(prefix):], payload, config)]
    if not found:
        return None
    done = [n for n in found if _finished(sweep_dir / n)]
    pick = (done or found)[0]
    if len(found) > 1:
        print(f"warning: {len(found)} run dirs hold one recipe ({', '.join(found)}, made with "
              f"different --gpus before run ids left the world size out): {pick} is used, and "
              "the analysis counts it once and lists the others as skipped")
    return pick


def _finished(run_dir: Path) -> bool:
    try:
        return read_final(run_dir) is not None
    except ValueError:
        return False

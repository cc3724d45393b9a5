"""The sweeps of a results dir (the folders holding its run dirs) and its fine-tune folders, so
that a `--sweep` name is checked before anything is parsed: an unknown name, or a folder of
fine-tunes (read through the pre-training runs' transfer rows, never as a sweep of their own),
is one clear error."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from analysis.load.skips import skip
from scaling.results import CONFIG_FILE, SchemaError, iter_run_dirs, read_json

DIGEST = re.compile(r"[0-9a-f]{6}")  # the recipe hash ending a sweep's run id


class SweepError(ValueError):
    """A --sweep name that is no sweep of pre-training runs under the results dir."""


def _config(run_dir: Path) -> dict:
    """RUN_DIR/config.json, or {} if unreadable (the loader reports it)."""
    try:
        return read_json(run_dir / CONFIG_FILE)
    except (SchemaError, OSError, UnicodeDecodeError):
        return {}


def is_finetune(run_dir: Path) -> bool:
    """Whether RUN_DIR's config.json is a fine-tune's (`init_from` set, scaling.finetune);
    False if unreadable (then the loader reports it)."""
    return bool(_config(run_dir).get("init_from"))


def _finetune_hint(name: str, run_dirs: list[Path]) -> str:
    """The error for --sweep NAME naming a folder of fine-tunes: which sweep and metric to use."""
    configs = [_config(d) for d in run_dirs]
    pre = sorted({Path(c["init_from"]).parent.name for c in configs})
    data = sorted({Path(str(c.get("data"))).name for c in configs})
    return (f"--sweep {name}: {name} holds fine-tune runs, which are read through the "
            f"pre-training sweep's transfer rows, not as a sweep: use --sweep "
            f"{','.join(pre)} --metric {' or '.join(f'finetune:{d}' for d in data)}")


def check_sweeps(results_dir, names) -> None:
    """Raise SweepError (one line) unless each name is a folder of pre-training runs under
    `results_dir`; a missing results dir is left to the loader."""
    root = Path(results_dir)
    if not names or not root.is_dir():
        return
    by_sweep: dict[str, list[Path]] = defaultdict(list)
    for run_dir in iter_run_dirs(root):
        by_sweep[run_dir.parent.name].append(run_dir)
    finetunes = {s for s, dirs in by_sweep.items() if all(map(is_finetune, dirs))}
    for name in names:
        if name in finetunes:
            raise SweepError(_finetune_hint(name, by_sweep[name]))
        if name not in by_sweep:
            known = sorted(set(by_sweep) - finetunes)
            raise SweepError(f"--sweep {name}: no such sweep under {root}; the sweeps there: "
                             f"{', '.join(known) or 'none'}")


def repeats_left_out(runs: list[dict], skipped: list, root: Path) -> list[int]:
    """Indices of `runs` to keep: one run dir per (sweep, grid point, recipe, seed). Two sweep
    run dirs `SIZE_BUDGET_<6 hex>` of one recipe and seed are one experiment trained twice (a
    sweep of before run ids left out the world size, rerun at another --gpus:
    launchers/legacy.py); counting both would count it twice. Kept: a finished run over an
    unfinished one, then the one that saw more images, then the first by name; each other is
    skipped, naming the one kept. (Their compute still counts in compute_spent: it was spent.)"""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(runs):
        point, _, digest = r["run_id"].rpartition("_")
        same = (point, r["recipe"], r["seed"]) if DIGEST.fullmatch(digest) else (i,)
        groups[(r["sweep"], *same)].append(i)
    keep = []
    for members in groups.values():
        ranked = sorted(members, key=lambda i: (runs[i]["status"] != "ok",
                                                -(runs[i]["images_seen"] or 0), runs[i]["run"]))
        keep.append(ranked[0])
        for i in ranked[1:]:
            skip(skipped, root / runs[i]["run"], f"the same recipe and seed as "
                 f"{runs[ranked[0]]['run']} (one experiment trained twice); counted once, as that run")
    return sorted(keep)

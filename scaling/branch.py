"""A run that branches from another run's checkpoint: the cooldown branches of a branching sweep.

A branch (TrainConfig `trunk_run`, `branch_step`) is an ordinary run dir that rank 0 seeds, on
its first start, with the trunk's checkpoint of `branch_step` and its rows, and that then
resumes like any run; `check_trunk` keeps the continuation exact. No torch or DeepSpeed here
(the launchers ask `trunk_checkpoint` whether a branch may start).
Details: docs/sweeps.md ("Branching sweeps").
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from scaling import results

COMPLETE = "COMPLETE"  # scaling.engine's marker of a complete checkpoint (same name there)
# Fields a branch may set differently from its trunk: what the trunk's run is (budget, length
# of the cooldown, pinned steps), where it lies and what it branches from.
BRANCH_FIELDS = ("steps", "epochs", "samples", "flops", "cooldown_steps", "cooldown_fraction",
                 "cooldown_shape", "ckpt_at", "trunk_run", "branch_step")


def checkpoint_tag(step: int) -> str:
    """The folder name of a step's checkpoint (scaling.engine's format)."""
    return f"step{step:08d}"


def trunk_dir(out: str | os.PathLike, trunk_run: str) -> Path:
    """The trunk's run dir: `trunk_run` itself when absolute, else a sibling of `out`."""
    path = Path(trunk_run)
    return path if path.is_absolute() else Path(out).parent / path


def trunk_checkpoint(trunk: str | os.PathLike, step: int) -> Path | None:
    """The trunk's complete checkpoint folder of `step`, or None while there is none."""
    folder = Path(trunk) / results.CHECKPOINT_DIR / checkpoint_tag(step)
    return folder if (folder / COMPLETE).is_file() else None


def has_own_checkpoint(run_dir: str | os.PathLike) -> bool:
    """Whether a run dir holds a complete checkpoint (a seeded branch does)."""
    root = Path(run_dir) / results.CHECKPOINT_DIR
    return root.is_dir() and any((d / COMPLETE).is_file() for d in root.glob("step*"))


def ready(out: str | os.PathLike, trunk_run: str | None, branch_step: int | None) -> bool:
    """Whether a run may start: not a branch, already seeded, or its trunk point exists."""
    if trunk_run is None:
        return True
    return has_own_checkpoint(out) or trunk_checkpoint(trunk_dir(out, trunk_run),
                                                        branch_step) is not None


def check_trunk(cfg: dict, defaults: dict, resumable: tuple[str, ...]) -> None:
    """ValueError (one line) when a branch config (a TrainConfig dict) cannot continue its
    trunk exactly: no trunk config.json, or a result-changing field that differs."""
    trunk = trunk_dir(cfg["out"], cfg["trunk_run"])
    path = trunk / results.CONFIG_FILE
    if not path.is_file():
        if has_own_checkpoint(cfg["out"]):
            return  # seeded earlier: the trunk is no longer needed
        raise ValueError(f"--trunk-run {trunk}: no {results.CONFIG_FILE} there (not a run dir, "
                         "or the trunk has not started yet)")
    old = results.read_json(path)
    if old.get("cooldown_steps") or old.get("cooldown_fraction"):
        raise ValueError(f"--trunk-run {trunk} has a cooldown of its own; a trunk runs its "
                         "stable schedule to the end")
    skip = set(BRANCH_FIELDS) | set(resumable)
    detail = results.config_differences(old, cfg, defaults=defaults, skip=skip, sep="vs")
    if detail:
        raise ValueError(f"--trunk-run {trunk} was trained with another recipe ({detail}); a "
                         "branch must share every result-changing field but budget and cooldown")


def check_branch(cfg: dict, defaults: dict, resumable: tuple[str, ...]) -> None:
    """Before a branch trains (scaling.train.prepare): its trunk's recipe matches
    (check_trunk), and the trunk's checkpoint exists unless the branch was seeded already;
    ValueError (one line) otherwise."""
    check_trunk(cfg, defaults, resumable)
    if not ready(cfg["out"], cfg["trunk_run"], cfg["branch_step"]):
        raise ValueError(f"trunk {trunk_dir(cfg['out'], cfg['trunk_run'])} has no complete "
                         f"checkpoint of step {cfg['branch_step']} yet; start this branch once "
                         "it has (launchers/branching.py does)")


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of src into dst (a copy where links do not work)."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def seed_from_trunk(out: str | os.PathLike, trunk_run: str, branch_step: int) -> str | None:
    """Rank 0, first start of a branch (no complete checkpoint of its own): link the trunk's
    checkpoint of branch_step into OUT/checkpoints and copy its metrics and transfer rows.
    Returns what was done (for the log), None when there was nothing to do. RuntimeError when
    the trunk checkpoint is missing. The checkpoint folder appears last, by a rename, so a kill
    midway leaves a branch that seeds again on its next start."""
    out = Path(out)
    if has_own_checkpoint(out):
        return None
    trunk = trunk_dir(out, trunk_run)
    src = trunk_checkpoint(trunk, branch_step)
    if src is None:
        raise RuntimeError(f"trunk {trunk} has no complete checkpoint of step {branch_step} "
                           "yet; start this branch once it has (the branching sweep does)")
    root = out / results.CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for name in (results.METRICS_FILE, results.TRANSFER_FILE):
        if (trunk / name).is_file():
            results.atomic_write_text(out / name, (trunk / name).read_text())
        else:
            (out / name).unlink(missing_ok=True)
    for left in root.glob(".seed.*"):  # of a seeding killed midway (we hold the run's lock)
        shutil.rmtree(left, ignore_errors=True)
    tmp = root / f".seed.{os.getpid()}"
    _link_tree(src, tmp)
    os.replace(tmp, root / src.name)
    results.atomic_write_text(root / "latest", src.name + "\n")
    return f"seeded from {src} (step {branch_step})"

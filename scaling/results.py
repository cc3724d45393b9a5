"""The files of a run directory: their names, the schemas of metrics.jsonl, transfer.jsonl and
final.json, exit codes, and the helpers that read and write them; the run dir's admission rules
(config check, corrupt files refused, failed outcomes set aside). The one place the on-disk
format is defined in code; the format itself is documented in docs/results.md. Standard library
only: the analysis reads runs without torch.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Re-exported: scaling.results is where the launchers, the analysis and the tests import a run
# dir's names from (the lock and the atomic writes have their own modules).
from scaling.run_lock import LOCK_FILE, RunDirInUse, RunLock  # noqa: F401
from scaling.writes import DiskFull, atomic_open, atomic_write_text, named_if_full  # noqa: F401

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TRANSFER_FILE = "transfer.jsonl"
FINAL_FILE = "final.json"
JOB_FILE = "job.json"
PLAN_FILE = "plan.json"
LOG_DIR = "logs"
EXPORT_FILE = "model.safetensors"
CHECKPOINT_DIR = "checkpoints"

STATUS_OK = "ok"
STATUS_DIVERGED = "diverged"
STATUS_FAILED = "failed"
STATUSES = (STATUS_OK, STATUS_DIVERGED, STATUS_FAILED)

# Process exit codes of `python -m scaling.train`; the sweep launcher keys on them.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2  # argparse's own code for bad flags; also used for invalid configs
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL from sysexits.h: "try again later", i.e. requeue me

COMMON_KEYS = ("kind", "step", "epoch", "images_seen", "flops_seen", "wall_s")
TRAIN_KEYS = COMMON_KEYS + (
    "loss", "lr", "images_per_s", "tflops", "mfu", "mem_gb", "skipped_samples",
)
TRAIN_OPTIONAL = ("data_wait_fraction",)  # train-row keys absent in older rows
# Keys of a train row that are timings: they differ between two runs of one recipe.
TIMING_KEYS = ("wall_s", "images_per_s", "tflops", "mfu", "mem_gb", "data_wait_fraction")
# A run is input-bound above this data_wait_fraction: its images/s, MFU and device-hours measure
# the loader, not the model (the run warns, the sweep summary and the analysis name it).
INPUT_BOUND = 0.10
EVAL_KEYS = COMMON_KEYS + ("loss", "top1", "top5", "num_samples")
EVAL_OPTIONAL = ("loss_sd",)  # eval-row keys absent in older rows
TRANSFER_KEYS = ("kind", "dataset", "shots", "seed", "top1", "step", "images_seen", "flops_seen",
                 "num_train", "num_test")
# A fine-tune row (scaling.finetune) is one per fine-tune run: no shots, `seed` the fine-tune's.
FINETUNE_KEYS = ("kind", "dataset", "shots", "seed", "top1", "step", "images_seen", "flops_seen",
                 "num_test")
TRANSFER_KINDS = ("fewshot", "finetune")
FINAL_KEYS = (
    "status", "final_top1", "best_top1", "final_top5", "final_loss", "steps", "images_seen",
    "total_flops", "params", "macs_per_image", "model", "wall_hours", "device_hours",
    "world_size", "skipped_samples", "overhead_fraction", "error",
)


class SchemaError(ValueError):
    """A results file that does not follow the schema above."""


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every reader can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def validate_row(row: dict) -> dict:
    """Check one metrics row against the schema; return it unchanged or raise SchemaError."""
    if not isinstance(row, dict):
        raise SchemaError(f"metrics row is a JSON {type(row).__name__}, not an object")
    kind = row.get("kind")
    keys = {"train": TRAIN_KEYS, "eval": EVAL_KEYS}.get(kind)
    if keys is None:
        raise SchemaError(f"metrics row has kind={kind!r}; expected 'train' or 'eval'")
    missing = [k for k in keys if k not in row]
    if missing:
        raise SchemaError(f"{kind} row is missing {missing}")
    return row


def validate_transfer(row: dict) -> dict:
    """Check one transfer.jsonl row against the schema; return it unchanged or raise
    SchemaError."""
    if not isinstance(row, dict):
        raise SchemaError(f"transfer row is a JSON {type(row).__name__}, not an object")
    if row.get("kind") not in TRANSFER_KINDS:
        raise SchemaError(f"transfer row has kind={row.get('kind')!r}; expected one of "
                          f"{TRANSFER_KINDS}")
    keys = FINETUNE_KEYS if row["kind"] == "finetune" else TRANSFER_KEYS
    missing = [k for k in keys if k not in row]
    if missing:
        raise SchemaError(f"{row['kind']} transfer row is missing {missing}")
    return row


def validate_final(final: dict) -> dict:
    """Check a final.json payload against the schema; return it unchanged or raise SchemaError."""
    missing = [k for k in FINAL_KEYS if k not in final]
    if missing:
        raise SchemaError(f"final.json is missing {missing}")
    if final["status"] not in STATUSES:
        raise SchemaError(f"final.json status={final['status']!r}; expected one of {STATUSES}")
    return final


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Atomically write a JSON object (NaN/inf become null)."""
    payload = {k: _clean(v) for k, v in payload.items()}
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object; a malformed file raises SchemaError naming the path."""
    try:
        with open(path) as f:
            payload = json.load(f)
    except json.JSONDecodeError as e:
        raise SchemaError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(payload, dict):
        raise SchemaError(f"{path}: expected a JSON object, got {type(payload).__name__}")
    return payload


_VALIDATORS = {METRICS_FILE: validate_row, TRANSFER_FILE: validate_transfer}


def append_metrics(run_dir: str | os.PathLike, row: dict) -> None:
    """Append one validated row to RUN_DIR/metrics.jsonl (rank 0 only)."""
    _append(Path(run_dir) / METRICS_FILE, row)


def append_transfer(run_dir: str | os.PathLike, row: dict) -> None:
    """Append one validated row to RUN_DIR/transfer.jsonl (rank 0, or the post-hoc evaluator
    while it holds the run dir's lock)."""
    _append(Path(run_dir) / TRANSFER_FILE, row)


def _append(path: Path, row: dict) -> None:
    row = _VALIDATORS[path.name]({k: _clean(v) for k, v in row.items()})
    try:
        with named_if_full(path, "appending to"), open(path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
    except DiskFull:
        raise
    except OSError as e:  # name the file: a bare "[Errno 13] Permission denied" does not
        raise OSError(e.errno, f"{e.strerror} (appending to {path})") from None


def read_metrics(run_dir: str | os.PathLike, *, strict: bool = True) -> list[dict]:
    """Read RUN_DIR/metrics.jsonl. A torn last line (a kill mid-write) is dropped; any other
    malformed line raises SchemaError naming file and line (or is skipped when strict=False)."""
    return read_rows(run_dir, METRICS_FILE, strict=strict)


def read_transfer(run_dir: str | os.PathLike, *, strict: bool = True) -> list[dict]:
    """Read RUN_DIR/transfer.jsonl, by the rules of read_metrics."""
    return read_rows(run_dir, TRANSFER_FILE, strict=strict)


def read_rows(run_dir: str | os.PathLike, name: str, *, strict: bool = True) -> list[dict]:
    """The rows of RUN_DIR/NAME (METRICS_FILE or TRANSFER_FILE), validated by its schema."""
    path, validate = Path(run_dir) / name, _VALIDATORS[name]
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(validate(json.loads(line)))
        except (json.JSONDecodeError, SchemaError) as e:
            if i == len(lines) and isinstance(e, json.JSONDecodeError):
                break  # an interrupted append; the run will rewrite it on resume
            if strict:
                raise SchemaError(f"{path}:{i}: {e}") from e
    return rows


def truncate_metrics(run_dir: str | os.PathLike, step: int, rows: int | None = None) -> int:
    """truncate_rows for metrics.jsonl."""
    return truncate_rows(run_dir, METRICS_FILE, step, rows)


def truncate_rows(run_dir: str | os.PathLike, name: str, step: int,
                  rows: int | None = None) -> int:
    """Keep the first `rows` rows (all when None) of RUN_DIR/NAME logged up to `step`, drop the
    rest and a torn last line; returns the rows dropped.

    Every (re)start calls this before its first append, with the step of the checkpoint it
    resumes from (0 without one) and the number of rows that existed when it was saved: the
    rows of a lost attempt are re-run, and no (kind, step) may be counted twice, not even an
    eval at the checkpoint's own step logged after the save. A torn line (a kill mid-append) is
    removed, so an append never follows it. The same holds for transfer.jsonl with
    (dataset, shots, seed, step).
    """
    path = Path(run_dir) / name
    if not path.exists():
        return 0
    found = read_rows(run_dir, name, strict=True)
    kept = [r for r in found if r["step"] <= step][:rows]
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
    if text != path.read_text():
        atomic_write_text(path, text)
    return len(found) - len(kept)


def read_final(run_dir: str | os.PathLike) -> dict | None:
    """The validated final.json of a run, or None while it has not finished."""
    path = Path(run_dir) / FINAL_FILE
    if not path.exists():
        return None
    return validate_final(read_json(path))


def rank_log_path(run_dir: str | os.PathLike, rank: int) -> Path:
    """RUN_DIR/logs/rank{rank}.log: where a rank's stdout and stderr go (all attempts append)."""
    return Path(run_dir) / LOG_DIR / f"rank{rank}.log"


def iter_run_dirs(results_dir: str | os.PathLike) -> Iterator[Path]:
    """Every directory below results_dir that holds a config.json (a run), sorted."""
    root = Path(results_dir)
    yield from sorted(p.parent for p in root.rglob(CONFIG_FILE) if p.is_file())


# -- the rules of a run directory, shared by training and the launchers -------------------------

def config_differences(old: dict, new: dict, *, defaults: dict, skip=(), sep: str = "->"
                       ) -> str:
    """'key: old -> new, ...' for every field outside `skip` in which two configs differ, a
    field missing from either counting as its default ('' when they agree)."""
    differ = sorted(k for k in set(old) | set(new) if k not in skip
                    and old.get(k, defaults.get(k)) != new.get(k, defaults.get(k)))
    return ", ".join(f"{k}: {old.get(k, defaults.get(k))!r} {sep} {new.get(k)!r}" for k in differ)


def check_config(run_dir: str | os.PathLike, new: dict, *, resumable: tuple[str, ...],
                 defaults: dict) -> None:
    """Raise ValueError when RUN_DIR/config.json is another run's config.

    Fields in `resumable` may differ (they do not change results). A field missing from an old
    config.json (written before the field existed) counts as its default, which is what that
    run used; a field the old config has and `new` lacks must match a missing one (None).
    """
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return
    detail = config_differences(read_json(path), new, defaults=defaults, skip=resumable)
    if detail:
        raise ValueError(f"run dir {run_dir} holds another run's config ({detail}); "
                         "use a new --out (or --name) or the same flags")


def check_readable(run_dir: str | os.PathLike) -> None:
    """Raise SchemaError (a ValueError) naming the file when a run dir's final.json or a
    metrics or transfer line other than a torn last one is corrupt: such a dir is repaired by a
    person, never overwritten by a rerun."""
    run_dir = Path(run_dir)
    if (run_dir / FINAL_FILE).exists():
        read_final(run_dir)
    read_metrics(run_dir, strict=True)
    read_transfer(run_dir, strict=True)


def set_aside_final(run_dir: str | os.PathLike) -> Path | None:
    """Rename a failed/diverged run's final.json to final.STATUS.STAMP.PID.json (kept, never
    deleted) so that the run can be retried; returns the new path, or None when absent."""
    final = Path(run_dir) / FINAL_FILE
    if not final.exists():
        return None
    try:
        status = read_json(final).get("status", "unknown")
    except SchemaError:
        status = "unreadable"
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = final.with_name(f"final.{status}.{stamp}.{os.getpid()}.json")
    final.rename(target)
    return target


def check_writable(run_dir: str | os.PathLike) -> None:
    """Raise ValueError unless RUN_DIR is (or can be made) a directory this process can write:
    checked by creating it and writing a one-byte probe file, since permission bits say nothing
    to root or on a read-only mount, and an empty file fits on a full disk."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir} exists and is not a directory")
    probe = run_dir / f".probe.{socket.gethostname()}.{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("x")
    except OSError as e:
        raise ValueError(f"--out {run_dir} is not writable ({e.strerror})") from None
    finally:
        probe.unlink(missing_ok=True)

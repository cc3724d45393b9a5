"""Run directory layout, the metrics schema, and read/write helpers.

This module is the one place where the on-disk format of a run is defined. Training (rank 0)
writes it, the sweep launcher reads it to decide what to skip or resubmit, and the analysis reads
it to draw curves. Nothing here imports torch or DeepSpeed.

Run directory (``RUN_DIR``)::

    config.json         the frozen run config (scaling.config.TrainConfig as a dict), written once
    plan.json           what the config resolved to: total_steps, world_size, micro batch,
                        accumulation, steps_per_epoch, samples_per_epoch, params, macs_per_image
    metrics.jsonl       one JSON object per line, appended by rank 0 (schema below)
    transfer.jsonl      few-shot linear-probe rows (schema below), appended by rank 0 at each
                        eval point (--fewshot) and by `python -m scaling.fewshot` afterwards
    final.json          written once when the run ends (schema below); absent while running
    checkpoints/        DeepSpeed checkpoints, one folder per step; ``latest`` names the newest
    model.safetensors   the final weights, loadable without DeepSpeed by
                        ``scaling.export.load_exported``
    tb/                 TensorBoard event files, one per start of the run (scaling.tracking;
                        absent with --no-tensorboard)
    job.json            written by launchers/sweep.py: job id, submission time, requeues
    logs/rank{r}.log    each rank's stdout and stderr under the launchers (rank_log_path)
    .run.lock           held by rank 0 of the one process group training here (RunLock)
    final.STATUS.STAMP.PID.json   a failed/diverged outcome set aside by a retry
                        (set_aside_final); every attempt's outcome is kept

``metrics.jsonl`` rows all carry ``kind`` ("train" or "eval"), ``step`` (optimizer steps done),
``epoch`` (float, images_seen / samples_per_epoch), ``images_seen``, ``flops_seen`` (analytic
training FLOPs = 6 x forward MACs x images_seen, see scaling.flops) and ``wall_s`` (seconds since
the run first started, summed over restarts). Then:

- train rows: ``loss`` (mean over the logging window), ``lr``, ``images_per_s``, ``tflops``
  (achieved, per device), ``mfu`` (null when the device's peak is unknown), ``mem_gb`` (peak
  per-rank memory), ``skipped_samples`` (corrupt samples skipped so far, all ranks).
  Optional (absent in rows written before it existed): ``data_wait_fraction``, the share of the
  window's loop time spent waiting for the next batch: seconds in ``next(batches)`` / (those
  seconds + seconds in training steps), the max over ranks (scaling.meter.wait_fraction). Both
  are wall-clock seconds: the wait on the host's clock; the steps on the host's clock on a
  CPU, and on a GPU the device's own timeline from a CUDA event before each step to one after
  it (scaling.meter.StepClock, read back at the row's step). Above INPUT_BOUND the loader, not
  the model, set the window's speed (the run logs a warning).
- eval rows: ``loss``, ``top1``, ``top5`` (fractions in [0, 1]), ``num_samples`` (images
  evaluated, summed over ranks).

``final.json``: ``status`` (one of STATUSES), ``final_top1``, ``best_top1``, ``final_top5``,
``final_loss``, ``steps``, ``images_seen``, ``total_flops``, ``params``, ``macs_per_image``,
``model``, ``wall_hours``, ``device_hours`` (wall hours x world size, less ``op_build_s``: the
seconds spent compiling DeepSpeed's CPU comm op on its first multi-rank use on a machine, a cost
of the machine and not of the run; optional, absent before it existed; and less the ``compile``
part of ``overhead_breakdown_s``; summed over
``segments``), ``world_size`` (of the last segment),
``skipped_samples``, ``overhead_fraction`` (share of wall time outside training steps), and
``error`` (a message, for failed/diverged runs). Optional (absent in files written before it
existed): ``data_wait_fraction``, as in train rows but over the whole run (``data_wait`` /
(``data_wait`` + ``steps``) of ``overhead_breakdown_s``: every process of a resumed run, the
earlier ones as rank 0 saved them), the max over ranks (rank 0's alone on a failed or diverged
run, where the ranks may no longer meet); ``overhead_breakdown_s``, the wall seconds by part,
summing to wall_hours x 3600:
``startup`` (process start to build: interpreter, imports, config and data checks), ``build``
(process group, model, DeepSpeed engine, loaders, resuming), ``data_wait``, ``eval``,
``checkpoint``, ``export``, ``fewshot`` (few-shot probes at eval points, scaling.fewshot),
``compile`` (torch.compile with --compile, out of the steps and evals it ran in; 0 otherwise;
absent before it existed),
``steps`` (inside optimizer steps), ``other`` (logging, the loop's all-reduces); over restarts,
each process's start-up and build are added. Also optional (scaling.tracking.CheckpointCost):
``checkpoints`` (checkpoint saves, over restarts), ``checkpoint_s_sum`` and ``checkpoint_s_max``
(seconds of those saves, summed and the longest; a save a restart resumed from is timed by its
COMPLETE marker), ``checkpoint_bytes`` (size of the last complete checkpoint's folder, null
without one). Also optional (scaling.segments): ``segments``, one per process start that trained,
oldest first, each ending at the checkpoint the next one resumed from (a run may resume on
another world size, docs/failure-model.md): ``world_size``, ``start_step``, ``end_step``,
``wall_s`` (its wall seconds, start-up included) and ``device_hours``.

``transfer.jsonl`` rows (scaling.fewshot; one row per dataset, shots and seed, so that the
analysis can compute intervals over seeds): ``kind`` ("fewshot"), ``dataset`` (the downstream
shard dir's basename), ``shots`` (train images per class), ``seed`` (which draw of the k-shot
train set: 0, 1, ...), ``top1`` (fraction in [0, 1] on the downstream val split), ``step``,
``images_seen`` and ``flops_seen`` (of the pre-training at that point, as in metrics rows),
``num_train`` (images the probe was fitted on, shots x classes), ``num_test`` (val images).
Also written: ``l2`` (the ridge penalty), ``image_size`` (the resolution probed) and ``source``
("train": at an eval point during training; "export" or "checkpoint": after it). One
(dataset, shots, seed, step) is in the file at most once.

Fine-tune rows in the same file (scaling.finetune, appended to the PRE-TRAINING run's
transfer.jsonl when a fine-tune run started from its export finishes): ``kind`` ("finetune"),
``dataset`` (the fine-tune data's basename), ``shots`` (null), ``seed`` (the fine-tune's),
``top1`` (the fine-tuned model's on the downstream val split), ``step``, ``images_seen``,
``flops_seen`` (of the pre-training at its export), ``num_test`` (val images evaluated). Also
written: ``num_train`` (the downstream train split), ``image_size`` (the fine-tune resolution),
``finetune_run`` (its run dir), ``finetune_steps``, ``finetune_flops``, ``source`` ("finetune").
One (dataset, seed, step) is in the file at most once. The fine-tune run's own final.json adds
``pretrain_run`` (the run dir it started from) and ``pretrain_flops`` (that run's training
FLOPs at its export).

Rules every writer follows (the failure model, docs/architecture.md): one process group owns a
run dir at a time (RunLock); each (re)start first truncates metrics.jsonl and transfer.jsonl to
the rows saved with the checkpoint it resumes from, or to none without one (truncate_rows), so no
(kind, step) or (dataset, shots, seed, step) is ever counted twice; a run dir with another config (check_config) or a corrupt final.json or
metrics line (check_readable) is refused, never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from scaling import lockfile

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


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """A file to write `path` through, so that readers see either the old content or the new,
    never a torn one: a temporary file beside it (``.NAME.tmpPID``), fsynced and renamed over
    it (os.replace) when the block ends without an error, removed when it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when the write failed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see either the old content or the new, never a torn one."""
    with atomic_open(path) as f:
        f.write(text)


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
        with open(path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
    except OSError as e:  # name the file: a bare "[Errno 28] No space left on device" does not
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
    checked by creating it and writing a probe file, since permission bits say nothing to root
    or on a read-only mount."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir} exists and is not a directory")
    probe = run_dir / f".probe.{socket.gethostname()}.{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {run_dir} is not writable ({e.strerror})") from None


# -- one process owns a run directory ---------------------------------------------------------

LOCK_FILE = ".run.lock"


class RunDirInUse(ValueError):
    """Another live process owns the run directory."""


class RunLock:
    """Exclusive ownership of a run dir by one process (rank 0 of the run), for its lifetime:
    RUN_DIR/.run.lock, a scaling.lockfile lock (why a file and not flock, when a holder counts
    as dead, and the heartbeat are described there)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self.me = lockfile.identity()
        self._beat: lockfile.Heartbeat | None = None

    @property
    def lost(self) -> bool:
        """Someone took the lock over (it judged us dead: no heartbeat for STALE_AFTER_S)."""
        return self._beat is not None and self.path in self._beat.lost

    def acquire(self) -> RunLock:
        """Take the lock or raise RunDirInUse naming its live holder."""
        holder = lockfile.acquire(self.path, self.me)
        if holder is not None:
            who = (f"in use by PID {holder['pid']} on {holder.get('host')} (since "
                   f"{holder.get('since')})" if "pid" in holder else "locked by a process that "
                   "is writing or retaking its lock")
            raise RunDirInUse(f"run dir {self.path.parent} {who}; if that process is gone, "
                              f"remove {self.path}")
        self._beat = lockfile.Heartbeat()
        self._beat.add(self.path, self.me["token"])
        return self

    def release(self) -> None:
        """Give the lock up (only if it is still ours)."""
        if self._beat is not None:
            self._beat.stop()
        lockfile.release(self.path, self.me["token"])

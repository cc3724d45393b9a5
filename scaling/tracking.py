"""Live tracking of one run (rank 0): the rows of metrics.jsonl and transfer.jsonl, as they are
appended, also go to TensorBoard event files (RUN_DIR/tb) and, when asked, to Weights & Biases;
and what the run's checkpoints cost (final.json). The files stay the record: on a restart the
trackers are made to show exactly the rows those files kept. Tags, restarts, W&B offline mode
and the checkpoint-cost fields: docs/results.md ("`tb/` and Weights & Biases: live tracking").
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import time
from pathlib import Path

from scaling.results import METRICS_FILE, TRANSFER_FILE, read_metrics, read_transfer
from scaling.tail import rows_at_step

TB_DIR = "tb"
TRAIN_TAGS = ("loss", "lr", "images_per_s", "tflops", "mfu", "data_wait_fraction")
EVAL_TAGS = ("top1", "top5", "loss")


def check(cfg) -> None:
    """ValueError (one line) when a tracker the config asks for cannot run here."""
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard);"
                         " or pass --no-tensorboard")
    if cfg.wandb is not None and not cfg.wandb.strip():
        raise ValueError("--wandb '': give a project name or leave --wandb out")
    if cfg.wandb is not None and importlib.util.find_spec("wandb") is None:
        raise ValueError(f"--wandb {cfg.wandb} needs the wandb package (pip install wandb; "
                         "offline: WANDB_MODE=offline); or leave --wandb out")


class _TensorBoard:
    def __init__(self, run_dir: Path, step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / TB_DIR), purge_step=step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, cfg, step: int):
        import wandb  # optional (--wandb): checked by check() before any work

        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        # A restart rewinds the W&B run to its start (resume_from, W&B's purge_step), and
        # Tracker.open logs metrics.jsonl's kept rows again: wandb writes its files every 15 s,
        # so a killed process's W&B copy can lack rows that metrics.jsonl kept.
        start = (dict(resume_from=f"{run_id}?_step=0") if step > 0 else
                 dict(id=run_id, resume="allow"))
        self.run = wandb.init(project=cfg.wandb, dir=str(run_dir), name=run_dir.name,
                              config=cfg.to_dict(), **start)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """Where rank 0 sends each row it appends (Run._emit); `Tracker.open` at every start."""

    def __init__(self, sinks: list, fewshot_seeds: int = 1):
        self.sinks, self.fewshot_seeds = sinks, fewshot_seeds
        self._draws: dict[tuple, list[float]] = {}  # (dataset, shots, step) -> top-1 per seed

    @classmethod
    def open(cls, cfg, run_dir: str | os.PathLike, step: int) -> Tracker:
        """The trackers `cfg` asks for, on a run resumed at `step` (0: a fresh start); the
        rows kept are logged again (module doc, "Restarts"): TensorBoard's at `step`, W&B's
        all of them."""
        run_dir = Path(run_dir)
        board = [_TensorBoard(run_dir, step)] if cfg.tensorboard else []
        wandb = [_WandB(run_dir, cfg, step)] if cfg.wandb is not None else []
        tracker = cls(board + wandb, cfg.fewshot_seeds)
        if board and step > 0:
            tracker.replay(board, [row for name in (METRICS_FILE, TRANSFER_FILE)
                                   for row in rows_at_step(run_dir / name, step)])
        if wandb and step > 0:
            rows = [*read_metrics(run_dir), *read_transfer(run_dir)]
            tracker.replay(wandb, sorted((r for r in rows if r["step"] <= step),
                                         key=lambda r: r["step"]))  # W&B: steps in order
        return tracker

    def replay(self, sinks: list, rows: list[dict]) -> None:
        """Log `rows` (kept from earlier processes) to `sinks` only."""
        every, self.sinks = self.sinks, sinks
        try:
            for row in rows:
                self.log(row)
        finally:
            self.sinks = every

    def log(self, row: dict) -> None:
        """A metrics or transfer row, by its kind."""
        {"train": self.log_train, "eval": self.log_eval,
         "fewshot": self.log_fewshot}[row["kind"]](row)

    def log_train(self, row: dict) -> None:
        self._send("train", TRAIN_TAGS, row)

    def log_eval(self, row: dict) -> None:
        self._send("eval", EVAL_TAGS, row)

    def log_fewshot(self, row: dict) -> None:
        """One draw of a k-shot probe; the mean is logged once every draw of it is in."""
        key = (row["dataset"], row["shots"], row["step"])
        draws = self._draws.setdefault(key, [])
        draws.append(row["top1"])
        if len(draws) >= self.fewshot_seeds:
            self._fewshot_mean(key)

    def _fewshot_mean(self, key: tuple) -> None:
        dataset, shots, step = key
        draws = [v for v in self._draws.pop(key) if v is not None]
        if draws:
            for sink in self.sinks:
                sink.scalars({f"fewshot/{dataset}/{shots}shot": sum(draws) / len(draws)}, step)

    def _send(self, prefix: str, tags: tuple[str, ...], row: dict) -> None:
        values = {f"{prefix}/{t}": float(row[t]) for t in tags if row.get(t) is not None}
        for sink in self.sinks:
            sink.scalars(values, row["step"])

    def close(self) -> None:
        """Log what is pending (a probe cut short) and close every sink."""
        for key in list(self._draws):
            self._fewshot_mean(key)
        for sink in self.sinks:
            sink.close()


# -- what checkpoints cost -----------------------------------------------------------------------

@dataclasses.dataclass
class CheckpointCost:
    """Saves done and their seconds, carried over restarts in the checkpoints' client state."""

    count: int = 0
    total_s: float = 0.0
    max_s: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total_s += seconds
        self.max_s = max(self.max_s, seconds)

    def state(self) -> dict:
        """For the client state of the save now starting (its own time is not known yet)."""
        return {**dataclasses.asdict(self), "started": time.time()}

    @classmethod
    def restore(cls, state: dict | None, marker: Path) -> CheckpointCost:
        """The cost as of the checkpoint whose COMPLETE marker is `marker`, its own save
        included (timed by the marker); a checkpoint of before these fields counts from 0."""
        if not state:
            return cls()
        cost = cls(state["count"], state["total_s"], state["max_s"])
        try:
            cost.add(max(0.0, marker.stat().st_mtime - state["started"]))
        except OSError:
            pass
        return cost

    def final(self, last_complete: Path | None) -> dict:
        """final.json's checkpoint fields; `last_complete`: the newest complete checkpoint's
        folder (None: there is none)."""
        return {"checkpoints": self.count, "checkpoint_s_sum": self.total_s,
                "checkpoint_s_max": self.max_s,
                "checkpoint_bytes": None if last_complete is None else dir_bytes(last_complete)}


def dir_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (0 when it is gone)."""
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(parent, name)).st_size
            except OSError:
                pass
    return total

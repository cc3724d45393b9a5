"""Transfer metrics: few-shot and fine-tune accuracy rows of RUN_DIR/transfer.jsonl as eval
points against pre-training compute, so that they go through the frontier, the fit, the IsoFLOP
profiles and the summaries exactly as the upstream error does.

Owns the metric names (`error`, `top1`, `loss`, `fewshot:NAME:K`, `finetune:NAME[:RECIPE]`),
the upstream loss as a metric (loss_evals), the lenient reading of transfer rows and a point's
interval (Wilson 1927 on the test set, t over the probe draws). Details: analysis/README.md
("Transfer metrics", "Measurement noise and seeds").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis.fit.noise import LEVEL, SD_COLUMN
from analysis.load.tables import EVAL_COLUMNS, STATUS_RUNNING
from scaling.results import TRANSFER_FILE, iter_run_dirs

UPSTREAM = ("error", "top1", "loss")
KINDS = ("fewshot", "finetune")
# Keys every row needs (shots and seed too for few-shot rows; a fine-tune row's seed defaults
# to 0 and its shots are not used).
_KEYS = ("kind", "dataset", "top1", "step", "images_seen", "flops_seen", "num_test")
ROW_COLUMNS = ("run", "kind", "dataset", "shots", "seed", "top1", "step", "images_seen",
               "flops_seen", "num_test", "ft_recipe")
NO_RECIPE = "none"  # a fine-tune row written before rows carried their recipe
# Columns of a transfer eval table beyond analysis.load.tables.EVAL_COLUMNS.
EXTRA_COLUMNS = ("probe_seeds", "probe_sd", "probe_half")


class MetricError(ValueError):
    """A --metric that names no rows (the message lists the metrics that have some)."""


@dataclass(frozen=True)
class Metric:
    """A parsed --metric: `kind` "upstream", "fewshot" or "finetune"."""

    text: str
    kind: str
    dataset: str | None = None
    shots: int | None = None
    recipe: str | None = None  # finetune:NAME:RECIPE

    @property
    def transfer(self) -> bool:
        return self.kind != "upstream"

    @property
    def slug(self) -> str:
        """The metric in figure file names: error, top1, fewshot-NAME-10shot, finetune-NAME."""
        if not self.transfer:
            return self.text
        tail = f"-{self.shots}shot" if self.kind == "fewshot" else ""
        tail += f"-{self.recipe}" if self.recipe else ""
        return f"{self.kind}-{self.dataset}{tail}"

    @property
    def label(self) -> str:
        """Axis text: "Top-1 error", "10-shot shapes error", "fine-tuned shapes error"."""
        if self.kind == "fewshot":
            return f"{self.shots}-shot {self.dataset} error"
        if self.kind == "finetune":
            recipe = f" (recipe {self.recipe})" if self.recipe else ""
            return f"Fine-tuned {self.dataset} error{recipe}"
        return {"error": "Top-1 error", "top1": "Top-1 accuracy",
                "loss": "Eval cross-entropy (nats)"}[self.text]


def parse_metric(text: str) -> Metric:
    """`text` as a Metric; ValueError (one line, naming the forms) when it has none of them."""
    forms = "error, top1, loss, fewshot:NAME:K or finetune:NAME[:RECIPE]"
    if text in UPSTREAM:
        return Metric(text, "upstream")
    parts = str(text).split(":")
    if parts[0] == "fewshot" and len(parts) == 3 and parts[1] and parts[2].isdigit() \
            and int(parts[2]) > 0:
        return Metric(text, "fewshot", parts[1], int(parts[2]))
    if parts[0] == "finetune" and len(parts) in (2, 3) and all(parts[1:]):
        return Metric(text, "finetune", parts[1], recipe=parts[2] if len(parts) == 3 else None)
    if parts[0] in KINDS:
        raise ValueError(f"--metric {text!r}: expected {forms} (K a positive whole number)")
    raise ValueError(f"--metric {text!r}: unknown kind {parts[0]!r}; expected {forms}")


def loss_evals(evals: pd.DataFrame) -> pd.DataFrame:
    """The eval table of --metric loss: `error` holds the eval cross-entropy and SD_COLUMN its
    per-image sd (eval rows' loss_sd; NaN in rows written before it existed: no interval), so the
    fits and intervals of analysis.fit.noise treat each point as a mean loss. Rows with a null
    loss are left out."""
    ev = evals[np.isfinite(evals["loss"].astype(float))]
    return ev.assign(error=ev["loss"].astype(float), **{SD_COLUMN: ev["loss_sd"].astype(float)})


def loss_spread_note(evals: pd.DataFrame) -> str | None:
    """The summary note for --metric loss points without a per-image loss sd (None if none)."""
    missing = int(evals[SD_COLUMN].isna().sum()) if SD_COLUMN in evals else 0
    if not missing:
        return None
    return (f"{missing} of {len(evals)} eval points have no per-image loss spread (loss_sd: "
            "written before eval rows carried it, docs/results.md); no interval for them")


def metric_names(rows: pd.DataFrame) -> list[str]:
    """The transfer metrics `rows` hold, e.g. ["fewshot:shapes:1", "fewshot:shapes:10"]."""
    if rows.empty:
        return []
    few = rows[rows["kind"] == "fewshot"][["dataset", "shots"]].drop_duplicates()
    names = [f"fewshot:{d}:{int(k)}" for d, k in sorted(few.itertuples(index=False, name=None))]
    tuned = rows[rows["kind"] == "finetune"]
    for name in sorted(set(tuned["dataset"])):
        recipes = _recipes(tuned[tuned["dataset"] == name])
        names += ([f"finetune:{name}"] if len(recipes) == 1 else
                  [f"finetune:{name}:{r}" for r in recipes])
    return names


def _recipes(rows: pd.DataFrame) -> list[str]:
    """The fine-tune recipes of `rows` (NO_RECIPE for rows that do not say theirs)."""
    return sorted(set(rows["ft_recipe"].fillna(NO_RECIPE)))


def select(rows: pd.DataFrame, metric: Metric) -> pd.DataFrame:
    """The rows of a transfer metric (none: an empty frame)."""
    keep = (rows["kind"] == metric.kind) & (rows["dataset"] == metric.dataset)
    if metric.kind == "fewshot":
        keep &= rows["shots"] == metric.shots
    if metric.recipe:
        keep &= rows["ft_recipe"].fillna(NO_RECIPE) == metric.recipe
    return rows[keep]


def check_metric(metric: Metric, rows: pd.DataFrame, where) -> None:
    """MetricError, one line listing what is available, when a transfer metric has no rows."""
    chosen = select(rows, metric) if metric.transfer else rows
    if metric.kind == "finetune" and not metric.recipe and len(_recipes(chosen)) > 1:
        raise MetricError(f"--metric {metric.text}: the runs were fine-tuned on "
                          f"{metric.dataset!r} with {len(_recipes(chosen))} recipes; name one: "
                          + ", ".join(f"{metric.text}:{r}" for r in _recipes(chosen)))
    if not metric.transfer or len(chosen):
        return
    have = metric_names(rows)
    if not have:
        raise MetricError(f"--metric {metric.text}: no {TRANSFER_FILE} rows under {where}; "
                          f"available: {', '.join(UPSTREAM)}")
    of_kind = rows[rows["kind"] == metric.kind]
    what = ("dataset " + repr(metric.dataset) if metric.dataset not in set(of_kind["dataset"])
            else f"{metric.shots}-shot rows of {metric.dataset!r}")
    raise MetricError(f"--metric {metric.text}: no {metric.kind} {what} under {where}; "
                      f"available: {', '.join(list(UPSTREAM) + have)}")


# -- reading ---------------------------------------------------------------------------------------

def _whole(v, minimum: int) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and v == int(v) and v >= minimum)


def row_problem(row) -> str | None:
    """Why a parsed transfer line cannot be used (None when it can)."""
    if not isinstance(row, dict):
        return f"transfer row is a JSON {type(row).__name__}, not an object"
    if row.get("kind") not in KINDS:
        return f"transfer row has kind={row.get('kind')!r}; expected one of {KINDS}"
    need = _KEYS + (("shots", "seed") if row["kind"] == "fewshot" else ())
    missing = [k for k in need if k not in row]
    if missing:
        return f"transfer row is missing {missing}"
    top1 = row["top1"]
    if not isinstance(top1, (int, float)) or isinstance(top1, bool) or not 0 <= top1 <= 1:
        return f"top1={top1!r} is not a fraction in [0, 1]"
    if row["kind"] == "finetune" and row.get("shots") is not None:
        return f"shots={row['shots']!r} in a finetune row (a fine-tune uses no k-shot set: null)"
    shots = (("shots", 1),) if row["kind"] == "fewshot" else ()
    for key, low in (("num_test", 1), ("step", 0), *shots, ("seed", 0)):
        if key in row and not _whole(row[key], low):
            return f"{key}={row[key]!r} is not a whole number >= {low}"
    if not isinstance(row["dataset"], str) or not row["dataset"]:
        return f"dataset={row['dataset']!r} is not a name"
    return None


def _key(row: dict) -> tuple:
    return (row["kind"], row["dataset"], row.get("shots"), row.get("seed", 0), row["step"],
            row.get("recipe"))


def _file_rows(path: Path, skip) -> list[dict]:
    """The usable rows of one transfer.jsonl; `skip(reason, line)` reports each left out."""
    seen: dict[tuple, tuple[int, dict]] = {}
    bad: set[tuple] = set()
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            skip(f"not JSON ({e})", i)
            continue
        problem = row_problem(row)
        if problem:
            skip(problem, i)
            continue
        key = _key(row)
        if key in seen and seen[key][1] == row:
            skip(f"exact copy of line {seen[key][0]} (kept once)", i)
        elif key in seen:
            first = seen[key][0]
            text = f"{key} logged with different values (lines {first}, {i}): none is kept"
            if key not in bad:  # the first of them is left out too, and said once
                skip(text, first)
            bad.add(key)
            skip(text, i)
        else:
            seen[key] = (i, row)
    return [r for k, (_, r) in seen.items() if k not in bad]


def read_rows(results_dir, skip=None) -> pd.DataFrame:
    """Every usable transfer row under `results_dir`, one row each (ROW_COLUMNS; `run` is
    sweep/run_id); `skip(path, reason, line)` is told of every line left out."""
    root, out = Path(results_dir), []
    for run_dir in iter_run_dirs(root):
        path = run_dir / TRANSFER_FILE
        if not path.is_file():
            continue
        run = f"{run_dir.parent.name}/{run_dir.name}"
        rows = _file_rows(path, lambda reason, line, p=path: skip and skip(p, reason, line))
        out += [{**{k: r.get(k) for k in ROW_COLUMNS}, "run": run,
                 "seed": r.get("seed", 0), "shots": r.get("shots"),
                 "ft_recipe": r.get("recipe") if r["kind"] == "finetune" else None}
                for r in rows]
    frame = pd.DataFrame(out, columns=list(ROW_COLUMNS))
    for col in ("top1", "step", "images_seen", "flops_seen", "num_test", "shots", "seed"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame


# -- the eval table of a transfer metric ----------------------------------------------------------

def probe_points(rows: pd.DataFrame, level: float = LEVEL) -> pd.DataFrame:
    """One row per (run, step): mean top-1 over probe seeds, their count and sd, the t
    half-width of the mean (NaN for one seed), the fewest test images."""
    g = rows.groupby(["run", "step"], sort=True)
    pts = g.agg(top1=("top1", "mean"), probe_seeds=("top1", "size"), probe_sd=("top1", "std"),
                num_samples=("num_test", "min"), images_seen=("images_seen", "first"),
                flops_seen=("flops_seen", "first")).reset_index()
    k = pts["probe_seeds"].to_numpy()
    t = stats.t.ppf(0.5 + level / 2, np.maximum(k - 1, 1))
    pts["probe_half"] = np.where(k >= 2, t * pts["probe_sd"] / np.sqrt(k), np.nan)
    return pts


_FROM_RUN = ("sweep", "run_id", "model", "size", "patch", "status", "seed", "lr", "batch_size",
             "budget", "recipe", "params", "macs_per_image")
_FROM_EVAL = ("epoch", "wall_s", "device_hours")


def transfer_evals(res, rows: pd.DataFrame, metric: Metric) -> pd.DataFrame:
    """The eval table (EVAL_COLUMNS + EXTRA_COLUMNS) of a transfer metric: one row per
    (run, step) of the runs in `res.runs`, with the run's columns, the upstream eval's epoch,
    wall time and device hours at that step, and `is_final` at the step of the run's final
    upstream eval (the last probed step of a finished run without upstream evals)."""
    pts = probe_points(select(rows, metric))
    # a branch's rows up to its branch_step are copies of its trunk's (analysis.load.runs)
    start = pts["run"].map(res.branches).astype(float).fillna(-1.0)
    pts = pts[pts["step"] > start]
    pts = pts.merge(res.runs[["run", *_FROM_RUN]], on="run", how="inner")
    up = res.evals[["run", "step", *_FROM_EVAL, "is_final"]].rename(
        columns={"is_final": "_final"})
    pts = pts.merge(up, on=["run", "step"], how="left")
    last = pts.groupby("run")["step"].transform("max") == pts["step"]
    has_final = pts.groupby("run")["_final"].transform(lambda s: s.fillna(False).any())
    done = (pts["status"] != STATUS_RUNNING) & ~pts["run"].isin(res.trunks)  # no trunk final
    pts["is_final"] = (pts["_final"].fillna(False).astype(bool)
                       | (last & ~has_final.astype(bool) & done))
    pts["error"] = 1.0 - pts["top1"]
    pts["top5"] = np.nan
    pts["loss"] = np.nan
    pts = pts.sort_values(["run", "step"], kind="stable").reset_index(drop=True)
    return pts.reindex(columns=list(EVAL_COLUMNS) + list(EXTRA_COLUMNS))

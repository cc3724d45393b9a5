"""What a local sweep shows while it runs: a line per finished run, an ETA, a closing summary.

Each finished run prints `[k/N] RUN_ID (SIZE, BUDGET): done, top-1 ..., sweep ETA ...`; on a
terminal a tqdm bar shows progress between those lines, elsewhere only the lines. How the ETA
is computed: docs/sweeps.md ("Progress and status").
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

from launchers.grid import RunSpec, budget_token
from scaling.results import (
    EXIT_DIVERGED,
    EXIT_OK,
    EXIT_PREEMPTED,
    INPUT_BOUND,
    SchemaError,
    read_final,
)

PLOT = "python analysis/plot_scaling.py"
# tqdm's own rate and ETA would weigh every FLOP alike: the postfix shows ours
BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} FLOP [{elapsed}{postfix}]"


def fit_cost(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(a, b) >= 0 of wall = a + b x compute, least squares over (compute, wall) points; one
    point (or one compute value) gives b = wall / compute."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if n < 2 or sxx <= 0:
        return (0.0, my / mx) if mx > 0 else (my, 0.0)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    if b < 0:
        return my, 0.0
    a = my - b * mx
    if a < 0:
        return 0.0, sum(x * y for x, y in points) / sum(x * x for x, _ in points)
    return a, b


def duration(seconds: float) -> str:
    """12.3 s, 4 min 05 s, 2 h 03 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def last_step(run_dir: Path) -> int:
    """The step of the last complete row of RUN_DIR/metrics.jsonl (0 without one); reads only
    the file's tail, so polling a long run stays cheap."""
    try:
        with open(Path(run_dir) / "metrics.jsonl", "rb") as f:
            start = max(0, f.seek(0, os.SEEK_END) - 4096)
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines[1:] if start else lines):  # the first may be cut
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class SweepProgress:
    """[k/N] lines, the sweep's ETA, a tqdm bar on a terminal, and the closing summary."""

    def __init__(self, specs: list[RunSpec], parallel: int = 1, stream=None,
                 every_s: float = 1.0):
        self.stream = sys.stdout if stream is None else stream
        self.specs = list(specs)
        self.t0 = time.monotonic()
        self.every_s, self._ticked = every_s, 0.0
        self.begun: dict[str, float] = {}
        self.results: list[tuple[RunSpec, int, float]] = []  # (run, exit code, wall s)
        self.finals: dict[str, dict | None] = {}
        self.parallel = max(1, parallel)
        self.start_frac = {s.run_id: self._frac(s) for s in self.specs}  # resumed runs
        self.bar = None
        if isatty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=sum(s.train_flops for s in self.specs) or None, unit="FLOP",
                            unit_scale=True, file=self.stream, leave=False, desc="sweep",
                            dynamic_ncols=True, bar_format=BAR)

    def write(self, line: str) -> None:
        """A line of the sweep's output (above the bar, on a terminal)."""
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def _frac(self, spec: RunSpec) -> float:
        """The fraction of a run's steps done, from its metrics."""
        return min(1.0, last_step(spec.run_dir) / max(1, spec.total_steps))

    def _fractions(self) -> dict[str, float]:
        ended = {s.run_id: 1.0 for s, rc, _ in self.results if rc in (EXIT_OK, EXIT_DIVERGED)}
        return {s.run_id: ended.get(s.run_id) or self._frac(s) for s in self.specs}

    def final(self, spec: RunSpec) -> dict | None:
        """The run's final.json, None when it has none (or a broken one)."""
        try:
            return read_final(spec.run_dir)
        except (OSError, SchemaError):
            return None

    def eta(self) -> float | None:
        """Seconds until the sweep ends; None before a run finished. Each run left is
        predicted to take a + b x its compute (fitted to the finished runs' wall times, which
        include start-up, evals and sharing the cores), less what it has run; the sum is split
        over the parallel slots, and is never less than the longest run left."""
        walls = [(s.train_flops, w) for s, rc, w in self.results if rc in
                 (EXIT_OK, EXIT_DIVERGED)]
        if not walls:
            return None
        a, b = fit_cost(walls)
        now, finished = time.monotonic(), {s.run_id for s, _, _ in self.results}
        left = [max(0.0, a + b * s.train_flops * (1 - self.start_frac[s.run_id])
                    - (now - self.begun[s.run_id] if s.run_id in self.begun else 0.0))
                for s in self.specs if s.run_id not in finished]
        if not left:
            return None
        return max(max(left), sum(left) / min(self.parallel, len(left)))

    def started(self, spec: RunSpec) -> None:
        """Note a run's start (its wall time and the ETA count from there)."""
        self.begun[spec.run_id] = time.monotonic()

    def finished(self, spec: RunSpec, rc: int) -> None:
        """Print the run's [k/N] line: its state, top-1 and wall time, and the sweep's ETA."""
        final, wall = self.final(spec), time.monotonic() - self.begun.get(spec.run_id, self.t0)
        self.results.append((spec, rc, wall))
        self.finals[spec.run_id] = final
        state = {EXIT_OK: "done", EXIT_DIVERGED: "diverged",
                 EXIT_PREEMPTED: "stopped (rerun to resume)"}.get(rc, f"failed (exit {rc})")
        top1 = (final or {}).get("final_top1")
        line = (f"[{len(self.results)}/{len(self.specs)}] {spec.run_id} ({spec.model}, "
                f"{budget_token(spec.budget, spec.budget_kind)}): {state}"
                + (f", top-1 {top1:.4f}" if top1 is not None else "") + f", {duration(wall)}")
        eta = self.eta()
        rough = len({s.train_flops for s, rc, _ in self.results if rc in (EXIT_OK,
                                                                            EXIT_DIVERGED)}) < 2
        self.write(line + (f"; sweep ETA {duration(eta)}" + (" (rough: from one run)" if rough
                                                             else "") if eta is not None else ""))
        self.tick(force=True)

    def tick(self, force: bool = False) -> None:
        """Move the terminal bar to the compute done (at most once per `every_s`)."""
        now = time.monotonic()
        if self.bar is None or (not force and now - self._ticked < self.every_s):
            return
        self._ticked = now
        frac = self._fractions()
        self.bar.n = sum(frac[s.run_id] * s.train_flops for s in self.specs)
        eta = self.eta()
        self.bar.set_postfix_str(f"{len(self.results)}/{len(self.specs)} runs" + (
            f", ETA {duration(eta)}" if eta is not None else ""), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self, results_root: Path) -> str:
        """The closing lines: counts per state, the best run, the input-bound runs, and the
        command to run next."""
        counts: dict[str, int] = {}
        for spec, rc, _ in self.results:
            final = self.finals.get(spec.run_id)
            state = (final or {}).get("status") or ("stopped" if rc == EXIT_PREEMPTED
                                                    else "failed")
            state = {"ok": "done"}.get(state, state)
            counts[state] = counts.get(state, 0) + 1
        lines = [f"sweep: {len(self.results)} run(s) in {duration(time.monotonic() - self.t0)}: "
                 + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
        scored = [(f["final_top1"], s) for s, _, _ in self.results  # only a finished run
                  if (f := self.finals.get(s.run_id)) and f.get("status") == "ok"
                  and f.get("final_top1") is not None]
        if scored:
            top1, spec = max(scored, key=lambda t: t[0])
            lines.append(f"best top-1 {top1:.4f}: {spec.model} at "
                         f"{budget_token(spec.budget, spec.budget_kind)} ({spec.run_id})")
        bound = self._input_bound()
        if bound:
            lines.append(bound)
        if counts.get("done"):
            lines.append(f"next: {PLOT} --results {shlex.quote(shown_path(results_root))}"
                         + self._only_these(results_root))
        return "\n".join(lines)

    def _input_bound(self) -> str | None:
        """One line naming the runs whose loader set their speed (final.json
        data_wait_fraction above INPUT_BOUND), most input-bound first; None when there are none."""
        bound = sorted(((f["data_wait_fraction"], s.run_id) for s, _, _ in self.results
                        if (f := self.finals.get(s.run_id))
                        and (f.get("data_wait_fraction") or 0) > INPUT_BOUND), reverse=True)
        if not bound:
            return None
        return (f"input-bound (waited for data over {INPUT_BOUND:.0%} of their loop time, so "
                "their speed is the loader's; raise --set num_workers=N, --set in_memory=on or "
                "--set decode_on=device): " + ", ".join(f"{r} {w:.1%}" for w, r in bound))

    def _only_these(self, results_root: Path) -> str:
        """' --sweep NAME' when RESULTS also holds runs of other sweeps (say the demo's digits
        beside demo-full's shapes), which the plot would otherwise put on the same curves."""
        mine = sorted({spec.run_dir.parent.name for spec, _, _ in self.results})
        try:
            others = [d for d in Path(results_root).iterdir() if d.is_dir()
                      and d.name not in mine and any(d.glob("*/config.json"))]
        except OSError:
            return ""
        return f" --sweep {shlex.quote(','.join(mine))}" if others else ""


def drop_stdout() -> None:
    """Point stdout at /dev/null once its reader has gone (`sweep.py ... | head` exited), so
    that later prints and the flush at exit raise no BrokenPipeError."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's capture): nothing to do
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def shown_path(path: Path) -> str:
    """`path` relative to the working directory when it lies below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)

"""Where a run's time goes: seconds in training steps (CUDA events on a GPU), the parts
outside them (final.json's overhead_breakdown_s), the share spent waiting for input
(data_wait_fraction), compile seconds, and peak memory; carried across restarts."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import torch

from scaling.flops import mfu, peak_tflops


class StepClock:
    """Seconds in training steps. On a GPU a pair of CUDA events per step, read back only by
    `drain` (at log steps, saves and the end, where the loop reads the device anyway), so the
    timing adds no host-device sync per step; on a CPU the wall clock around the step."""

    def __init__(self, device: torch.device | None = None):
        self.cuda = device is not None and device.type == "cuda"
        self._start, self._pending = None, []

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> float:
        """The step's seconds on a CPU; 0 on a GPU, where they come with the next drain."""
        if not self.cuda:
            return time.perf_counter() - self._start
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((self._start, end))
        return 0.0

    def drain(self) -> float:
        """GPU seconds of the steps stopped since the last drain (waits for the last one)."""
        if not self._pending:
            return 0.0
        self._pending[-1][1].synchronize()
        seconds = sum(a.elapsed_time(b) for a, b in self._pending) / 1e3
        self._pending.clear()
        return seconds


def wait_fraction(data_wait: float, steps: float) -> float:
    """data_wait_fraction (scaling.results): the share of (seconds waiting for the next batch
    + seconds in training steps) spent waiting; 0 before any of either."""
    total = data_wait + steps
    return data_wait / total if total > 0 else 0.0


class Meter:
    """Wall time, time in training steps, where the rest went, and skipped samples; carried
    across restarts (a resumed run adds each process's time from its own start)."""

    # Wall time outside training steps, by part (final.json's overhead_breakdown_s):
    PARTS = (
        "startup",     # process start to build: interpreter, imports, config and data checks
        "build",       # process group, model, DeepSpeed engine, loaders, resuming
        "data_wait",   # waiting for the next batch
        "eval",        # evaluations
        "checkpoint",  # checkpoint saves
        "export",      # the safetensors export
        "fewshot",     # few-shot linear probes at eval points (--fewshot, scaling.fewshot)
        "compile",     # torch.compile (--compile), taken out of the steps and evals it ran in
    )

    def __init__(self):
        self._t0 = process_start_time()  # interpreter start and imports count as overhead
        self._wall_before = 0.0  # wall seconds of earlier processes, up to their checkpoint
        self.compute_s = 0.0
        self.parts = dict.fromkeys(self.PARTS, 0.0)
        # compiling DeepSpeed's CPU comm op on its first multi-rank use on a machine (the
        # longest build of any rank: scaling.engine.init_distributed): inside "build", but a
        # cost of the machine, so left out of device_hours
        self.op_build_s = 0.0
        self._compile_clock = None  # --compile: compile_seconds (use_compile)
        self._compile_seen = 0.0  # of its reading, the seconds already in parts["compile"]
        self._compile_owed = 0.0  # compile seconds inside steps not yet off compute_s (a GPU's)
        self.skipped = 0  # this rank, cumulative
        self.window_step, self._window_t0 = 0, time.perf_counter()
        self._window_base = (0.0, 0.0)  # (data_wait, compute_s) when the window opened
        self.clock = StepClock()

    def use_device(self, device: torch.device) -> None:
        """Time the steps on `device`: CUDA events on a GPU (StepClock)."""
        self.clock = StepClock(device)

    def use_compile(self) -> None:
        """Count torch.compile's seconds (compile_seconds) as the part "compile", out of the
        step or evaluation that paid them: not training time, nor in device_hours
        (not_charged_s)."""
        self._compile_clock = compile_seconds

    def _compiled(self) -> float:
        """Seconds torch.compile spent since the last call, moved into parts["compile"]."""
        if self._compile_clock is None:
            return 0.0
        total = self._compile_clock()
        seconds = total - self._compile_seen if total >= self._compile_seen else total  # reset
        self._compile_seen = total
        self.parts["compile"] += seconds
        return seconds

    def not_charged_s(self) -> float:
        """Seconds of wall time left out of device_hours (scaling.segments): op_build_s and
        the compile part."""
        return self.op_build_s + self.parts["compile"]

    def wall(self) -> float:
        return self._wall_before + time.time() - self._t0

    def process_s(self) -> float:
        """Seconds since this process started."""
        return time.time() - self._t0

    def start_step(self) -> None:
        self.clock.start()

    def end_step(self, skipped: int) -> None:
        """A training step ended; `skipped`: corrupt samples its batch skipped on this rank."""
        compiled = self._compiled()
        self._compile_owed += compiled
        self._window_t0 += compiled  # not training throughput
        self._charge(self.clock.stop())
        if not self.clock.cuda:  # timed already: compile seconds beyond the step's were outside
            self._compile_owed = 0.0
        self.skipped += skipped

    def flush(self) -> None:
        """Add the GPU time of the steps timed since the last flush (a sync on a GPU)."""
        self._charge(self.clock.drain())

    def _charge(self, seconds: float) -> None:
        """Add step seconds to compute_s, less the compile seconds spent inside the steps."""
        taken = min(seconds, self._compile_owed)
        self._compile_owed -= taken
        self.compute_s += seconds - taken

    def add(self, part: str, seconds: float) -> None:
        """Count `seconds` outside training steps as `part` (one of PARTS), less the compile
        seconds spent in them (an evaluation's first forward compiles its own graphs)."""
        compiled = min(seconds, self._compiled())
        self.parts[part] += seconds - compiled
        if part in ("eval", "checkpoint", "export", "fewshot"):
            self._window_t0 += seconds  # not training throughput
        else:
            self._window_t0 += compiled

    def start_window(self, step: int) -> None:
        self.flush()
        self.window_step, self._window_t0 = step, time.perf_counter()
        self._window_base = (self.parts["data_wait"], self.compute_s)

    def window_wait_fraction(self) -> float:
        """This rank's data_wait_fraction over the open window (a sync on a GPU: the window's
        step times are read back first)."""
        self.flush()
        wait0, steps0 = self._window_base
        return wait_fraction(self.parts["data_wait"] - wait0, self.compute_s - steps0)

    def run_wait_fraction(self) -> float:
        """This rank's data_wait_fraction over the whole run (earlier processes included)."""
        self.flush()
        return wait_fraction(self.parts["data_wait"], self.compute_s)

    def end_window(self, step: int) -> float:
        """Seconds since the window started (eval/checkpoint time excluded); opens the next."""
        self.flush()  # a train row: the loop has just read the device anyway
        now = time.perf_counter()
        seconds, self.window_step, self._window_t0 = now - self._window_t0, step, now
        self._window_base = (self.parts["data_wait"], self.compute_s)
        return seconds

    skipped_global = 0  # over all ranks, as of the last train row

    def overhead_fraction(self, wall: float) -> float:
        """Share of `wall` (a reading of wall()) outside training steps (start-up, data
        stalls, eval, saves)."""
        self.flush()
        return max(0.0, 1.0 - self.compute_s / wall) if wall > 0 else 0.0

    def breakdown(self, wall: float) -> dict[str, float]:
        """Seconds of wall time by part: PARTS, "steps", and "other" (logging, the loop's
        all-reduces, anything unmeasured); the values sum to `wall` (a reading of wall()). On a
        GPU "steps" is the GPU's time in them (CUDA events), which can overlap the host's
        data_wait, so "other" can then be slightly negative."""
        self.flush()
        parts = {**self.parts, "steps": self.compute_s}
        parts["other"] = wall - sum(parts.values())
        return parts

    def mfu(self, tflops: float, given_peak: float | None) -> float | None:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        return mfu(tflops * 1e12, given_peak or peak_tflops(name))

    def state(self) -> dict:
        self.flush()
        return {"wall": self.wall(), "compute": self.compute_s, "skipped": self.skipped,
                "parts": dict(self.parts), "op_build": self.op_build_s}

    def restore(self, state: dict, *, skipped: int) -> None:
        """Carry on from a checkpoint's state: this process's time so far (its start-up and
        build) is added to the saved wall time; the saved run's time after it is lost."""
        self._wall_before = state["wall"]
        self.compute_s, self.skipped = state["compute"], skipped
        for part, seconds in state.get("parts", {}).items():
            self.parts[part] += seconds
        self.op_build_s += state.get("op_build", 0.0)


def compile_seconds() -> float:
    """Wall seconds this process has spent in torch.compile so far.

    torch.compile works lazily: the forward graph at the first call (and again for eval mode,
    no_grad, or a new batch shape), the backward graph at the first backward. Timing the first
    step would charge its compute and DeepSpeed's work to the compiler; instead this reads
    dynamo's own clock, torch._dynamo.utils.calculate_time_spent()["total_wall_time"]: the
    wall time inside every frame compile ("entire_frame_compile": tracing, AOT autograd and
    the inductor backend with its C++/Triton builds) and every lazy backward compile
    ("entire_backward_compile"), summed over the process; a guard check or a cache lookup at
    run time is not in it, and torch._dynamo.reset() sets it back to 0 (Meter allows that).
    """
    from torch._dynamo.utils import calculate_time_spent  # imported by --compile runs only

    return calculate_time_spent().get("total_wall_time", 0.0)


def process_start_time() -> float:
    """Wall-clock time at which this process started (Linux /proc), else now."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        hz = os.sysconf("SC_CLK_TCK")
        return time.time() - (uptime - ticks / hz)
    except (OSError, ValueError, IndexError):
        return time.time()


def memory_gb() -> float:
    """Peak memory of this process: CUDA max allocated, or CPU max resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux

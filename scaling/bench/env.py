"""Where a benchmark ran and what it held: device name, software versions, peak memory, output.

Peak memory of one model measured after another in one process: CUDA's allocator counts live
tensors only, while a CPU's resident set size is a process-wide high-water mark, so the CPU
figure is allocator-level like CUDA's (`cpu_step_peak_bytes`) and `PeakMemory` also gives the
RSS view. Why, and how each is taken: docs/benchmarks.md ("1. Throughput", `mem_gb`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import resource
import subprocess
import time
from pathlib import Path

import torch

DEFAULT_OUT = "results/bench/local/bench.jsonl"  # git-ignored: never a tracked file


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match[1].strip() if match else platform.processor() or "unknown CPU"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The repository's HEAD commit (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False,
                             capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def versions() -> dict:
    """Software versions that change benchmark figures."""
    return {
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()
        if torch.cuda.is_available() else None,
        "deepspeed": _version("deepspeed"), "transformers": _version("transformers"),
        "vit_scaling": git_commit(),
    }


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match[1]) if match else None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory a block of code adds to this process, in GB (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device, self.gb, self.method = device, None, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda_max_allocated_increase"
        elif _reset_peak_rss() and _status_kib("VmRSS") is not None:
            self._base = _status_kib("VmRSS") * 1024
            self.method = "cpu_peak_rss_increase"
        else:  # no /proc: the high-water mark's increase, 0 if an earlier peak was higher
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "cpu_maxrss_increase"
        return self

    def __exit__(self, *exc) -> None:
        if self.method == "cuda_max_allocated_increase":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "cpu_peak_rss_increase":
            peak = _status_kib("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.gb = max(0, peak - self._base) / 1e9


def cpu_step_peak_bytes(step) -> int | None:
    """Peak bytes that one call of `step` allocates on the CPU above what it started with.

    From the torch profiler's allocation events ([memory] rows: +bytes on allocation, -bytes on
    free), summed in time order: the CPU twin of CUDA's max_memory_allocated, free of the
    allocator caching and high-water effects of RSS. None if this torch has no such events.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    events = sorted((e.start_ns(), e.nbytes()) for e in results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def check_out(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Raise ValueError, one line naming `flag`, unless rows can be appended to `path`: not a
    directory, under a folder that exists or can be made, where a file can be written. Checked
    by writing (a probe file, or opening an existing file for appending), since permission bits
    say nothing to root or on a read-only mount; whatever the check creates, it removes."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give the JSON-lines file to append to")
    if path.exists():
        try:
            with open(path, "a"):
                pass
        except OSError as e:
            raise ValueError(f"{flag} {path} cannot be appended to ({e.strerror})") from None
        return path
    missing, folder = [], path.parent
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path} cannot be created: {folder} is not a directory")
    probe = path.with_name(f".{path.name}.probe{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
    except OSError as e:
        raise ValueError(f"{flag} {path} cannot be written ({e.strerror})") from None
    finally:
        for leftover in (probe, *missing):  # the probe, then the folders made, deepest first
            try:
                if leftover.is_dir():
                    leftover.rmdir()
                else:
                    leftover.unlink(missing_ok=True)
            except OSError:
                pass  # another rank removed it, or it is in use: harmless
    return path


def append_rows(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Append rows as JSON lines (one object per line); creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(row, sort_keys=False) + "\n" for row in rows)
    return path


def now() -> str:
    """Local time with UTC offset, ISO 8601, for the `time` field of a row."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")

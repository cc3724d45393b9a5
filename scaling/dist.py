"""Where this process sits in the job: rank, world size, local rank, master; process groups.

Reads the variables of every launcher we support, so that the same command works under
`torchrun`, the `deepspeed` launcher (both set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*), plain
`srun` / submitit (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_JOB_NODELIST), and as a single
process with no launcher at all. The idea follows open_clip's world_info_from_env.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single": where the variables came from (logged)
    node_rank: int = 0  # which node of the job (SLURM_NODEID, torchrun's GROUP_RANK)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[003-005,9],cpu1" -> "gpu003"."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not head:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = head[1], head[2]
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def master_host(nodelist: str) -> str:
    """The first host of a SLURM node list as SLURM expands it (`scontrol show hostnames`:
    every syntax SLURM knows), or first_host's parse where scontrol is absent or fails."""
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                               text=True, timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        hosts = []
    return hosts[0] if hosts else first_host(nodelist)


def _port_for_job(job_id: str) -> int:
    """A port derived from the job id, so concurrent jobs on one node do not collide."""
    return 20000 + int(hashlib.sha1(job_id.encode()).hexdigest(), 16) % 20000


def dist_info(env: dict | None = None) -> DistInfo:
    """Rank, world and master from the environment; torchrun's variables win over SLURM's."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                        env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)),
                        "torchrun", int(env.get("GROUP_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return _slurm_info(env)
    return DistInfo(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or free_port(),
                    "single")


def _slurm_info(env) -> DistInfo:
    """Rank, world, local and node rank from SLURM's task variables; the master is the first
    host of the step's nodes (every task computes the same one) and the port follows the job
    id, unless MASTER_ADDR / MASTER_PORT are set."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
    job = env.get("SLURM_JOB_ID", "0")
    return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                    int(env.get("SLURM_LOCALID", 0)),
                    env.get("MASTER_ADDR") or master_host(nodelist),
                    int(env.get("MASTER_PORT") or _port_for_job(job)), "slurm",
                    int(env.get("SLURM_NODEID", 0)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a single-node rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def backend() -> str:
    """NCCL on GPUs, gloo on CPUs."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for(dist_info: DistInfo) -> torch.device:
    """The device of this rank: its local GPU, or the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(dist_info.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def fused_adamw(device: torch.device) -> bool:
    """Whether torch has a fused (single-kernel) AdamW for this device type: CUDA, and the CPU
    since torch 2.4 (there it is ~4x faster than the foreach update)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch without the helper: CUDA only
        return device.type == "cuda"
    return device.type in _get_fused_kernels_supported_devices()


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def export_env(dist_info: DistInfo) -> None:
    """Publish the torchrun-style variables (LAUNCHER_VARS) that torch.distributed and
    DeepSpeed read."""
    os.environ.update(RANK=str(dist_info.rank), WORLD_SIZE=str(dist_info.world_size),
                      LOCAL_RANK=str(dist_info.local_rank), MASTER_ADDR=dist_info.master_addr,
                      MASTER_PORT=str(dist_info.master_port))


def fresh_env(**extra: str) -> dict:
    """This process's environment without LAUNCHER_VARS, plus `extra`: for launching a new,
    independent run (which must not join this process's group)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(extra)
    return env


def _group_size() -> int:
    """World size of the default process group; 1 without one (collectives are identities)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_world_size()
    return 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (identity without a process group)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _group_size() > 1:
        torch_dist.all_reduce(t)
    return t.tolist()


def all_reduce_sum_max(sums: list[float], maxes: list[float],
                       device: torch.device) -> tuple[list[float], list[float]]:
    """(sums over ranks, maxima over ranks) in one all-reduce, so one device sync: each rank
    writes `maxes` into its own slot of a zeroed block (world size x len(maxes)), the sum of
    which holds every rank's values exactly; the max is then taken over the slots."""
    world = _group_size()
    rank = torch_dist.get_rank() if world > 1 else 0
    slots = [0.0] * (world * len(maxes))
    slots[rank * len(maxes):(rank + 1) * len(maxes)] = maxes
    out = all_reduce_sum([*sums, *slots], device)
    per_rank = [out[len(sums) + r * len(maxes):][:len(maxes)] for r in range(world)]
    return out[:len(sums)], [max(col) for col in zip(*per_rank)]


def all_reduce_max(value: int, device: torch.device) -> int:
    """Max of an integer over all ranks (identity without a process group)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    if _group_size() > 1:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return int(t.item())


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def shutdown() -> None:
    """Tear the process group down in order before the interpreter exits (no-op without one)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()

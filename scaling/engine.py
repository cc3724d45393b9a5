"""The only module that imports DeepSpeed: ZeRO config, initialisation, checkpoints, export.

Checkpoints are made crash-safe by our own bookkeeping (a COMPLETE marker, then `latest`) and
continue on another world size through DeepSpeed's universal format: docs/failure-model.md,
"Checkpoints that survive a kill" and "Resuming on another world size".
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)
from safetensors.torch import save_file

from scaling import dist
from scaling.config import TrainConfig, lr_at
from scaling.model import Attention
from scaling.results import atomic_write_text

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
UNIVERSAL = "universal"  # TAG/universal: the checkpoint converted for another world size
_TAG = re.compile(r"^step(\d{8})$")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices only, not on norms, biases, pos embedding, class token."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def ds_config(cfg: TrainConfig, micro: int, accum: int) -> dict:
    """The DeepSpeed config dict for a run."""
    zero: dict[str, Any] = {"stage": cfg.zero}
    if cfg.zero == 3:
        # Gather a whole ViT block at once; our blocks are small next to these thresholds.
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=5e7)
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW / SGD: ZeRO handles them
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": 16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (pre-training), or SGD with momentum (--optimizer sgd: fine-tuning, ViT paper App.
    B.1.1), over param_groups; a client optimizer, which every ZeRO stage wraps."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    # DeepSpeed moves the model to the accelerator; the optimizer runs where it lands.
    fused = dist.fused_adamw(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=fused)


def initialize(model: torch.nn.Module, cfg: TrainConfig, *, micro: int, accum: int,
               total_steps: int):
    """Wrap the model in a DeepSpeed engine with the run's optimizer and LR schedule."""
    optimizer = make_optimizer(model, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(cfg, step, total_steps) / cfg.lr)
    # saved into every checkpoint; ds_to_universal refuses a checkpoint without it (#5405)
    setattr(model, UNIVERSAL_CHECKPOINT_INFO,
            {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
    if cfg.compile and cfg.zero == 3:
        _register_borrowed_params(model)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule,
        config=ds_config(cfg, micro, accum), dist_init_required=True)
    if cfg.compile:
        # engine.compile(), not torch.compile(model) before deepspeed.initialize: it compiles
        # the engine's module in place (nn.Module.compile; DeepSpeed #5581 removed the wrapper
        # it had), after ZeRO-3 has put its partitioning hooks on the submodules, so the state
        # dict keeps its names (no "_orig_mod." prefix: checkpoints, resume and the export are
        # those of an eager run) and DeepSpeed sees the module it built. torch.compile with
        # ZeRO 1-3 is DeepSpeed's own path since #4878; DeepCompile (#7154, a "compile" config
        # section) is a different, opt-in feature, not used here (ZeRO-3 lacks it on torch
        # >= 2.9, #7755). Lazy: the graphs are compiled at the first forward and backward.
        # fallback_random: dropout and stochastic depth draw from torch's generator as in eager
        # mode, not from inductor's own, so a compiled run gives the eager run's numbers (up to
        # float rounding) and --compile may change between a run and its resumption
        # (RESUMABLE_FIELDS); it costs little: drop_path draws one number per sample and block.
        from torch._inductor import config as inductor_config  # compiled runs only

        inductor_config.fallback_random = True
        engine.compile()
    return engine


def _register_borrowed_params(model: torch.nn.Module) -> None:
    """Tell ZeRO-3 that Attention reads its qkv projection's weights itself (the class token's
    query-only path, scaling.model.Attention), outside qkv's forward. Eager ZeRO-3 notices that
    on the first access (its parameter dict gathers the weight and registers it), but dynamo
    traces that access with the partitioned, empty weight and fails (size mismatch, vec (0));
    registered up front (deepspeed.zero.register_external_parameter, DeepSpeed's API for a
    parameter used outside its module), they are gathered before Attention's forward runs."""
    for module in model.modules():
        if isinstance(module, Attention):
            for param in module.qkv.parameters():
                deepspeed.zero.register_external_parameter(module, param)


SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's shared-memory all-reduce for CPU ranks


def init_distributed(info: dist.DistInfo) -> float:
    """Start the process group (gloo on CPU, NCCL on GPU) through DeepSpeed; returns the
    seconds this rank lost to compiling DeepSpeed's CPU shared-memory op (0 unless this was its
    first use on some rank's machine), which is a cost of the machine, not of the run.

    A rank with a warm extension cache waits in the rendezvous for a peer that compiles
    (measured: 99 s waited, 0.02 s counted), so each rank takes the longest build of any rank
    (an all-reduce), capped at its own seconds in here (it cannot have waited longer)."""
    dist.export_env(info)
    compile_s = 0.0
    t0 = time.perf_counter()
    if dist.backend() == "gloo":
        compile_s = _prepare_shm_op(info.world_size)
    deepspeed.init_distributed(dist_backend=dist.backend(), auto_mpi_discovery=False,
                               verbose=False)
    if dist.backend() == "gloo" and info.world_size > 1:
        longest = torch.tensor([compile_s], dtype=torch.float64)
        torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX)
        compile_s = min(longest.item(), time.perf_counter() - t0)
    return compile_s


def _prepare_shm_op(world_size: int) -> float:
    """DeepSpeed's CPU comm backend JIT-compiles a shared-memory all-reduce op with g++ on
    first use (~1 min, silently). A single rank has no peer to share memory with: skip it
    there. Several ranks compile it once per machine (torch's extension cache), visibly."""
    if world_size == 1:
        deepspeed.ops.__compatible_ops__[SHM_OP] = False  # build_shm_op then returns None
        return 0.0
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(SHM_OP, False):
        return 0.0
    if not _extension_built(SHM_OP):
        log.warning("compiling DeepSpeed's CPU shared-memory op with g++ (once per machine, "
                    "about a minute; not charged to the run's device-hours)")
    t0 = time.perf_counter()
    builder.load(verbose=False)
    return time.perf_counter() - t0


def _extension_built(name: str) -> bool:
    """Whether torch's JIT extension cache already holds a build of `name` (a guess for the
    message only: a private torch helper, so any doubt says no)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return any(Path(_get_build_directory(name, verbose=False)).glob("*.so"))
    except (ImportError, OSError, TypeError, RuntimeError):
        return False


def complete_checkpoints(root: str | os.PathLike) -> list[tuple[int, str]]:
    """(step, tag) of every checkpoint with a COMPLETE marker, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _TAG.match(d.name)
        if m and (d / COMPLETE).is_file():
            found.append((int(m[1]), d.name))
    return sorted(found)


def save_checkpoint(engine, root: str | os.PathLike, step: int, client_state: dict,
                    keep: int, crash: bool = False, pinned: frozenset[int] = frozenset()) -> str:
    """Save a complete checkpoint for `step` (all ranks call this); returns its tag. The
    newest `keep` ones are kept, and those of the steps in `pinned` (--ckpt-at) always.
    crash=True is fault injection for tests: SIGKILL before the checkpoint is complete."""
    root, tag = Path(root), f"step{step:08d}"
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    rank = engine.global_rank
    torch.save(_rng_state(), root / tag / f"rng_rank{rank:05d}.pt")
    if crash:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # every rank's shards and RNG state are on disk
    if rank == 0:
        marker = {"step": step, "world_size": dist_world(engine),
                  "zero": engine.zero_optimization_stage()}
        atomic_write_text(root / tag / COMPLETE, json.dumps(marker) + "\n")
        atomic_write_text(root / "latest", tag + "\n")
        for _, old in [c for c in complete_checkpoints(root) if c[0] not in pinned][:-keep]:
            shutil.rmtree(root / old, ignore_errors=True)
    dist.barrier()
    return tag


def remove_incomplete(root: str | os.PathLike) -> list[str]:
    """Delete checkpoint folders without a COMPLETE marker (a save killed midway)."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = [d.name for d in root.iterdir() if _TAG.match(d.name) and not (d / COMPLETE).exists()]
    for name in removed:
        shutil.rmtree(root / name, ignore_errors=True)
    return removed


class ResumeRefused(RuntimeError):
    """A checkpoint that cannot be loaded at this world size (one line; the run exits 2)."""


def dist_world(engine) -> int:
    """The number of data-parallel ranks of `engine` (this process group's world size)."""
    return int(engine.world_size)


def saved_world_size(root: str | os.PathLike, tag: str) -> int:
    """The world size a complete checkpoint was saved at: its COMPLETE marker's, or (a marker
    from before it recorded one) the number of per-rank RNG files."""
    folder = Path(root) / tag
    marker = json.loads((folder / COMPLETE).read_text() or "{}")
    if "world_size" in marker:
        return int(marker["world_size"])
    return len(list(folder.glob("rng_rank*.pt")))


def load_checkpoint(engine, root: str | os.PathLike, tag: str) -> dict:
    """Load a complete checkpoint into the engine and restore this rank's RNG; client state.

    Saved at another world size, a ZeRO 1-3 checkpoint is converted to DeepSpeed's universal
    format (once, rank 0, into TAG/universal) and loaded from there; ZeRO 0 loads as it is.
    Rank r takes the RNG state of saved rank r % N (N ranks saved)."""
    saved, now = saved_world_size(root, tag), dist_world(engine)
    universal = saved != now and engine.zero_optimization_stage() > 0
    if saved != now and engine.global_rank == 0:
        log.info("resuming step %d saved at world size %d on world size %d (%s)",
                 int(_TAG.match(tag)[1]), saved, now, "universal checkpoint" if universal else
                 "ZeRO 0: the whole optimizer state is in one file, loaded as saved")
    if universal:
        path, client = _load_universal(engine, Path(root) / tag)
    else:
        path, client = engine.load_checkpoint(str(root), tag=tag, load_module_strict=True,
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root}/{tag}")
    rng_file = Path(root) / tag / f"rng_rank{engine.global_rank % saved:05d}.pt"
    _set_rng_state(torch.load(rng_file, weights_only=False))
    return client


def _load_universal(engine, folder: Path):
    """(path, client state) of `folder` loaded through its universal conversion."""
    failed = None
    if engine.global_rank == 0 and not (folder / UNIVERSAL).is_dir():
        try:
            to_universal(folder)
        except Exception as e:  # noqa: BLE001 - every rank raises it below, in one line
            failed = f"{type(e).__name__}: {e}"
    if dist.all_reduce_max(int(failed is not None), engine.device):
        saved = saved_world_size(folder.parent, folder.name)
        reason = " ".join((failed or "it failed on rank 0").split())
        raise ResumeRefused(
            f"cannot resume {folder} (ZeRO {engine.zero_optimization_stage()}, saved at world "
            f"size {saved}) on world size {dist_world(engine)}: DeepSpeed's conversion to a "
            f"universal checkpoint (ds_to_universal) failed: {reason}; rerun on {saved} ranks")
    config = engine._config  # what {"checkpoint": {"load_universal": true}} sets; load-time only
    groups = _hyperparameters(engine)
    config.load_universal_checkpoint = True
    try:
        loaded = engine.load_checkpoint(str(folder), tag=UNIVERSAL, load_module_strict=True,
                                        load_optimizer_states=True,
                                        load_lr_scheduler_states=True)
    finally:
        config.load_universal_checkpoint = False
    # ZeRO-3's universal load (stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3) gives
    # every param group the hyperparameters of group 0, so weight decay on the no-decay group;
    # they come from the run's config: put them back (the lr is the loaded one) ...
    for group, saved in zip(engine.optimizer.param_groups, groups):
        group.update(saved)
    # ... and one `step` tensor to all of them, which a fused / foreach AdamW then increments
    # once per group and step: give each its own.
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    return loaded


def _hyperparameters(engine) -> list[dict]:
    """Each optimizer param group's settings but its params and lr."""
    return [{k: v for k, v in g.items() if k not in ("params", "lr")}
            for g in engine.optimizer.param_groups]


def to_universal(folder: Path) -> Path:
    """Convert the DeepSpeed checkpoint in `folder` to the universal format in folder/universal
    (written beside, then renamed: a crash leaves no half conversion); returns its path."""
    from deepspeed.checkpoint import ds_to_universal

    tmp, out = folder / f".{UNIVERSAL}.tmp", folder / UNIVERSAL
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(folder), output_folder=str(tmp),
                              num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)
    (folder / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's; we pass the tag
    os.replace(tmp, out)
    return out


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's weights in fp32 on rank 0 (None elsewhere), from any ZeRO stage."""
    module = engine.module
    params = list(module.parameters())
    if engine.zero_optimization_stage() == 3:
        # ZeRO-3 keeps a 1/N slice of every parameter per rank: gather them (all ranks join).
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return _cpu_copy(module) if engine.global_rank == 0 else None
    return _cpu_copy(module) if engine.global_rank == 0 else None


def _cpu_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def export_safetensors(engine, path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write the final weights as one safetensors file (atomic; rank 0 writes, all call)."""
    state = full_state_dict(engine)
    if state is not None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    dist.barrier()


def checkpoint_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The module weights of a complete DeepSpeed checkpoint folder."""
    full = ckpt / "mp_rank_00_model_states.pt"
    if full.is_file():  # ZeRO 0/1/2: the whole module's state dict, in the training dtype
        return torch.load(full, map_location="cpu", weights_only=False, mmap=True)["module"]
    # ZeRO-3 stores only empty placeholders there (zero_pp_rank_*_model_states.pt): rebuild
    # the fp32 weights from the ranks' optimizer partitions with DeepSpeed's own zero_to_fp32.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)

"""Data layer: shard writers, `dataset.json`, webdataset loaders, transforms (docs/data.md)."""

import importlib

from scaling.data.info import DataError, DatasetInfo, ShardInfo, SplitInfo, load_dataset_info
from scaling.data.loader import EvalLoader, TrainLoader, make_eval_loader, make_train_loader
from scaling.data.transforms import Augment, default_augment, mixup_cutmix

__all__ = [
    "Augment", "DataError", "DatasetInfo", "EvalLoader", "ShardInfo", "SplitInfo", "TrainLoader",
    "default_augment", "load_dataset_info", "make_builtin_shards", "make_eval_loader",
    "make_train_loader", "mixup_cutmix",
]


def __getattr__(name: str):
    """`make_builtin_shards`, imported on first use (PEP 562) so that the package does not
    import its own CLI module: `python -m scaling.data.make_shards` then runs cleanly. The
    general writer is `scaling.data.make_shards.make_shards` (the module shares its name)."""
    if name == "make_builtin_shards":
        return importlib.import_module("scaling.data.make_shards").make_builtin_shards
    raise AttributeError(f"module 'scaling.data' has no attribute {name!r}")

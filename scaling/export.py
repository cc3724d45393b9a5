"""Reading a run's exported weights (RUN_DIR/model.safetensors, written by
scaling.engine.export_safetensors) back into a model, without DeepSpeed. Kept apart from
scaling/model.py, which imports torch alone."""

from __future__ import annotations

import json

from safetensors import safe_open
from safetensors.torch import load_file

from scaling.model import VisionTransformer, ViTConfig, create_model


def load_exported(path: str) -> VisionTransformer:
    """Rebuild a model from a safetensors file written by training (config in its metadata)."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "vit_config" not in meta:
        raise ValueError(f"{path}: no 'vit_config' in the safetensors metadata; "
                         "build the model with create_model() and load_state_dict() instead")
    model = create_model(ViTConfig(**json.loads(meta["vit_config"])))
    model.load_state_dict(load_file(path), strict=True)
    return model

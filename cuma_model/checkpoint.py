"""Adapter checkpoints: adapter_config.json + adapter_model.safetensors, written atomically."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temp file in the same folder, fsync it, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def adapter_state_dict(model) -> dict:
    """Every adapter and router tensor of a patched model, keyed by its qualified parameter name."""
    from .patch import _handle

    handle = _handle(model)
    owned = {id(p) for layer in handle.layers.values() for p in (layer.lora_A, layer.lora_B)}
    owned |= {id(p) for router in handle.routers.values() for p in router.parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) in owned}


def save_pretrained(model, directory: str | Path) -> Path:
    """Write adapter_model.safetensors then adapter_config.json into `directory`, each atomically."""
    from safetensors.torch import save

    from .patch import _handle

    directory = Path(directory)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    atomic_write_bytes(directory / WEIGHTS_NAME, save(tensors, metadata={"format": "pt", "peft_type": "CuMA"}))
    _handle(model).config.save(directory)
    return directory


def from_pretrained(model, directory: str | Path, is_trainable: bool = True):
    """Patch `model` (a base model) with the adapter saved in `directory` and load its weights; returns `model`."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from .config import CuMAConfig
    from .patch import patch_model

    directory = Path(directory)
    config = CuMAConfig.load(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    try:
        tensors = load(weights.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ValueError(f"{weights} is corrupt or truncated: {e}") from e
    patch_model(model, config)
    params = adapter_state_dict(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"adapter in {directory} does not fit this model: {len(missing)} missing tensors {missing[:3]}, "
            f"{len(unexpected)} unexpected tensors {unexpected[:3]} (was it saved from another base model?)"
        )
    for name, p in params.items():
        t = tensors[name]
        if t.shape != p.shape:
            raise ValueError(f"adapter tensor {name} has shape {tuple(t.shape)}, this model needs {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(t)
        p.requires_grad_(is_trainable)
    return model

"""Adapter checkpoints: adapter_config.json + adapter_model.safetensors, written as one unit.

The files are PEFT's: `PeftModel.from_pretrained` loads a folder written here, and `from_pretrained` loads one
written by `PeftModel.save_pretrained` (its tensor names carry PEFT's "base_model.model." prefix, dropped on read).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import torch

from .atomic import exclusive_lock, is_own_leftover, recover_folder, replace_folder, resolve_folder
from .config import CONFIG_NAME, LEGACY_PEFT_TYPE_NAME, PEFT_TYPE_NAME
from .handle import handle_of, inside_peft
from .model_card import BEGIN as CARD_MARKER, MODEL_CARD_NAME, write_card

WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)
PEFT_KEY_PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's parameter names


def adapter_state_dict(model) -> dict:
    """Every adapter, router and projection tensor of a patched model, keyed by its qualified name: the parameters,
    and the z statistics (buffers, with `demographic_norm`)."""
    handle = handle_of(model)
    owned = {id(p) for layer in handle.layers.values() for p in (layer.cuma_A, layer.cuma_B)}
    owned |= {id(t) for module in handle.routing_modules() for t in (*module.parameters(), *module.buffers())}
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {name: t for name, t in named if id(t) in owned}


def write_adapter(model, directory: str | Path) -> None:
    """Write the adapter's two files into `directory` as they are (for a folder being assembled, such as a training
    checkpoint: `save_pretrained` is the atomic, checked way)."""
    from safetensors.torch import save

    handle_of(model).check_config_unchanged()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        _refuse_special_file(directory / name)  # writing into a FIFO blocks until something reads it
    (directory / WEIGHTS_NAME).write_bytes(save(tensors, metadata={"format": "pt", "peft_type": PEFT_TYPE_NAME}))
    (directory / CONFIG_NAME).write_text(handle_of(model).config.to_json())
    _refuse_special_file(directory / MODEL_CARD_NAME)
    write_card(directory, handle_of(model).config, into_existing=False)  # a card of ours: its section replaced


def save_pretrained(model, directory: str | Path, overwrite: bool = False) -> Path:
    """Save the adapter into `directory`; the folder is replaced as a unit (other files in it are kept).

    A crash at any point leaves the previous save or this one, complete, under `directory`. A folder that holds
    another adapter (not CuMA, or CuMA tensors of other names or shapes) is refused unless `overwrite=True`.
    `model` is a patched model, or a PeftModel holding CuMA: then the folder is the one `model.save_pretrained`
    writes (PEFT's names and metadata, its model card), built and swapped in as a unit. Saves into one folder take
    turns (other processes wait); every other file of the folder is carried over, whatever its name.
    """
    directory = Path(directory)
    resolve_folder(directory)  # refuse a folder no save can replace before anything is touched
    peft_model = model if is_cuma_peft_model(model) else None
    patched = inside_peft(model)  # inside CuMA's PeftModel, or another PEFT method's (a LoRA beside CuMA)
    # the adapter files are replaced, everything else is the user's, except what an interrupted write of ours left
    keep = lambda name: name not in ADAPTER_FILES and not is_own_leftover(name)
    with exclusive_lock(directory):  # held from the check to the swap: another save cannot slip in between
        recover_folder(directory, clean=True)  # an interrupted save's old folder is what the overwrite check must see
        if not overwrite:
            other = _other_adapter(directory, patched)
            if other:
                raise FileExistsError(f"{directory} holds {other}; pass overwrite=True to replace it")
        card = directory / MODEL_CARD_NAME
        _refuse_special_file(card)
        if peft_model is None:
            text = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else None

            def build_plain(tmp: Path) -> None:
                if text is not None and CARD_MARKER in text:  # ours, perhaps with the user's text around it
                    (tmp / MODEL_CARD_NAME).write_text(text, encoding="utf-8")
                write_adapter(patched, tmp)  # replaces the section only
                if text is not None and CARD_MARKER not in text:  # theirs, carried over by `keep`
                    (tmp / MODEL_CARD_NAME).unlink()

            return replace_folder(directory, build_plain, keep=keep)

        def build(tmp: Path) -> None:
            if card.is_file():  # PEFT updates an existing card rather than replacing it
                shutil.copy2(card, tmp / MODEL_CARD_NAME)
            peft_model.save_pretrained(str(tmp))

        return replace_folder(directory, build, keep=keep)


def _refuse_special_file(path: Path) -> None:
    """A save reads `path` if it exists: refuse a FIFO, socket or device there, which could block the save forever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise FileExistsError(f"{path} is {kind}, not a file a save can read or replace (reading it could block "
                              "forever); remove it, or save into another folder")


def is_cuma_peft_model(model) -> bool:
    """A PeftModel whose adapter is CuMA (not a model of another PEFT method with CuMA patched inside it)."""
    from .config import CuMAConfig

    return _is_peft_model(model) and isinstance(model.peft_config.get(model.active_adapter), CuMAConfig)


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def strip_peft_prefix(tensors: dict) -> dict:
    """Tensor names as `adapter_state_dict` has them: PEFT's files prefix each with "base_model.model."."""
    if tensors and all(k.startswith(PEFT_KEY_PREFIX) for k in tensors):
        return {k[len(PEFT_KEY_PREFIX):]: v for k, v in tensors.items()}
    return dict(tensors)


def canonical_names(model, tensors: dict) -> dict:
    """`tensors` (or {name: shape}) under the names of the patched `model`: PEFT's prefix dropped, and the names of
    files written before config version 5 (`lora_A`, `lora_B`, `router`, shared routers on the attention or MLP
    module) mapped to today's (`cuma_A`, `cuma_B`, `cuma_router` on the first sibling)."""
    tensors = strip_peft_prefix(tensors)
    handle = handle_of(model)
    renamed = {f"{name}.{old}": f"{name}.{new}" for name in handle.layers
               for old, new in (("lora_A", "cuma_A"), ("lora_B", "cuma_B"))}
    routers = {router.legacy_key + ".": router.key + "." for router in handle.routers.values()}
    out = {}
    for key, value in tensors.items():
        if key in renamed:
            key = renamed[key]
        else:
            prefix = next((p for p in routers if key.startswith(p)), None)
            if prefix is not None:
                key = routers[prefix] + key[len(prefix):]
        out[key] = value
    return out


def _other_adapter(directory: Path, patched) -> str | None:
    """What kind of other adapter `directory` holds, or None when it holds none or one of this very layout."""
    from safetensors import safe_open

    config, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config, weights):
        _refuse_special_file(path)  # before anything opens it
    if not config.exists() and not weights.exists():
        return None
    try:
        peft_type = json.loads(config.read_text()).get("peft_type") if config.exists() else None
        if config.exists() and peft_type not in (PEFT_TYPE_NAME, LEGACY_PEFT_TYPE_NAME):
            return f"a {peft_type or 'non-CuMA'} adapter"
        with safe_open(str(weights), framework="pt") as f:
            shapes = canonical_names(patched, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    except Exception as e:  # unreadable: not ours to replace silently
        return f"an adapter that cannot be read ({type(e).__name__}: {e})"
    differ = differing_tensors(shapes, {k: tuple(p.shape) for k, p in adapter_state_dict(patched).items()})
    if differ:
        return f"a CuMA adapter of another layout ({len(differ)} tensors differ, e.g. {differ[0]})"
    return None


def differing_tensors(a: dict, b: dict) -> list[str]:
    """The names, sorted, that one of two {name: shape} maps lacks or that have another shape in the other."""
    return sorted(set(a) ^ set(b) | {k for k in set(a) & set(b) if a[k] != b[k]})


def read_adapter_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of `directory`'s adapter_model.safetensors; a missing or damaged file is an error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    try:
        return load(weights.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ValueError(f"{weights} is corrupt or truncated: {e}") from e


def check_adapter_tensors(model, tensors: dict[str, torch.Tensor], source: str | Path) -> dict:
    """The patched `model`'s adapter parameters by name; ValueError unless `tensors` has exactly their names and
    shapes."""
    params = adapter_state_dict(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"adapter in {source} does not fit this model: {len(missing)} missing tensors {missing[:3]}, "
            f"{len(unexpected)} unexpected tensors {unexpected[:3]} (was it saved from another base model, or with "
            "other options?)"
        )
    for name, p in params.items():
        if tensors[name].shape != p.shape:
            raise ValueError(f"adapter tensor {name} in {source} has shape {tuple(tensors[name].shape)}, this model "
                             f"needs {tuple(p.shape)}")
        # weights only: the z statistics are NaN by design until fitted
        if isinstance(p, torch.nn.Parameter) and tensors[name].is_floating_point():
            bad = int((~torch.isfinite(tensors[name])).sum())
            if bad:
                raise ValueError(f"adapter tensor {name} in {source} holds NaN or inf ({bad} values): the file is "
                                 "damaged, or it was saved from a run that diverged")
    return params


def load_adapter_tensors(model, tensors: dict[str, torch.Tensor], source: str | Path,
                         requires_grad: bool | None = None) -> None:
    """Copy `tensors` into the patched `model`'s adapter after checking that names and shapes fit exactly.

    Names may carry PEFT's "base_model.model." prefix (a folder written by `PeftModel.save_pretrained`), or be
    those of an earlier release (`canonical_names`)."""
    tensors = canonical_names(model, tensors)
    params = check_adapter_tensors(model, tensors, source)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
            if requires_grad is not None and isinstance(p, torch.nn.Parameter):
                p.requires_grad_(requires_grad)

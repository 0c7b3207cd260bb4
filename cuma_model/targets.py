"""Which modules of a model CuMA adapts, and what it needs to know of each (sizes, the device it runs on).

Adaptable: `nn.Linear` and GPT-2's `Conv1D` (the same map with a transposed weight). A target name that matches
another kind of module that holds weights (an embedding, a fused MoE expert bank) is refused by name, and so is a
layer whose weight is offloaded with no execution device to put the adapter on.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers without GPT-2's layer: nothing to match
    Conv1D = ()

ADAPTABLE = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an adaptable module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.nf  # Conv1D: weight [in, out]


def execution_device(module: nn.Module) -> torch.device:
    """Where the module computes: its weight's device, or for a weight offloaded by accelerate (on `meta`, moved in
    by a hook at each call) the hook's execution device."""
    device = module.weight.device
    if device.type != "meta":
        return device
    hook_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if hook_device is None:
        raise ValueError("a target layer's weight is on the meta device and no accelerate hook says where it runs; "
                         "load the model's adapted layers onto a real device")
    return torch.device(hook_device if not isinstance(hook_device, int) else f"cuda:{hook_device}")


def wrapped_by_peft(module: nn.Module) -> bool:
    """A layer that a PEFT adapter (LoRA, ...) already replaced with its own wrapper of the base layer."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(module, BaseTunerLayer)


def find_targets(model: nn.Module, config) -> list[tuple[str, nn.Module]]:
    """The (qualified name, module) pairs `config.target_modules` selects; a clear error where none fit."""
    targets, refused, wrapped = [], [], []
    for name, module in model.named_modules():
        if not name or not config.matches(name):
            continue
        if wrapped_by_peft(module):
            wrapped.append(f"{name} ({type(module).__module__.split('.')[-2]})")
        elif isinstance(module, ADAPTABLE):
            targets.append((name, module))
        elif any(True for _ in module.parameters(recurse=False)):
            refused.append(f"{name} ({type(module).__name__})")
    if wrapped:
        raise ValueError(f"{wrapped[:4]} already wrapped by a PEFT adapter: CuMA adapts plain linear layers. Give "
                         "CuMA other modules (with the other adapter added first, patch_model(peft_model, "
                         "target_modules=[...]) keeps both trainable), or merge the other adapter into the base "
                         "first (merge_and_unload())")
    if refused:
        raise ValueError(f"target_modules={config.target_modules!r} matches modules CuMA cannot adapt: "
                         f"{refused[:4]}; it adapts nn.Linear and Conv1D layers only")
    if not targets:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, ADAPTABLE)})
        hint = ""
        wanted = [config.target_modules] if isinstance(config.target_modules, str) else config.target_modules
        fused = sorted({n for n in names for t in wanted if t in n and t != n})
        if fused:
            hint = (f"; {fused} hold several projections in one layer (fused, as in Phi-3 or GPT-2): name them to "
                    "adapt the fused layer as a whole")
        raise ValueError(f"no linear layer matches target_modules={config.target_modules!r} (a list matches the end "
                         "of a qualified name, 'q_proj' or 'self_attn.q_proj'; a string is a regular expression "
                         f"matched against the whole name); linear layers here are named {names}{hint}")
    _warn_unmatched_names(model, config, targets)
    return targets


def _warn_unmatched_names(model: nn.Module, config, targets) -> None:
    """A list entry that adapts nothing while others do (Mixtral's `w1`/`w3`, now inside one fused expert bank)
    would otherwise go unnoticed."""
    if isinstance(config.target_modules, str):
        return
    unmatched = [t for t in config.target_modules
                 if not any(name == t or name.endswith("." + t) for name, _ in targets)]
    if not unmatched:
        return
    adapted = sorted({name.rsplit(".", 1)[-1] for name, _ in targets})
    banks = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Experts")})
    hint = (f"; this model's MoE experts are fused weight banks ({', '.join(banks)}), which CuMA cannot adapt"
            if banks else "")
    warnings.warn(f"target_modules entries {unmatched} match no linear layer of this model and adapt nothing; "
                  f"adapted: {adapted}{hint}", stacklevel=4)

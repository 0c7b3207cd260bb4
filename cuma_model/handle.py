"""CuMAHandle: what a patched model knows about its adapter, and how to find it on a model."""
from __future__ import annotations

import torch
from torch import nn


class CuMAHandle:
    """What a patched model knows about its adapter: the config, its routers and adapted layers.

    Every CuMALinear points at its handle: that is how two patched models alive at once keep their conditioning apart.
    """

    def __init__(self, config):
        self.config = config
        self.patched_options = config.adapter_options()  # what the modules were built with (check_config_unchanged)
        self.layers: dict = {}  # qualified name -> CuMALinear
        self.routers: dict = {}  # router key (its qualified name) -> DemographicRouter
        self.router_groups: dict = {}  # the layers a router serves ("<parent>.qkv", or a layer's name) -> router
        self.projection = None  # the DemographicProjection of z run before the routers (demographic_projection_layers)
        self.checkpointed: list[nn.Module] = []
        self.base_requires_grad: dict[str, bool] = {}  # restored by unpatch_model
        self.aux_meter = AuxMeter()
        self.disabled = False  # the whole adapter switched off (PEFT's disable_adapter); adapters_disabled is per call
        self.overrides: list[tuple] = []  # (object, attribute, had it, its value) for every attribute patched
        self.warned_backbone_aux = False
        self.warned_4d_mask_aux = False
        self.warned_frozen = False
        self.trainable = True  # what patching or loading left the adapter's parameters (see _warn_if_frozen...)
        self.accumulation_steps: int | None = None  # a trainer's, set by CuMACallback while it trains

    def check_config_unchanged(self, config=None) -> None:
        """Refuse a config (this adapter's, or the copy PEFT saves) whose options were changed after patching: the
        modules still compute with the old ones, so a save would write a config that does not describe them."""
        now = (config or self.config).adapter_options()
        changed = [f"{k}: {v!r} -> {now[k]!r}" for k, v in self.patched_options.items() if not now[k] == v]
        if changed:
            raise ValueError(f"the adapter's config was changed after patching ({'; '.join(changed)}): the layers "
                             "still compute with the values they were patched with, so a save would not load back "
                             "as this model. Set it back, or patch a fresh base model with the new options (only "
                             "aux_loss_coef may change while the adapter lives)")

    def routing_modules(self) -> list[nn.Module]:
        """The routers, and the projection of z when there is one: what turns z and the hidden states into routes."""
        return [*self.routers.values(), *([self.projection] if self.projection is not None else [])]


class AuxMeter:
    """Running mean of the aux losses of training forwards, for a trainer's logs (kept on the device: no sync)."""

    def __init__(self):
        self.total, self.count = None, 0

    def add(self, aux: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # training forwards only, not evaluation or generation
            value = aux.detach().float()
            self.total = value if self.total is None else self.total + value.to(self.total.device)
            self.count += 1

    def pop_mean(self) -> float | None:
        if not self.count:
            return None
        mean = float(self.total) / self.count
        self.total, self.count = None, 0
        return mean


def is_patched(model: nn.Module) -> bool:
    return getattr(model, "cuma", None) is not None


def handle_of(model: nn.Module) -> CuMAHandle:
    """The handle of a patched model (a PeftModel forwards `.cuma` to the model it wraps)."""
    handle = getattr(model, "cuma", None)
    if handle is None:
        raise ValueError("this model is not patched with CuMA: call cuma_model.patch_model(model, ...) first")
    return handle


def inside_peft(model: nn.Module) -> nn.Module:
    """The model inside a PeftModel (of another method, say a LoRA on other modules, which CuMA joins: the
    PeftModel's forward reaches it with every keyword, `demographic_embeds` included); any other model itself."""
    try:
        from peft import PeftModel
    except ImportError:
        return model
    return model.get_base_model() if isinstance(model, PeftModel) else model


def patched_submodule(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(qualified name, module) of the CuMA-patched model inside `model` (itself, or wrapped by PEFT, DDP or
    accelerate), or None. It is the module that holds the handle, not one that forwards `.cuma` (a PeftModel)."""
    for name, module in model.named_modules():
        if isinstance(module.__dict__.get("cuma"), CuMAHandle):
            return name, module
    return None

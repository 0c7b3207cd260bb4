"""CuMA as a registered PEFT method: `peft.get_peft_model(model, CuMAConfig(...))`, `PeftModel.from_pretrained`,
TRL's `peft_config=`.

`import cuma_model` runs `register()`, so PEFT finds the method by its `peft_type` ("CUMA") like one of its own.
The tuner (`CuMAModel`) injects the adapter with `cuma_model.patch_model`, so a PeftModel computes exactly what
`patch_model` computes, and it reads and writes the same tensors as `cuma_model.save_pretrained` (under PEFT's
"base_model.model." prefix). CuMA holds one adapter per model: its routers are shared by sibling projections and z
reaches them through the patched forward, neither of which is keyed by an adapter name.
"""
from __future__ import annotations

from pathlib import Path

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import register_peft_method
import torch
from torch import nn

from ..config import LEGACY_PEFT_TYPE_NAME, PEFT_TYPE_NAME, cuma_peft_type
from ..layer import CuMALinear
from ..router import DemographicProjection
from ..handle import handle_of, is_patched, patched_submodule
from ..patch import patch_model, unpatch_model

PREFIX = "cuma_"


def register() -> None:
    """Make CuMA a PEFT method (config, tuner, prefix) through `peft.utils.register_peft_method`; idempotent."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    from ..config import CuMAConfig

    peft_type = cuma_peft_type()
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered is None:
        register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=CuMAConfig, model_cls=CuMAModel, prefix=PREFIX)
    elif registered is not CuMAModel:  # this module was reloaded: point PEFT at the classes now in use
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = CuMAConfig
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = CuMAModel
    # PEFT looks the saved "peft_type" string up in this dict; version 1 files say "CuMA"
    PEFT_TYPE_TO_CONFIG_MAPPING[LEGACY_PEFT_TYPE_NAME] = CuMAConfig


class CuMAPeftLinear(CuMALinear, BaseTunerLayer):
    """A CuMALinear as PEFT sees it: a tuner layer with PEFT's adapter name and status flags (the switch itself is
    the handle's `disabled`, which every entry point reads).

    `CuMAModel` switches the class of each layer `patch_model` made to this one; it adds no state of its own.
    """

    adapter_layer_names = ()  # CuMA's tensors are not per-adapter-name dicts: CuMAModel selects them for PEFT

    def _get_available_adapters(self) -> set[str]:
        return {self._active_adapter}


class CuMAPeftProjection(DemographicProjection, BaseTunerLayer):
    """The projection of z (`demographic_projection_layers`) as PEFT sees it: a tuner module, so that PEFT's tools
    count its tensors as the adapter's (`get_base_model_state_dict` leaves them out). It sits at the model's root,
    outside every adapted layer, because it runs once per forward before them; it adds no state of its own."""

    adapter_layer_names = ()

    def _get_available_adapters(self) -> set[str]:
        return {self._active_adapter}

    @property
    def weight(self):  # BaseTunerLayer's would look for a wrapped base layer, which a projection has not
        return self.layers[0].weight

    @property
    def bias(self):
        return self.layers[0].bias


class CuMAModel(BaseTuner):
    """PEFT's tuner for CuMA: `patch_model` does the injection; one adapter per model."""

    prefix: str = PREFIX
    tuner_layer_cls = CuMAPeftLinear
    target_module_mapping: dict = {}
    uses_shared_state = True  # routers are shared between layers: not for peft.inject_adapter_in_model

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        if not hasattr(BaseTuner, "_remap_adapter_state_dict_for_load"):
            import peft

            raise RuntimeError(f"CuMA as a PEFT method needs peft >= 0.21 (its tuner state-dict hooks); this is peft "
                               f"{peft.__version__}. cuma_model.patch_model works without them")
        config = self.peft_config[adapter_name]
        weights_dir = config.__dict__.pop("_weights_dir", None)  # set by CuMAConfig.from_pretrained
        if is_patched(model):
            held = [n for n in self.peft_config if n != adapter_name]
            raise ValueError(
                f"cannot add the CuMA adapter {adapter_name!r}: this model already holds "
                f"{'the CuMA adapter ' + repr(held[0]) if held else 'a CuMA adapter'}, and CuMA holds one adapter "
                "per model. Load into the active name to replace its weights (load_adapter(path, adapter_name="
                f"{held[0] if held else 'default'!r})), delete_adapter() first, or wrap a second copy of the base model"
            )
        if low_cpu_mem_usage:
            raise ValueError("CuMA adapters are created with their weights (low_cpu_mem_usage=True is not supported)")
        patch_model(model, config)
        if config.base_model_name_or_path is None:  # PEFT saves its own copy: give it the name patch_model found
            config.base_model_name_or_path = handle_of(model).config.base_model_name_or_path
        try:
            if weights_dir is not None and (Path(weights_dir) / "adapter_model.safetensors").is_file():
                from ..checkpoint import canonical_names, check_adapter_tensors, read_adapter_weights

                check_adapter_tensors(model, canonical_names(model, read_adapter_weights(weights_dir)), weights_dir)
        except BaseException:
            unpatch_model(model)
            raise
        handle = handle_of(model)
        for layer in handle.layers.values():
            layer.__class__ = CuMAPeftLinear
            layer._active_adapter = adapter_name
        if handle.projection is not None:
            handle.projection.__class__ = CuMAPeftProjection
            handle.projection._active_adapter = adapter_name
        if config.inference_mode:
            for p in _adapter_parameters(model):
                p.requires_grad_(False)
            handle.trainable = False
        self.targeted_module_names = list(handle.layers)

    def _create_and_replace(self, *args, **kwargs) -> None:  # never called: inject_adapter uses patch_model
        raise NotImplementedError("CuMA layers are created by cuma_model.patch_model")

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """`CuMAConfig.adapter_dtype` decides the adapter's storage dtype, on both paths alike. PEFT's
        `autocast_adapter_dtype=False` (keep a LoRA in its base's half precision rather than float32) is honoured
        where the config leaves the dtype at its default, float32: the adapter's parameters then take the base's
        float16 or bfloat16, and `adapter_dtype` records it, so a save loads back the same."""
        config = self.peft_config[adapter_name]
        if autocast_adapter_dtype or config.adapter_dtype != "float32" or not is_patched(self.model):
            return
        handle = handle_of(self.model)
        base_dtype = next(iter(handle.layers.values())).base_layer.weight.dtype
        if base_dtype not in (torch.float16, torch.bfloat16):
            return
        for p in _adapter_parameters(self.model):
            p.data = p.data.to(base_dtype)
        for c in (config, handle.config):  # PEFT's, and the copy patch_model made
            c.adapter_dtype = str(base_dtype).removeprefix("torch.")
        handle.patched_options = handle.config.adapter_options()

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        handle = handle_of(self.model)
        handle.disabled = not enabled  # every entry point (forward, backbone, generate) then runs the frozen base
        for module in [*handle.layers.values(), *([handle.projection] if handle.projection is not None else [])]:
            module._disable_adapters = not enabled  # what PEFT's status functions read

    def _held_adapter(self) -> str | None:
        if not is_patched(self.model):
            return None
        return next(iter(handle_of(self.model).layers.values()))._active_adapter

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if names != [self._held_adapter()]:
            raise ValueError(f"this model holds the CuMA adapter {self._held_adapter()!r} only (CuMA holds one "
                             f"adapter per model), cannot activate {adapter_name!r}")
        self.active_adapter = names[0]
        if inference_mode:
            self.set_requires_grad(names[0], False)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if self._held_adapter() in names:
            for p in _adapter_parameters(self.model):
                p.requires_grad_(requires_grad)
            handle_of(self.model).trainable = requires_grad

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config or adapter_name != self._held_adapter():
            raise ValueError(f"Adapter {adapter_name} does not exist")
        unpatch_model(self.model)
        del self.peft_config[adapter_name]
        self.active_adapter = []

    def unload(self) -> nn.Module:
        """Take the adapter out: the base model, as it was before (without PEFT's `peft_config`), is returned."""
        if is_patched(self.model):
            unpatch_model(self.model)
        self.model.__dict__.pop("peft_config", None)
        return self.model

    def merge_and_unload(self, *args, **kwargs) -> nn.Module:
        raise ValueError("a CuMA adapter cannot be merged into the base weights: its experts are chosen per token "
                         "from the input and z; use unload() to get the base model back")

    merge_adapter = merge_and_unload

    # State dict hooks of PEFT's save/load: CuMA's tensors are the parameters of its layers and routers under their
    # module names, with no adapter name in them (the keys of cuma_model.save_pretrained, after PEFT's prefix).

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        handle_of(_patched_module(model)[1]).check_config_unchanged(config)
        keys = _adapter_keys(model)
        missing = [k for k in keys if k not in state_dict]
        if missing:
            raise ValueError(f"the state dict to save lacks {len(missing)} CuMA tensors, e.g. {missing[0]}")
        return {k: state_dict[k] for k in keys}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Saved keys (with PEFT's prefix, or cuma_model.save_pretrained's without it) -> model keys, after checking
        that names and shapes fit exactly: a checkpoint that does not fit is refused before any weight is copied."""
        from ..checkpoint import canonical_names, check_adapter_tensors

        name, inner = _patched_module(model)
        tensors = canonical_names(inner, state_dict)
        check_adapter_tensors(inner, tensors, "the checkpoint being loaded")
        return {(f"{name}.{k}" if name else k): v for k, v in tensors.items()}


def _patched_module(model: nn.Module) -> tuple[str, nn.Module]:
    """(qualified name, module) of the CuMA-patched model inside `model` (a PeftModel, or the patched model)."""
    found = patched_submodule(model)
    if found is None:
        raise ValueError("this model holds no CuMA adapter")
    return found


def _adapter_keys(model: nn.Module) -> list[str]:
    from ..checkpoint import adapter_state_dict

    name, inner = _patched_module(model)
    return [f"{name}.{k}" if name else k for k in adapter_state_dict(inner)]


def _adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    from ..checkpoint import adapter_state_dict

    return [t for t in adapter_state_dict(model).values() if isinstance(t, nn.Parameter)]

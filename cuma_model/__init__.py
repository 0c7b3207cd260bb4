"""cuma_model: the thin model layer of CuMA (config, router, adapted linear, patching, conditioning, save/load)."""
from .checkpoint import save_pretrained
from .context import adapters_disabled, conditioning, record_routing
from .config import CuMAConfig
from .layer import CuMALinear
from .handle import is_patched
from .loaders import load_smollm2
from .patch import (
    cuma_layers,
    fit_demographic_norm,
    forward_scope,
    from_pretrained,
    patch_model,
    routers,
    unpatch_model,
)
from .router import DemographicRouter, load_balancing_loss
from .integrations.peft import register as _register_peft_method

_register_peft_method()  # PEFT finds CuMA by its peft_type: get_peft_model, PeftModel.from_pretrained, TRL

__all__ = [
    "CuMAConfig", "CuMALinear", "DemographicRouter", "adapters_disabled", "conditioning", "cuma_layers",
    "fit_demographic_norm", "forward_scope", "from_pretrained", "is_patched", "load_balancing_loss", "load_smollm2",
    "patch_model", "record_routing", "routers", "save_pretrained", "unpatch_model",
]

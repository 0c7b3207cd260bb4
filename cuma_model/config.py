"""CuMAConfig: every option of the published method, validated, and its adapter_config.json form."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from cuma_kernels.reference import ROUTING_MODES

from .checkpoint import CONFIG_NAME, atomic_write_bytes

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class CuMAConfig:
    """Options of a CuMA adapter. Defaults follow the published WorldValuesBench runs, except `shared_A`."""

    num_experts: int = field(default=8, metadata={"help": "LoRA experts per adapted linear layer (E)."})
    top_k: int = field(default=2, metadata={"help": "Experts each token is routed to (k)."})
    r: int = field(default=8, metadata={"help": "LoRA rank of every expert."})
    lora_alpha: float = field(default=16.0, metadata={"help": "Scaling numerator: the update is scaled by alpha / r."})
    dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the LoRA input and inside the router MLP (one p, as published)."}
    )
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "v_proj"),
        metadata={"help": "A linear layer is adapted when its qualified name contains one of these (substring test)."},
    )
    shared_A: bool = field(
        default=False, metadata={"help": "HydraLoRA layout: one shared A per layer, one B per expert."}
    )
    demographic_dim: int = field(
        default=384, metadata={"help": "Size D of the demographic embedding z; 0 routes on hidden states alone."}
    )
    demographic_scale: float = field(
        default=1.0,
        metadata={"help": "z is multiplied by this at every router input: puts a unit-norm z on the scale of the "
                          "hidden states it is concatenated with (the published code fed an unnormalised z)."},
    )
    router_hidden_dim: int = field(default=256, metadata={"help": "Hidden width of the router MLP."})
    router_num_layers: int = field(default=2, metadata={"help": "Linear layers in the router MLP (1, 2 or more)."})
    share_router_qkv: bool = field(default=True, metadata={"help": "q/k/v of one layer share one router."})
    share_router_gate_up: bool = field(default=True, metadata={"help": "gate/up of one layer share one router."})
    routing_mode: str = field(
        default="cuma",
        metadata={"help": "Top-k renormalisation: 'cuma' (published softmax of probabilities), 'sum', 'soft'."},
    )
    aux_loss_coef: float = field(default=0.01, metadata={"help": "Weight of the load-balancing loss; 0 turns it off."})
    init_A_std: float = field(default=0.01, metadata={"help": "A ~ N(0, std^2); B starts at zero."})
    adapter_dtype: str = field(
        default="float32", metadata={"help": "Storage dtype of adapter and router weights (compute follows x)."}
    )
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "Recorded for provenance only."})

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be a non-empty list of names, got {self.target_modules!r}")
        if self.demographic_dim < 0:
            raise ValueError(f"demographic_dim must be >= 0, got {self.demographic_dim}")
        if not (math.isfinite(self.demographic_scale) and self.demographic_scale > 0):
            raise ValueError(f"demographic_scale must be a finite number > 0, got {self.demographic_scale}")
        if self.router_hidden_dim < 1:
            raise ValueError(f"router_hidden_dim must be >= 1, got {self.router_hidden_dim}")
        if self.router_num_layers < 1:
            raise ValueError(f"router_num_layers must be >= 1, got {self.router_num_layers}")
        if self.routing_mode not in ROUTING_MODES:
            raise ValueError(f"routing_mode must be one of {ROUTING_MODES}, got {self.routing_mode!r}")
        if self.aux_loss_coef < 0:
            raise ValueError(f"aux_loss_coef must be >= 0, got {self.aux_loss_coef}")
        if self.adapter_dtype not in _DTYPES:
            raise ValueError(f"adapter_dtype must be one of {_DTYPES}, got {self.adapter_dtype!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["peft_type"] = "CuMA"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CuMAConfig":
        d = dict(d)
        peft_type = d.pop("peft_type", "CuMA")
        if peft_type != "CuMA":
            raise ValueError(f"adapter config has peft_type {peft_type!r}, not 'CuMA'")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CuMA config keys: {unknown}")
        return cls(**d)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "CuMAConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON (corrupt or truncated checkpoint): {e}") from e
        return cls.from_dict(d)

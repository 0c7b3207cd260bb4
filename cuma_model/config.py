"""CuMAConfig: every option of the published method, validated, and its adapter_config.json form.

CuMAConfig is a `peft.PeftConfig`, so PEFT and TRL accept it where they accept a LoraConfig (`get_peft_model`,
`SFTTrainer(peft_config=...)`); `cuma_model.integrations.peft` registers the method with PEFT.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from peft import PeftConfig, TaskType
from peft.utils import PeftType

from cuma_kernels.reference import ROUTING_MODES

from .atomic import atomic_write_bytes

CONFIG_NAME = "adapter_config.json"
# Version of the adapter_config.json format; files without the key were written by the first release, which
# already wrote every field. A field added later must come with its default for the versions before it.
#   1: the CuMA options, "peft_type": "CuMA"; a target_modules list was a substring test on qualified names.
#   2: version 1 plus PEFT's own keys (_PEFT_KEYS), "peft_type": "CUMA" (PEFT's PeftType.CUMA); target_modules
#      follows PEFT (a list matches name suffixes, a string is a regular expression over the whole name).
#   3: version 2 plus demographic_norm.
#   4: version 3 plus demographic_projection_layers.
#   5: the same options; the tensors are named with the method's prefix (`cuma_A`, `cuma_B`, and `cuma_router` on
#      the first projection a router serves), where earlier files say `lora_A`, `lora_B` and `router` (shared
#      routers on the parent module). Earlier files load (`checkpoint.canonical_names`); earlier releases refuse
#      version 5 files by their version rather than by their tensor names.
CONFIG_VERSION = 5
NAMES_VERSION = 5  # the first version with today's tensor names and parameter order
PEFT_TYPE_NAME = "CUMA"
LEGACY_PEFT_TYPE_NAME = "CuMA"  # what version 1 files say; read, never written
# Keys every PeftConfig carries (PEFT's bookkeeping, no effect on the adapter's math): absent from version 1 files.
_PEFT_KEYS = ("task_type", "auto_mapping", "peft_version", "revision", "inference_mode")
_DTYPES = ("float32", "bfloat16", "float16")
_INTS = ("num_experts", "top_k", "r", "demographic_dim", "router_hidden_dim", "router_num_layers",
         "demographic_projection_layers")
_FLOATS = ("lora_alpha", "dropout", "demographic_scale", "aux_loss_coef", "init_A_std")
_BOOLS = ("shared_A", "share_router_qkv", "share_router_gate_up")
_STRS = ("routing_mode", "adapter_dtype", "demographic_norm")
# Options added by a version: files of an earlier version lack them and read as their defaults.
_ADDED_IN = {3: ("demographic_norm",), 4: ("demographic_projection_layers",)}
DEMOGRAPHIC_NORMS = ("none", "center", "whiten")


def cuma_peft_type() -> PeftType:
    """`PeftType.CUMA`, added to PEFT's enum on first use; idempotent.

    PEFT keeps its methods in a closed enum (`register_peft_method` refuses a name that is not a member), and Python
    has no public way to add a member to an existing enum. Replacing the class would break every reference PEFT
    already holds, so the member is added in place, exactly as `Enum` itself stores one: an instance of the str-mixin
    enum with `_name_`/`_value_`, entered in `_member_map_`, `_member_names_` (iteration, `in list(PeftType)`) and
    `_value2member_map_` (`PeftType("CUMA")`). It then hashes, compares, pickles and serialises to JSON as the
    string "CUMA", like PEFT's own members. If PEFT ever ships the member itself, that one is used. Version 1
    adapter files say "CuMA": that value is an alias of the same member.
    """
    member = PeftType.__members__.get(PEFT_TYPE_NAME)
    if member is None:
        member = str.__new__(PeftType, PEFT_TYPE_NAME)
        member._name_ = member._value_ = PEFT_TYPE_NAME
        member.__objclass__ = PeftType
        member._sort_order_ = len(PeftType._member_names_)
        type.__setattr__(PeftType, PEFT_TYPE_NAME, member)  # EnumType.__setattr__ guards existing members only
        PeftType._member_map_[PEFT_TYPE_NAME] = member
        PeftType._member_names_.append(PEFT_TYPE_NAME)
        PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_.setdefault(LEGACY_PEFT_TYPE_NAME, member)
    return member


def _check_version(version, where: str) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= CONFIG_VERSION:
        raise ValueError(f"{where} has cuma_config_version {version!r}; this cuma reads version {CONFIG_VERSION} and "
                         "older (was it written by a newer cuma?)")


def substring_pattern(names) -> str:
    """The regular expression that selects what version 1's substring test on `names` selected."""
    if not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"target_modules must be a list of names, got {names!r}")
    return "(?s).*(?:" + "|".join(re.escape(n) for n in names) + ").*"


@dataclass
class CuMAConfig(PeftConfig):
    """Options of a CuMA adapter. Defaults follow the published WorldValuesBench runs, except `shared_A`.

    The PEFT fields it inherits (`task_type`, `inference_mode`, `revision`, ...) are PEFT's bookkeeping and do not
    change the adapter.
    """

    num_experts: int = field(default=8, metadata={"help": "LoRA experts per adapted linear layer (E)."})
    top_k: int = field(default=2, metadata={"help": "Experts each token is routed to (k)."})
    r: int = field(default=8, metadata={"help": "LoRA rank of every expert."})
    lora_alpha: float = field(default=16.0, metadata={"help": "Scaling numerator: the update is scaled by alpha / r."})
    dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the LoRA input and inside the router MLP (one p, as published)."}
    )
    target_modules: tuple[str, ...] | str = field(
        default=("q_proj", "v_proj"),
        metadata={"help": "Linear layers to adapt, as in PEFT: a list matches a module whose qualified name is one of "
                          "the names or ends with '.' + one of them; a string is a regular expression that must match "
                          "the whole qualified name."},
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
    demographic_norm: str = field(
        default="none",
        metadata={"help": "What the routers do to z before it: 'none'; 'center' (minus the mean of the profiles "
                          "`fit_demographic_norm` is given); 'whiten' (centred, then scaled to unit variance along "
                          "each principal direction, shrunk where the profiles hardly vary). The statistics are saved "
                          "with the adapter."},
    )
    demographic_projection_layers: int = field(
        default=0,
        metadata={"help": "The published encoder projection of z, one for all routers, after demographic_norm and "
                          "demographic_scale: 0 none; 1 Linear(D -> D) (xavier-normal, gain 0.01, as published); "
                          "2 Linear(D -> D), GELU, Linear(D -> D). Trained with the routers."},
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
    cuma_config_version: int = field(
        default=CONFIG_VERSION, repr=False, compare=False,
        metadata={"help": "Format version of the file this config was read from (a file is always written in the "
                          "current version). A field so that PEFT's generic `PeftConfig.from_pretrained`, which passes "
                          "every saved key to the constructor, accepts a saved config."},
    )

    def __post_init__(self) -> None:

        if self.peft_type is None or self.peft_type in (PEFT_TYPE_NAME, LEGACY_PEFT_TYPE_NAME):
            self.peft_type = cuma_peft_type()
        else:
            raise ValueError(f"peft_type of a CuMAConfig must be {PEFT_TYPE_NAME!r}, got {self.peft_type!r}")
        super().__post_init__()  # PEFT's: checks task_type, records peft_version
        self._check_types()
        _check_version(self.cuma_config_version, "this config")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:  # NaN fails this too
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"target_modules {self.target_modules!r} is not a valid regular expression: {e}") from e
        elif not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be a regular expression or a non-empty list of names, "
                             f"got {self.target_modules!r}")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha}")
        if not (math.isfinite(self.init_A_std) and self.init_A_std > 0):
            raise ValueError(f"init_A_std must be a finite number > 0 (A and B both zero would never train), "
                             f"got {self.init_A_std}")
        if self.demographic_dim < 0:
            raise ValueError(f"demographic_dim must be >= 0, got {self.demographic_dim}")
        if not (math.isfinite(self.demographic_scale) and self.demographic_scale > 0):
            raise ValueError(f"demographic_scale must be a finite number > 0, got {self.demographic_scale}")
        if self.demographic_norm not in DEMOGRAPHIC_NORMS:
            raise ValueError(f"demographic_norm must be one of {DEMOGRAPHIC_NORMS}, got {self.demographic_norm!r}")
        if self.demographic_norm != "none" and self.demographic_dim == 0:
            raise ValueError("demographic_norm needs a z (demographic_dim > 0)")
        if self.demographic_projection_layers not in (0, 1, 2):
            raise ValueError(f"demographic_projection_layers must be 0, 1 or 2, got {self.demographic_projection_layers}")
        if self.demographic_projection_layers and self.demographic_dim == 0:
            raise ValueError("demographic_projection_layers needs a z (demographic_dim > 0)")
        if self.router_hidden_dim < 1:
            raise ValueError(f"router_hidden_dim must be >= 1, got {self.router_hidden_dim}")
        if self.router_num_layers < 1:
            raise ValueError(f"router_num_layers must be >= 1, got {self.router_num_layers}")
        if self.routing_mode not in ROUTING_MODES:
            raise ValueError(f"routing_mode must be one of {ROUTING_MODES}, got {self.routing_mode!r}")
        if not (math.isfinite(self.aux_loss_coef) and self.aux_loss_coef >= 0):
            raise ValueError(f"aux_loss_coef must be a finite number >= 0, got {self.aux_loss_coef}")
        if self.adapter_dtype not in _DTYPES:
            raise ValueError(f"adapter_dtype must be one of {_DTYPES}, got {self.adapter_dtype!r}")

    def _check_types(self) -> None:
        """Wrong types fail here by field name (a JSON "8", a bool for a number), not as a torch TypeError later."""
        def fail(name, want):
            value = getattr(self, name)
            raise TypeError(f"{name} must be {want}, got {type(value).__name__} {value!r}")

        for name in _INTS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                fail(name, "an int")
        for name in _FLOATS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                fail(name, "a number")
            setattr(self, name, float(v))
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                fail(name, "true or false")
        for name in _STRS:
            if not isinstance(getattr(self, name), str):
                fail(name, "a string")
        for name in ("base_model_name_or_path", "revision", "peft_version", "task_type"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                fail(name, "a string or null")
        if not isinstance(self.inference_mode, bool):
            fail("inference_mode", "true or false")
        if self.auto_mapping is not None and not isinstance(self.auto_mapping, dict):
            fail("auto_mapping", "an object or null")
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = tuple(self.target_modules)
        elif not isinstance(self.target_modules, str):
            fail("target_modules", "a list of names or a regular expression")

    def matches(self, name: str) -> bool:
        """Whether the module of this qualified name is a target (PEFT's rule for strings and for lists)."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(name == t or name.endswith("." + t) for t in self.target_modules)

    @property
    def trainable_token_indices(self):
        # PEFT reads this with getattr(..., None); TRL writes it when chat_template_path adds tokens to the vocabulary
        raise AttributeError("a CuMA adapter trains no token embeddings (trainable_token_indices): set the chat "
                             "template on the tokenizer instead of passing a chat_template_path that adds tokens")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def adapter_options(self) -> dict:
        """The options the adapter's modules are built with: all but PEFT's bookkeeping and the load-balancing
        weight, which every forward reads from the config (so it may change while the adapter lives)."""
        skip = {"aux_loss_coef", "base_model_name_or_path", "cuma_config_version", *_PEFT_KEYS}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in skip and f.name not in {g.name for g in dataclasses.fields(PeftConfig)}}

    def to_dict(self) -> dict:
        """The adapter_config.json form: every CuMA option and PEFT's keys, plain JSON values."""
        d = dataclasses.asdict(self)
        if not isinstance(self.target_modules, str):
            d["target_modules"] = list(self.target_modules)
        d["peft_type"] = PEFT_TYPE_NAME
        if isinstance(self.task_type, TaskType):
            d["task_type"] = self.task_type.value
        d["cuma_config_version"] = CONFIG_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "adapter config") -> "CuMAConfig":
        """Strict inverse of `to_dict`: every field present, no unknown key, every value of its type; errors name
        `source` and the key."""
        if not isinstance(d, dict):
            raise ValueError(f"{source} must be a JSON object, got a {type(d).__name__}")
        d = dict(d)
        peft_type = d.pop("peft_type", None)
        if peft_type not in (PEFT_TYPE_NAME, LEGACY_PEFT_TYPE_NAME):
            raise ValueError(f"{source} has peft_type {peft_type!r}, not {PEFT_TYPE_NAME!r}: it is not a CuMA adapter")
        version = d.pop("cuma_config_version", 1)
        _check_version(version, source)
        fields = [f.name for f in dataclasses.fields(cls) if f.name not in ("peft_type", "cuma_config_version")]
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"{source} has unknown keys {unknown}")
        added_later = {name for v, names in _ADDED_IN.items() if v > version for name in names}
        required = [name for name in fields if (version >= 2 or name not in _PEFT_KEYS) and name not in added_later]
        missing = [name for name in required if name not in d]
        if missing:
            raise ValueError(f"{source} lacks the keys {missing} (a saved config names every option, so that the "
                             "loaded adapter is the saved one)")
        if version == 1 and isinstance(d["target_modules"], list):
            d["target_modules"] = substring_pattern(d["target_modules"])
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{source}: {e}") from e

    def to_json(self, auto_mapping: dict | None = None) -> str:
        """The text of adapter_config.json: `to_dict()`, with PEFT's `auto_mapping` when it gives one."""
        d = self.to_dict()
        if auto_mapping is not None:
            d["auto_mapping"] = auto_mapping
        return json.dumps(d, indent=2) + "\n"

    def save(self, directory: str | Path) -> Path:
        self.save_pretrained(str(directory))
        return Path(directory) / CONFIG_NAME

    # PEFT's entry points (PeftModel.save_pretrained / from_pretrained call these), kept strict and atomic.

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """PEFT's config writer: `to_dict()` (plus PEFT's `auto_mapping_dict`), replaced atomically."""
        if Path(save_directory).is_file():
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")
        text = self.to_json(auto_mapping=kwargs.get("auto_mapping_dict"))
        atomic_write_bytes(Path(save_directory) / CONFIG_NAME, text.encode())
        if "auto_mapping_dict" in kwargs:  # a PeftModel's save, which wrote its model card first
            from .model_card import write_card

            write_card(save_directory, self, into_existing=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """PEFT's config reader, strict: a local folder is read with `load` (errors name the file and the key)."""
        path = Path(pretrained_model_name_or_path, subfolder or "")
        if not (path / CONFIG_NAME).is_file():  # not a local folder: PEFT's hub lookup, then from_peft_type below
            return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config = cls.load(path)
        # PeftModel.from_pretrained wraps the model before it loads the weights; with this, the CuMA tuner checks
        # that these weights fit the model before wrapping it, so a load that does not fit leaves the model as it was.
        config.__dict__["_weights_dir"] = str(path)
        return config

    @classmethod
    def from_peft_type(cls, **kwargs):
        return cls.from_dict(kwargs)

    @classmethod
    def load(cls, directory: str | Path) -> "CuMAConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON (corrupt or truncated checkpoint): {e}") from e
        return cls.from_dict(d, source=str(path))

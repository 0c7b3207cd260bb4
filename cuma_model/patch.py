"""patch_model and from_pretrained: make a Hugging Face decoder a CuMA model in place (fresh or saved adapter)."""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from pathlib import Path

import torch
from torch import nn

from .atomic import recover_folder
from .aux_backward import attach_aux_loss
from .checkpoint import load_adapter_tensors, read_adapter_weights, save_pretrained
from .config import CuMAConfig
from .context import (
    ForwardState,
    activate,
    active_state,
    generation_conditioning,
    is_disabled,
    pending_embeds,
    wrap_checkpoint_function,
)
from .handle import CuMAHandle, handle_of, inside_peft
from .layer import CuMALinear
from .router import DemographicProjection, DemographicRouter, demographic_statistics
from .targets import execution_device, features, find_targets, wrapped_by_peft

_QKV = ("q_proj", "k_proj", "v_proj")
_GATE_UP = ("gate_proj", "up_proj")
PROJECTION_NAME = "cuma_demographic_projection"  # the projection of z, a submodule of the patched model
ROUTER_NAME = "cuma_router"  # the router's name on the layer that owns it


def patch_model(model: nn.Module, config: CuMAConfig | None = None, **config_kwargs) -> nn.Module:
    """Freeze `model` and inject CuMA experts into its target linear layers, in place; returns `model`.

    Keyword arguments are CuMAConfig fields (num_experts, top_k, r, lora_alpha, target_modules, shared_A,
    demographic_dim, router_hidden_dim, router_num_layers, dropout, share_router_qkv, share_router_gate_up,
    routing_mode, aux_loss_coef, ...); with `config` given they override its fields.
    After patching, `model(..., demographic_embeds=z)` and `model.generate(..., demographic_embeds=z)` take z [B, D].
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model takes a torch nn.Module (a Hugging Face model), got {type(model).__name__}")
    if getattr(model, "cuma", None) is not None:
        raise ValueError("model is already patched with CuMA")
    wrapper, model = model, inside_peft(model)
    config = dataclasses.replace(config, **config_kwargs) if config is not None else CuMAConfig(**config_kwargs)
    if config.base_model_name_or_path is None:  # provenance, for the saved config and its model card
        name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        config.base_model_name_or_path = str(name) if name else None
    targets = find_targets(model, config)
    for _, base in targets:
        execution_device(base)  # an offloaded layer with nowhere to put its adapter fails before anything changes
    handle = CuMAHandle(config)
    try:
        _inject(model, handle, targets)
    except BaseException:  # e.g. out of memory half-way: the model goes back to what it was
        _restore(model, handle)
        raise
    model.cuma = handle
    return wrapper


def _inject(model: nn.Module, handle: CuMAHandle, targets) -> None:
    config = handle.config
    others = _other_adapters_parameters(model)
    for name, p in model.named_parameters():
        if name not in others:  # the base is frozen; another PEFT adapter's parameters keep their flags
            handle.base_requires_grad[name] = p.requires_grad
            p.requires_grad_(False)
    dtype = getattr(torch, config.adapter_dtype)
    if config.demographic_projection_layers:
        # at the root, outside every decoder layer: it runs once per forward, before them (an FSDP unit per layer
        # then owns only its own routers and experts)
        handle.projection = DemographicProjection(
            config.demographic_dim, config.demographic_projection_layers, demographic_norm=config.demographic_norm,
            demographic_scale=config.demographic_scale, dtype=dtype, device=execution_device(targets[0][1]))
        model.add_module(PROJECTION_NAME, handle.projection)
    modules = dict(model.named_modules())
    for name, base in targets:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        router, owns = _router_for(handle, parent_name, child, name, base, dtype)
        layer = CuMALinear(base, router, handle, owns_router=owns, r=config.r, lora_alpha=config.lora_alpha,
                           shared_A=config.shared_A, dropout=config.dropout, init_A_std=config.init_A_std, dtype=dtype)
        setattr(parent, child, layer)
        handle.layers[name] = layer
    # Layers that transformers may checkpoint (GradientCheckpointingLayer subclasses, or any module that already has a
    # checkpoint function): their replay must see the conditioning of the call that ran them.
    handle.checkpointed = [m for m in model.modules() if _checkpointable(m)]
    _override(handle, model, "forward", ConditionedForward(model, model.forward))
    backbone = _backbone(model)
    if backbone is not None:
        _override(handle, backbone, "forward", ConditionedForward(model, backbone.forward, backbone=True))
    if hasattr(model, "generate"):
        _override(handle, model, "generate", ConditionedGenerate(model, model.generate))
    if hasattr(model, "save_pretrained"):
        _override(handle, model, "save_pretrained", AdapterSave(model))


def _other_adapters_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters of other PEFT adapters in `model` (inside a tuner layer, outside its base layer)."""
    names = set()
    for prefix, module in model.named_modules():
        if wrapped_by_peft(module):
            for child, sub in module.named_children():
                if child != "base_layer":
                    names.update(f"{prefix}.{child}.{n}" for n, _ in sub.named_parameters())
            names.update(f"{prefix}.{n}" for n, _ in module.named_parameters(recurse=False))
    return names


def _override(handle: CuMAHandle, obj, name: str, value) -> None:
    """Set an instance attribute, remembering what the instance had (an accelerate hook's forward, say)."""
    handle.overrides.append((obj, name, name in obj.__dict__, obj.__dict__.get(name)))
    setattr(obj, name, value)


def _restore(model: nn.Module, handle: CuMAHandle) -> None:
    """Put back everything `_inject` changed, as far as it got."""
    modules = dict(model.named_modules())
    for name, layer in handle.layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer.base_layer)
    if handle.projection is not None and PROJECTION_NAME in model._modules:
        delattr(model, PROJECTION_NAME)
    for obj, name, had, previous in reversed(handle.overrides):
        if had:
            setattr(obj, name, previous)
        else:
            obj.__dict__.pop(name, None)
    for name, p in model.named_parameters():
        if name in handle.base_requires_grad:
            p.requires_grad_(handle.base_requires_grad[name])


def _backbone(model: nn.Module) -> nn.Module | None:
    """The decoder inside a *ForCausalLM (transformers' `base_model`), or None when the model is its own."""
    inner = getattr(model, "base_model", None)
    return inner if isinstance(inner, nn.Module) and inner is not model else None


def _checkpointable(module: nn.Module) -> bool:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # an older transformers: fall back on the attribute it sets when checkpointing is enabled
        GradientCheckpointingLayer = ()
    return isinstance(module, GradientCheckpointingLayer) or hasattr(module, "_gradient_checkpointing_func")


def _router_for(handle, parent_name, child, name, base, dtype) -> tuple[DemographicRouter, bool]:
    """The router of the layer `name`, and whether this layer owns (registers) it: a router shared by q/k/v or
    gate/up is made by, and registered on, the first of them to be adapted."""
    cfg = handle.config
    shared = (cfg.share_router_qkv and child in _QKV) or (cfg.share_router_gate_up and child in _GATE_UP)
    group = f"{parent_name}.{'qkv' if child in _QKV else 'gate_up'}" if shared else name
    router = handle.router_groups.get(group)
    if router is not None:
        return router, False
    with_projection = handle.projection is not None  # then z reaches the routers normalised and scaled already
    router = DemographicRouter(features(base)[0], cfg.demographic_dim, cfg.num_experts, cfg.top_k,
                               hidden_dim=cfg.router_hidden_dim, num_layers=cfg.router_num_layers,
                               dropout=cfg.dropout, mode=cfg.routing_mode,
                               demographic_scale=1.0 if with_projection else cfg.demographic_scale,
                               demographic_norm="none" if with_projection else cfg.demographic_norm,
                               dtype=dtype, device=execution_device(base))
    router.key = f"{name}.{ROUTER_NAME}"
    # where releases before config version 5 kept it: on the parent of shared projections, else as `router`
    attr = "cuma_router_qkv" if child in _QKV else "cuma_router_gate_up"
    router.legacy_key = f"{parent_name}.{attr}" if shared else f"{name}.router"
    handle.router_groups[group] = router
    handle.routers[router.key] = router
    return router, True


@contextlib.contextmanager
def forward_scope(model: nn.Module, demographic_embeds: torch.Tensor | None,
                  attention_mask: torch.Tensor | None = None, compute_aux: bool | None = None):
    """Condition every CuMA layer of `model` on z inside the block, exactly as the patched forward does.

    For integrations that call the backbone without going through `model.forward` (e.g. a trainer's own log-prob
    head). Yields the `ForwardState`; `state.aux_loss()` is the weighted load-balancing loss of the block's calls.
    `compute_aux` defaults to the model's training mode.
    """
    handle = handle_of(model)
    for layer in handle.checkpointed:  # a checkpointed layer's backward replay must see this state again
        fn = getattr(layer, "_gradient_checkpointing_func", None)
        if fn is not None:
            layer._gradient_checkpointing_func = wrap_checkpoint_function(fn)
    if compute_aux is None:
        compute_aux = model.training
    if demographic_embeds is not None:
        _check_finite(demographic_embeds)
        if handle.projection is not None and not is_disabled(handle):
            demographic_embeds = handle.projection(demographic_embeds)
    state = ForwardState(handle, demographic_embeds, attention_mask, compute_aux and handle.config.aux_loss_coef > 0)
    with activate(state):
        yield state


class ConditionedForward:
    """The patched model's forward: the base forward plus the `demographic_embeds` keyword.

    The backbone (`model.base_model`, e.g. LlamaModel) gets one too (`backbone=True`), for callers that run it
    without the model's forward (TRL's fused LM head); called from inside the model's forward it passes through.
    A callable object rather than a closure, so `copy.deepcopy(model)` gives a copy whose forward is its own.
    """

    def __init__(self, model: nn.Module, base_forward, backbone: bool = False):
        self.model, self.base_forward, self.backbone = model, base_forward, backbone
        self.__signature__ = _signature_with_embeds(base_forward)  # generate() validates kwargs against it
        self.__doc__ = getattr(base_forward, "__doc__", None)
        self.takes_attention_mask = "attention_mask" in inspect.signature(base_forward).parameters

    def __call__(self, *args, demographic_embeds: torch.Tensor | None = None,
                 aux_token_weights: torch.Tensor | None = None, **kwargs):
        handle = self.model.cuma
        if self.backbone and demographic_embeds is None and active_state(handle) is not None:
            return self.base_forward(*args, **kwargs)  # inside the model's own forward: already conditioned
        z = demographic_embeds if demographic_embeds is not None else pending_embeds(handle, _batch_of(args, kwargs))
        if not is_disabled(handle):  # the frozen base needs no z
            _check_embeds(handle.config, z, args, kwargs)
        # [B, S] weights of the tokens in the load-balancing loss (default: the 2-D attention mask); packed rows
        # whose shared prefix stands for several sequences weight it by their number (cuma_model.survey.packing)
        mask = aux_token_weights
        if mask is not None:
            _check_token_weights(mask, args, kwargs)
        else:
            mask = kwargs.get("attention_mask") if self.takes_attention_mask else None
            if mask is not None and mask.dim() == 4 and self.model.training:
                _warn_4d_mask_once(handle)
        if self.model.training and not handle.warned_frozen and not torch.compiler.is_compiling():
            _warn_if_frozen_after_patching(handle)
        with forward_scope(self.model, z, mask) as state:
            out = self.base_forward(*args, **kwargs)
        aux = state.aux_loss()
        if aux is not None and hasattr(out, "keys"):
            out["aux_loss"] = aux
            if not torch.compiler.is_compiling():  # the meter's Python counter would recompile every call
                handle.aux_meter.add(aux)
            if out.get("loss") is not None:
                out["loss"] = out["loss"] + (aux * _batch_share(kwargs)).to(out["loss"].dtype)
            elif self.backbone and out.get("last_hidden_state") is not None:
                # called directly (TRL's fused LM head): the caller's own loss carries the aux gradient, so the
                # aux_loss handed back is detached (a caller adding it as well would count it twice)
                hidden = attach_aux_loss(out["last_hidden_state"], aux, handle)
                if hidden is not out["last_hidden_state"]:
                    out["last_hidden_state"], out["aux_loss"] = hidden, aux.detach()
        return out


def _warn_if_frozen_after_patching(handle) -> None:
    """A training forward whose CuMA adapter was left trainable by patching but has no trainable parameter now: the
    usual cause is a PEFT adapter (LoRA) added after patching, which freezes every parameter without its prefix."""
    if not handle.trainable or not torch.is_grad_enabled():
        return
    experts = (p for layer in handle.layers.values() for p in (layer.cuma_A, layer.cuma_B))
    routers = (p for module in handle.routing_modules() for p in module.parameters())
    if any(p.requires_grad for p in experts) or any(p.requires_grad for p in routers):
        return
    handle.warned_frozen = True
    warnings.warn("the CuMA adapter has no trainable parameter left, though patching made it trainable: a PEFT "
                  "adapter added after patch_model (get_peft_model(model, LoraConfig(...))) freezes every parameter "
                  "without its own prefix. Add the other adapter first, then patch: get_peft_model(base, "
                  "LoraConfig(target_modules=[...])), then cuma_model.patch_model(peft_model, ...) on other modules; "
                  "both stay trainable. (Frozen on purpose? Set model.cuma.trainable = False.)", stacklevel=3)


def _warn_4d_mask_once(handle) -> None:
    if handle.warned_4d_mask_aux or handle.config.aux_loss_coef == 0 or torch.compiler.is_compiling():
        return  # a warning would break a compiled graph
    handle.warned_4d_mask_aux = True
    warnings.warn("a 4-D attention_mask does not say which tokens are padding, so the load-balancing loss counts "
                  "every token: pass aux_token_weights= ([batch, seq], 1 for a token, 0 for padding) with it",
                  stacklevel=3)


def _batch_share(kwargs) -> torch.Tensor | float:
    """This micro-batch's share of the batch whose loss `num_items_in_batch` normalises (Trainer's gradient
    accumulation): the language-model loss is already divided by the whole batch's label count, so the aux loss is
    weighted by the share of those labels this call holds, and a batch's aux weight sums to 1, not to the number
    of micro-batches. Causal LM labels are counted shifted, as the loss (and Trainer) count them."""
    total = kwargs.get("num_items_in_batch")
    if total is None:
        return 1.0
    labels = kwargs.get("shift_labels")
    if labels is None:
        labels = kwargs.get("labels")
        labels = labels[..., 1:] if labels is not None else None
    if labels is None:
        return 1.0
    return labels.ne(-100).sum() / total


class ConditionedGenerate:
    """The patched model's generate: z (the keyword, or a pending `conditioning`) is handed to the forwards of the
    call as conditioning that follows generate's rows: generate repeats each row for beams and
    `num_return_sequences`, and z is repeated with it. The keyword never reaches generate's own argument check, so
    this holds whatever forward a trainer has put over ours."""

    def __init__(self, model: nn.Module, base_generate):
        self.model, self.base_generate = model, base_generate
        self.__signature__ = inspect.signature(base_generate)
        self.__doc__ = getattr(base_generate, "__doc__", None)

    def __call__(self, *args, demographic_embeds: torch.Tensor | None = None, **kwargs):
        try:
            return self._generate(args, demographic_embeds, kwargs)
        except BaseException:
            # a streamer's consumer (another thread) waits for the end of the stream: a failed call must end it
            streamer = kwargs.get("streamer")
            if streamer is not None and hasattr(streamer, "end"):
                streamer.end()
            raise

    def _generate(self, args, demographic_embeds, kwargs):
        handle = self.model.cuma
        z = demographic_embeds if demographic_embeds is not None else pending_embeds(handle)
        if z is None:
            return self.base_generate(*args, **kwargs)
        if not is_disabled(handle):
            _check_generate_rows(z, args, kwargs)
            _check_embeds(handle.config, z, args, kwargs)  # one row of z per prompt, before generate repeats them
        with generation_conditioning(handle, z):
            return self.base_generate(*args, **kwargs)


class AdapterSave:
    """The patched model's save_pretrained (what Trainer.save_model and its checkpoints call): the adapter, as
    `cuma_model.save_pretrained` writes it, as PEFT's models save theirs. The whole model with its renamed keys would
    load into a plain model with q/v silently re-initialised."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, *args, **kwargs):
        return save_pretrained(self.model, save_directory)


def _inputs_of(args, kwargs):
    """The call's input_ids (or inputs_embeds), keyword or first positional argument."""
    return kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))


def _batch_of(args, kwargs) -> int | None:
    inputs = _inputs_of(args, kwargs)
    if inputs is None:  # an encoder-decoder's decoder step in generate: its rows are the beams
        inputs = kwargs.get("decoder_input_ids", kwargs.get("decoder_inputs_embeds"))
    return inputs.shape[0] if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 else None


def _signature_with_embeds(fn) -> inspect.Signature:
    """The base forward's signature plus `demographic_embeds` (generate() validates kwargs against it)."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    extra = inspect.Parameter("demographic_embeds", inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation="torch.Tensor | None")
    params += [extra] + [p for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD]
    return sig.replace(parameters=params)


def _check_token_weights(weights, args, kwargs) -> None:
    """aux_token_weights: one finite, non-negative weight per input token ([batch, seq])."""
    inputs = _inputs_of(args, kwargs)
    shape = tuple(inputs.shape[:2]) if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 else None
    if not isinstance(weights, torch.Tensor) or weights.dim() != 2 or (shape is not None and weights.shape != shape):
        got = list(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"aux_token_weights must have the input's shape {list(shape) if shape else '[batch, seq]'}"
                         f", got {got}")
    if weights.device.type != "meta" and not weights.is_cuda and not torch.compiler.is_compiling():
        if not bool((torch.isfinite(weights) & (weights >= 0)).all()):
            raise ValueError("aux_token_weights must be finite and >= 0 (1 for a token, 0 for padding)")


def _check_embeds(config: CuMAConfig, z, args, kwargs) -> None:
    if config.demographic_dim == 0:
        if z is not None:
            raise ValueError("this adapter routes on hidden states alone (demographic_dim=0): it takes no "
                             "demographic_embeds; patch with demographic_dim=<D> to route on z")
        return
    if z is None:
        raise ValueError(
            f"missing conditioning: pass demographic_embeds=<tensor [batch, {config.demographic_dim}]> "
            "to the model's forward or generate, or wrap the call in cuma_model.conditioning(model, z)"
        )
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != config.demographic_dim:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"demographic_embeds must be a tensor of shape [batch, {config.demographic_dim}], got {shape}")
    if not z.is_floating_point():
        raise ValueError(f"demographic_embeds must be floating point, got {z.dtype}")
    if z.device.type == "meta":
        raise ValueError("demographic_embeds is on the meta device, which holds no values: compute z on the "
                         "model's device (or the CPU)")
    batch = _batch_of(args, kwargs)
    if batch is not None and batch != z.shape[0]:
        raise ValueError(
            f"demographic_embeds has batch {z.shape[0]} but the input has batch {batch}; expand it "
            "explicitly to the input's rows (torch.cat([z, z]) for chosen+rejected, z.repeat_interleave(n, 0) "
            "for n samples per prompt)"
        )


def _check_generate_rows(z, args, kwargs) -> None:
    """generate takes one z row per prompt row and repeats them itself (beams, returned sequences)."""
    batch = _batch_of(args, kwargs)
    if isinstance(z, torch.Tensor) and z.dim() == 2 and batch is not None and batch != z.shape[0]:
        raise ValueError(
            f"generate got {z.shape[0]} row(s) of demographic_embeds for {batch} prompt row(s): give one row per "
            "prompt (generate repeats it for beams and num_return_sequences). A transformers text-generation "
            "pipeline hands the same keywords to each of its calls: build it with pipeline_class="
            "cuma_model.integrations.CuMATextGenerationPipeline, which gives each prompt its own row")


def _check_finite(z: torch.Tensor) -> None:
    """NaN or inf in z would turn its row's router logits into NaN: refuse it. On CUDA (and while compiling) the
    check is an asynchronous device assert, so it costs no host sync per call."""
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        return  # _check_embeds names the problem
    if z.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(torch.isfinite(z).all(), "demographic_embeds contains NaN or inf")
    elif not bool(torch.isfinite(z).all()):
        bad = (~torch.isfinite(z)).any(dim=-1).nonzero().flatten().tolist() if z.dim() == 2 else []
        raise ValueError(f"demographic_embeds contains NaN or inf (rows {bad[:8]}); every z must be finite")


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo patch_model in place: the base layers, the base forward (and any forward the instance had before) and the
    base's requires_grad flags come back, adapters and routers go."""
    wrapper, model = model, inside_peft(model)
    handle = handle_of(model)
    _restore(model, handle)
    del model.cuma
    return wrapper


def routers(model: nn.Module) -> list[DemographicRouter]:
    """The model's routers, in layer order; each has `.key` (its qualified name), `.logits(x, z)`, `.route(x, z)`."""
    return list(handle_of(model).routers.values())


def fit_demographic_norm(model: nn.Module, demographic_embeds: torch.Tensor) -> nn.Module:
    """Set the z statistics of a model patched with `demographic_norm` "center" or "whiten" from
    `demographic_embeds` [N, D]: one row per distinct training profile (rows repeated per answer would weight the
    people who answered more). Every router gets the same statistics (or the projection of z, which runs before
    the routers, with `demographic_projection_layers`); they are saved with the adapter."""
    handle = handle_of(model)
    if handle.config.demographic_norm == "none":
        raise ValueError("this adapter has demographic_norm 'none': patch it with demographic_norm='center' or "
                         "'whiten' to give its routers z statistics")
    dim = handle.config.demographic_dim
    if not isinstance(demographic_embeds, torch.Tensor) or demographic_embeds.dim() != 2 \
            or demographic_embeds.shape[1] != dim:
        got = list(demographic_embeds.shape) if isinstance(demographic_embeds, torch.Tensor) else type(
            demographic_embeds).__name__
        raise ValueError(f"fit_demographic_norm needs z of the training profiles as [N, {dim}] (this adapter's "
                         f"demographic_dim), got {got}")
    mean, whiten = demographic_statistics(demographic_embeds, handle.config.demographic_norm == "whiten")
    for module in [handle.projection] if handle.projection is not None else handle.routers.values():
        module.set_demographic_norm(mean, whiten)
    return model


def cuma_layers(model: nn.Module) -> dict[str, CuMALinear]:
    """Qualified name -> CuMALinear of every adapted layer."""
    return dict(handle_of(model).layers)


def from_pretrained(model, directory: str | Path, is_trainable: bool = True):
    """Patch `model` (a base model) with the adapter saved in `directory` and load its weights; returns `model`.

    Both files are read and checked before the model is touched, and a failure after patching unpatches it again:
    a failed load leaves `model` as it was. Reads what `save_pretrained` and `PeftModel.save_pretrained` write, and
    the files of earlier cuma releases (cuma_config_version 1).
    """
    directory = Path(directory)
    recover_folder(directory)
    config = CuMAConfig.load(directory)
    tensors = read_adapter_weights(directory)
    wrapper, model = model, inside_peft(model)
    patch_model(model, config)
    try:
        load_adapter_tensors(model, tensors, directory, requires_grad=is_trainable)
    except BaseException:
        unpatch_model(model)
        raise
    handle_of(model).trainable = is_trainable
    return wrapper

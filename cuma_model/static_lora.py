"""A CuMA adapter as plain LoRA adapters that serving engines load (vLLM, SGLang, LoRAX, TGI, PEFT).

An engine serves a LoRA: one fixed low-rank update per adapted layer. CuMA's update is not fixed: each token's
router picks experts from the token's hidden state and the person's z. What a static adapter can keep is the
routing a group of people gets on average. For a group, its calibration prompts (each with its own z) are run
through the model and each router's gates are averaged over every non-padding token: g [E]. The layer's update for
that group is then

    delta W = (alpha / r) * sum_e g_e B_e A_e,

a matrix of rank at most E * r, written as one PEFT LoRA: A = [A_1; ...; A_E] and B = [g_1 B_1, ..., g_E B_E] (times
the scaling), or, with `rank`, its best rank-`rank` approximation (a truncated SVD computed through QR factors, never
the dense [out, in] matrix). What is lost: the routing that varies from token to token and from person to person
inside the group; `cuma_model.survey.export --evaluate` measures how much that costs on a survey.

`python -m cuma_model.export` is the survey command line (`cuma_model.survey.export`) built on this module.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .atomic import replace_folder
from .context import record_routing
from .handle import handle_of
from .targets import features

LORA_CONFIG_NAME = "adapter_config.json"
LORA_WEIGHTS_NAME = "adapter_model.safetensors"


@torch.no_grad()
def average_gates(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each router's gates averaged over the tokens of `batches`: {router key: g [E] float64, summing to ~1}.

    `batches` yields the keyword arguments of one forward each: `input_ids` [B, S], `attention_mask` [B, S]
    (optional), `demographic_embeds` [B, D] (and anything else the model takes, such as `position_ids` for left
    padding); padding (mask 0) is left out of the average. `model` is a patched model (or a PeftModel holding CuMA).
    """
    handle = handle_of(model)
    totals = {key: torch.zeros(router.num_experts, dtype=torch.float64) for key, router in handle.routers.items()}
    counts = dict.fromkeys(totals, 0.0)
    was_training = model.training
    model.eval()
    try:
        for kwargs in batches:
            with record_routing(model) as trace:
                model(**kwargs)
            mask = kwargs.get("attention_mask")
            keep = (mask if mask is not None else torch.ones_like(kwargs["input_ids"])).bool().cpu()
            for record in trace.records:
                idx, w = record.topk_idx[keep], record.topk_weights[keep].double()  # [tokens, k]
                gates = torch.zeros(idx.shape[0], totals[record.router_key].shape[0], dtype=torch.float64)
                totals[record.router_key] += gates.scatter_add_(1, idx, w).sum(0)
                counts[record.router_key] += idx.shape[0]
    finally:
        model.train(was_training)
    missing = [key for key, n in counts.items() if n == 0]
    if missing:
        raise ValueError(f"the calibration prompts reached no token of the routers {missing[:3]}: pass prompts with "
                         "at least one token that is not padding")
    return {key: totals[key] / counts[key] for key in totals}


@torch.no_grad()
def static_lora_factors(model: nn.Module, gates: Mapping[str, torch.Tensor], rank: int | None = None
                        ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer name: (A [R, in], B [out, R]) float32} with B @ A the layer's update under the fixed `gates`.

    Without `rank`, R is the layout's own (E * r, or r for a shared A): exact for the fixed gates. With `rank`,
    B @ A is the best rank-`rank` approximation of that update in the Frobenius norm (zero-padded to `rank` where
    the update's rank is lower, so every layer has the same rank, as engines want)."""
    handle = handle_of(model)
    factors = {}
    for name, layer in handle.layers.items():
        g = gates[layer.cuma_router.key].to(torch.float64)
        A, B = layer.cuma_A.detach().to("cpu", torch.float64), layer.cuma_B.detach().to("cpu", torch.float64)
        scaled_B = B * (g[:, None, None] * layer.scaling)  # [E, out, r]
        if A.shape[0] == 1:  # one shared A: sum_e g_e B_e A = (sum_e g_e B_e) A
            A_cat, B_cat = A[0], scaled_B.sum(0)
        else:
            A_cat, B_cat = A.reshape(-1, A.shape[-1]), scaled_B.permute(1, 0, 2).reshape(B.shape[1], -1)
        if rank is not None:
            A_cat, B_cat = _truncate(A_cat, B_cat, rank)
        factors[name] = (A_cat.float().contiguous(), B_cat.float().contiguous())
    return factors


def _truncate(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` factors of B @ A (B [out, R], A [R, in]) through the QR factors of B and A^T: the SVD of
    an R x R core, never of the [out, in] product."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    q_b, r_b = torch.linalg.qr(B)      # B = Qb Rb
    q_a, r_a = torch.linalg.qr(A.T)    # A = Ra^T Qa^T
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    B_k = (q_b @ u[:, :k]) * root       # [out, k]
    A_k = root[:, None] * (vh[:k] @ q_a.T)  # [k, in]
    if k < rank:  # the same rank in every layer
        B_k = torch.cat([B_k, B_k.new_zeros(B_k.shape[0], rank - k)], dim=1)
        A_k = torch.cat([A_k, A_k.new_zeros(rank - k, A_k.shape[1])], dim=0)
    return A_k, B_k


def write_lora(model: nn.Module, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], directory: str | Path,
               base_model_name_or_path: str | None = None) -> Path:
    """A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) of `factors`, replaced atomically.

    Scaling 1 (lora_alpha = r: the CuMA scaling is folded into B), no dropout, no bias; GPT-2's Conv1D layers are
    marked `fan_in_fan_out` as PEFT wants."""
    from safetensors.torch import save

    handle = handle_of(model)
    ranks = {a.shape[0] for a, _ in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"every layer needs the same rank for a serving engine, got {sorted(ranks)}")
    rank = ranks.pop()
    conv1d = any(not isinstance(handle.layers[name].base_layer, nn.Linear) for name in factors)
    if conv1d and not all(not isinstance(handle.layers[name].base_layer, nn.Linear) for name in factors):
        raise ValueError("a LoRA folder marks every layer fan_in_fan_out or none: export Conv1D and Linear layers "
                         "separately")
    tensors = {}
    for name, (A, B) in factors.items():
        in_features, out_features = features(handle.layers[name].base_layer)
        if A.shape != (rank, in_features) or B.shape != (out_features, rank):
            raise ValueError(f"factors of {name} have shapes {tuple(A.shape)}, {tuple(B.shape)}; the layer needs "
                             f"[{rank}, {in_features}] and [{out_features}, {rank}]")
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().to("cpu", torch.float32).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().to("cpu", torch.float32).contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "bias": "none", "target_modules": sorted(factors), "fan_in_fan_out": conv1d, "use_rslora": False,
        "base_model_name_or_path": base_model_name_or_path or handle.config.base_model_name_or_path,
        "inference_mode": True,
    }

    def build(tmp: Path) -> None:
        (tmp / LORA_WEIGHTS_NAME).write_bytes(save(tensors, metadata={"format": "pt"}))
        (tmp / LORA_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    return replace_folder(directory, build)


def export_lora(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], directory: str | Path,
                rank: int | None = None) -> dict[str, torch.Tensor]:
    """The static LoRA of one group (its calibration `batches`, see `average_gates`) written to `directory`;
    returns the averaged gates."""
    gates = average_gates(model, batches)
    write_lora(model, static_lora_factors(model, gates, rank), directory)
    return gates


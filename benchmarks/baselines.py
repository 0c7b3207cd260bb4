"""Baseline implementations the benchmarks compare CuMA against.

Everything here is written for the benchmarks only; the package never imports it.

- `published_router_tail` / `published_layer`: the published CuMA layer (reference-semantics 1.3 and 1.4): the
  double top-k with a `finfo.min` fill, the "DDP dummy" sum over every adapter tensor in training, and the
  top_k x E loop with a boolean mask, `mask.any()` (a host sync on CUDA) and an index_put add per (slot, expert).
- `torch_route_topk`: softmax -> top-k -> renormalise written with plain torch ops (the closed form, no kernel).
- `grouped_mm_*`: tokens sorted by expert and `torch._grouped_mm` for the shrink and expand GEMMs.
- `peft_linear`: a PEFT `LoraConfig` on a one-Linear module (the ordinary single-adapter LoRA at the same rank).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------------------------------------ routing


def torch_route_topk(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] fp32, idx [T, k]): softmax, torch.topk, softmax over the k probabilities."""
    probs = torch.softmax(logits.float(), dim=-1)
    vals, idx = torch.topk(probs, top_k, dim=-1)
    return torch.softmax(vals, dim=-1), idx


def published_router_tail(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The published gate matrix G [..., E]: softmax, top-k, fill the rest with finfo.min, softmax again."""
    probs = torch.softmax(logits, dim=-1)
    vals, idx = torch.topk(probs, top_k, dim=-1)
    gates = torch.full_like(probs, torch.finfo(probs.dtype).min)
    gates = gates.scatter(-1, idx, vals)
    return torch.softmax(gates, dim=-1)


def published_route_topk(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The published router tail followed by the layer's second top-k (1.4): -> (weights [T, k], idx [T, k])."""
    return torch.topk(published_router_tail(logits, top_k), top_k, dim=-1)


# ----------------------------------------------------------------------------------------- published layer


def published_expert_loop(x, lora_A, lora_B, topk_idx, topk_weights, scaling, dropout=None):
    """The published expert loop on x [..., K]: lora [..., N] (no base output).

    lora_A [E or 1, r, K], lora_B [E, N, r]; topk_idx / topk_weights [..., k]. A shared A is recomputed per
    (slot, expert), as published.
    """
    top_k, num_experts = topk_idx.shape[-1], lora_B.shape[0]
    lora = x.new_zeros(*x.shape[:-1], lora_B.shape[1])
    for slot in range(top_k):
        for e in range(num_experts):
            mask = topk_idx[..., slot] == e
            if not mask.any():  # a host sync on CUDA, every (slot, expert)
                continue
            xm = x[mask] if dropout is None else dropout(x[mask])
            h = xm @ (lora_A[0] if lora_A.shape[0] == 1 else lora_A[e]).t()
            lora[mask] += (h @ lora_B[e].t()) * topk_weights[..., slot][mask, None].to(x.dtype) * scaling
    return lora


def ddp_dummy(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """The published `sum(p.sum() * 0 for p in params)`: one reduction per expert A and B (ParameterLists there)."""
    return sum(p.sum() * 0 for p in (*lora_A.unbind(0), *lora_B.unbind(0)))


def published_layer(x, weight, bias, lora_A, lora_B, gates, top_k, scaling, training):
    """The published CuMALinear forward given the router's gate matrix G [T, E] (1.4).

    out = F.linear(x, W, b) (+ the DDP dummy when training), then top-k on G and the per-expert loop.
    """
    out = F.linear(x, weight, bias)
    if training:
        out = out + ddp_dummy(lora_A, lora_B)
    w, idx = torch.topk(gates, top_k, dim=-1)
    return out + published_expert_loop(x, lora_A, lora_B, idx, w, scaling)


# --------------------------------------------------------------------------------------------- grouped mm


@dataclass
class Dispatch:
    """(token, slot) pairs sorted by expert: the token of each sorted pair, its flat pair index, int32 offsets."""

    token: torch.Tensor  # [T*k] int64
    pair: torch.Tensor  # [T*k] int64
    offsets: torch.Tensor  # [E] int32, cumulative ends (torch._grouped_mm's `offs`)


def sort_by_expert(topk_idx: torch.Tensor, num_experts: int) -> Dispatch:
    """Stable sort of the flat (token, slot) pairs by expert; counts by scatter_add (no host sync on CUDA)."""
    flat = topk_idx.reshape(-1).long()
    pair = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    return Dispatch(pair // topk_idx.shape[1], pair, torch.cumsum(counts, 0).to(torch.int32))


def grouped_mm_shrink(x, lora_A, d: Dispatch) -> torch.Tensor:
    """x [T, K] -> h [T*k, r] in the expert-sorted pair order: one grouped GEMM over per-expert segments."""
    return torch._grouped_mm(x.index_select(0, d.token), lora_A.transpose(1, 2), offs=d.offsets)


def grouped_mm_expand(h_sorted, lora_B, topk_weights, scaling, d: Dispatch, base_out=None, num_tokens=None):
    """h [T*k, r] (sorted pairs) -> y [T, N] = base_out + scaling * sum_j w_tj B_e h_tj, by grouped GEMM + index_add."""
    w = topk_weights.reshape(-1).index_select(0, d.pair).to(h_sorted.dtype)
    o = torch._grouped_mm(h_sorted * (w * scaling)[:, None], lora_B.transpose(1, 2), offs=d.offsets)
    if base_out is None:
        base_out = o.new_zeros(num_tokens, lora_B.shape[1])
    return base_out.index_add(0, d.token, o)


def grouped_mm_experts(x, lora_A, lora_B, topk_idx, topk_weights, scaling, base_out=None):
    """The whole expert computation through torch._grouped_mm on tokens sorted by expert (per-expert A only)."""
    d = sort_by_expert(topk_idx, lora_B.shape[0])
    h = grouped_mm_shrink(x, lora_A, d)
    return grouped_mm_expand(h, lora_B, topk_weights, scaling, d, base_out, x.shape[0])


@lru_cache(maxsize=None)
def grouped_mm_unsupported(device_type: str, dtype: torch.dtype) -> str | None:
    """None when torch._grouped_mm runs forward and backward here, else the reason it does not."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        g = torch.Generator().manual_seed(0)
        E, T, K, N, r, k = 2, 32, 32, 32, 16, 2

        def make(*shape):
            return torch.randn(*shape, generator=g).to(device_type, dtype).requires_grad_()

        x, a, b = make(T, K), make(E, r, K), make(E, N, r)
        idx = torch.randint(0, E, (T, k), generator=g).to(device_type)
        w = torch.rand(T, k, generator=g).to(device_type)
        y = grouped_mm_experts(x, a, b, idx, w, 1.0)
        y.backward(torch.ones_like(y))
        if device_type == "cuda":
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - any failure means "not supported on this device/dtype"
        return f"torch._grouped_mm unsupported for {dtype} on {device_type}: {type(e).__name__}: {str(e)[:160]}"
    return None


# ---------------------------------------------------------------------------------------------------- PEFT


class OneLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def peft_linear(weight: torch.Tensor, r: int, scaling: float, seed: int = 0) -> nn.Module:
    """A PEFT LoRA (rank r, alpha = scaling * r, no dropout) on a bias-free Linear holding `weight` [N, K].

    Returns the peft `lora.Linear` layer; its lora_B is random (not zero) so the adapter does real work.
    """
    from peft import LoraConfig, get_peft_model

    n, k = weight.shape
    linear = nn.Linear(k, n, bias=False, device=weight.device, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    torch.manual_seed(seed)
    model = get_peft_model(OneLinear(linear), LoraConfig(r=r, lora_alpha=scaling * r, lora_dropout=0.0,
                                                         target_modules=["proj"], init_lora_weights=False))
    model.to(device=weight.device, dtype=weight.dtype)
    return model.base_model.model.proj


def peft_delta(layer, x: torch.Tensor) -> torch.Tensor:
    """The adapter path alone of a peft lora.Linear: scaling * B(A(dropout(x)))."""
    name = layer.active_adapters[0]
    return layer.lora_B[name](layer.lora_A[name](layer.lora_dropout[name](x))) * layer.scaling[name]

"""Public ops and backend choice: CUDA tensors -> Triton, CPU tensors -> the vectorised torch path.

`CUMA_BACKEND=triton|torch|auto` overrides the choice (triton on CPU means the Triton interpreter).
The torch path of `lora_experts` has two forms, chosen per call from the shapes (`torch_expert_path`):
the dense gated form (`reference.py`, every expert for every token) and the routed form (`routed_cpu.py`, only
the routed (token, slot) pairs). `CUMA_CPU_PATH=dense|routed|auto` overrides that choice.
Both ops are `torch.library` custom ops with fake implementations and registered autograd, so they trace
under `torch.compile(fullgraph=True)` as opaque nodes.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .grouped_lora import h_layout, lora_experts_triton_backward, lora_experts_triton_forward
from .reference import (
    ROUTING_MODES,
    lora_experts_torch_backward,
    lora_experts_torch_forward,
    route_topk_torch,
)
from .routed_cpu import lora_experts_routed_backward, lora_experts_routed_forward, pair_order
from .routing import DispatchMetadata, dispatch_metadata, route_topk_backward, route_topk_triton

BACKENDS = ("auto", "triton", "torch")
CPU_PATHS = ("auto", "dense", "routed")


def backend_for(t: torch.Tensor) -> str:
    """"triton" or "torch" for a tensor on t's device, after the CUMA_BACKEND override."""
    choice = os.environ.get("CUMA_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"CUMA_BACKEND must be auto, triton or torch, got {choice!r}")
    if choice == "auto":
        return "triton" if t.is_cuda else "torch"
    return choice


# ---------------------------------------------------------------------------------------------- routing


@torch.library.custom_op("cuma::route_topk", mutates_args=())
def _route_topk_op(logits: torch.Tensor, top_k: int, mode: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return route_topk_triton(logits, top_k, mode)
    weights, idx = route_topk_torch(logits, top_k, mode)
    return weights.contiguous(), idx.contiguous()


@_route_topk_op.register_fake
def _(logits, top_k, mode, backend):
    T = logits.shape[0]
    return (logits.new_empty(T, top_k, dtype=torch.float32), logits.new_empty(T, top_k, dtype=torch.int32))


def _route_setup(ctx, inputs, output):
    logits, _, mode, _ = inputs
    weights, idx = output
    ctx.mode = mode
    ctx.mark_non_differentiable(idx)
    ctx.save_for_backward(logits, weights, idx)


def _route_backward(ctx, grad_weights, grad_idx):
    logits, weights, idx = ctx.saved_tensors
    d_logits = route_topk_backward(logits, weights, idx, grad_weights, ctx.mode)
    return d_logits.to(logits.dtype), None, None, None


torch.library.register_autograd("cuma::route_topk", _route_backward, setup_context=_route_setup)


def route_topk(logits: torch.Tensor, top_k: int, mode: str = "cuma") -> tuple[torch.Tensor, torch.Tensor]:
    """Router tail: softmax over experts, top-k (ties to the lower index), renormalise by `mode`.

    logits [T, E] (any float dtype; computed in fp32) -> (topk_weights [T, k] float32, topk_idx [T, k] int32).
    Modes: "cuma" (softmax over the k selected probabilities), "sum" (p / sum p), "soft" (raw probabilities).
    Differentiable w.r.t. logits through the weights.
    """
    if logits.dim() != 2:
        raise ValueError(f"route_topk expects logits of shape [T, E], got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"route_topk expects floating-point logits, got {logits.dtype}")
    if not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={logits.shape[1]}]")
    if mode not in ROUTING_MODES:
        raise ValueError(f"unknown routing mode {mode!r}; expected one of {ROUTING_MODES}")
    return _route_topk_op(logits, int(top_k), mode, backend_for(logits))


# ------------------------------------------------------------------------------------------ LoRA experts


# Cost model of the torch path's choice, per token and per input/output feature, in multiply-adds: the dense form
# does E*r; the routed form does k*r plus, per (token, slot) pair, one gathered or scattered row, which on one core
# costs about ROUTED_ROW_COST multiply-adds (memory-bound: ~0.7 ns per element against ~90 GFLOP/s GEMMs).
# Measured forward+backward, 1 thread, fp32 (dense ms / routed ms):
#   T=4096 K=N=1024 r=16 E=8  k=2: 1.14 (128 vs 2*(16+48) = 128: routed, the break-even line)
#   T=768  K=N=576  r=8  E=8  k=2: 0.78, N=192: 0.74 (64 vs 112: dense; the SmolLM2-135M q/v layer)
#   T=768  K=N=576  r=8  E=16 k=2: 0.96 (128 vs 112: routed, about even); E=64: 1.64; E=4: 0.57
# Short segments lose to the per-GEMM overhead, so routed also needs >= ROUTED_MIN_PAIRS_PER_EXPERT pairs per
# expert on average (T=256, E=64, k=2 measured 1.13 but stays dense: the rule errs toward the dense form).
ROUTED_ROW_COST = 48
ROUTED_MIN_PAIRS_PER_EXPERT = 64


def torch_expert_path(T: int, rank: int, num_experts: int, top_k: int) -> str:
    """"dense" or "routed": the form of the torch path for these shapes, after the CUMA_CPU_PATH override.

    Routed when E*r >= k*(r + ROUTED_ROW_COST) and T*k >= ROUTED_MIN_PAIRS_PER_EXPERT * E (see the cost model
    above); the choice depends on shapes only.
    """
    choice = os.environ.get("CUMA_CPU_PATH", "auto")
    if choice == "auto":
        routed = (num_experts * rank >= top_k * (rank + ROUTED_ROW_COST)
                  and T * top_k >= ROUTED_MIN_PAIRS_PER_EXPERT * num_experts)
        return "routed" if routed else "dense"
    if choice not in CPU_PATHS:
        raise ValueError(f"CUMA_CPU_PATH must be auto, dense or routed, got {choice!r}")
    return choice


def _saved_h_shape(backend: str, T: int, num_a: int, num_experts: int, rank: int, top_k: int) -> tuple[int, int]:
    """Shape of the saved shrink output. backend: "triton", "torch" (dense form) or "torch_routed"."""
    layout = "shared" if num_a == 1 else "dense"
    if backend == "torch_routed" and num_a != 1:
        layout = "pairs"
    if backend == "triton":
        layout = h_layout(num_a, num_experts, rank)
    if layout == "shared":
        return T, rank
    if layout == "dense":
        return T, num_experts * rank
    return T * top_k, rank


@torch.library.custom_op("cuma::lora_experts_fwd", mutates_args=())
def _lora_experts_fwd(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    scaling: float,
    base_out: Optional[torch.Tensor],
    sort_order: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
    token_order: Optional[torch.Tensor],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return lora_experts_triton_forward(x, lora_A, lora_B, topk_idx, topk_weights, scaling, base_out, sort_order,
                                           token_order)
    if backend == "torch_routed":
        return lora_experts_routed_forward(x, lora_A, lora_B, topk_idx, topk_weights, scaling, base_out, sort_order,
                                           offsets)
    y, h = lora_experts_torch_forward(x, lora_A, lora_B, topk_idx, topk_weights, scaling, base_out)
    return y, h.contiguous()


@_lora_experts_fwd.register_fake
def _(x, lora_A, lora_B, topk_idx, topk_weights, scaling, base_out, sort_order, offsets, token_order, backend):
    T, top_k = topk_idx.shape
    num_experts, n, rank = lora_B.shape
    h_shape = _saved_h_shape(backend, T, lora_A.shape[0], num_experts, rank, top_k)
    compute = x.dtype if backend != "triton" and x.dtype == torch.float64 else torch.float32
    return x.new_empty(T, n), x.new_empty(h_shape, dtype=compute)


@torch.library.custom_op("cuma::lora_experts_bwd", mutates_args=())
def _lora_experts_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    h: torch.Tensor,
    scaling: float,
    sort_order: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        dx, d_a, d_b, d_w = lora_experts_triton_backward(
            grad_y, x, lora_A, lora_B, topk_idx, topk_weights, h, scaling, sort_order, offsets)
        return dx, d_a, d_b, d_w.to(topk_weights.dtype)
    if backend == "torch_routed":
        return lora_experts_routed_backward(grad_y, x, lora_A, lora_B, topk_idx, topk_weights, h, scaling, sort_order,
                                            offsets)
    return lora_experts_torch_backward(grad_y, x, lora_A, lora_B, topk_idx, topk_weights, h, scaling)


@_lora_experts_bwd.register_fake
def _(grad_y, x, lora_A, lora_B, topk_idx, topk_weights, h, scaling, sort_order, offsets, backend):
    return (torch.empty_like(x), torch.empty_like(lora_A), torch.empty_like(lora_B), torch.empty_like(topk_weights))


def _lora_setup(ctx, inputs, output):
    x, lora_A, lora_B, topk_idx, topk_weights, scaling, base_out, sort_order, offsets, _, backend = inputs
    _, h = output
    ctx.mark_non_differentiable(h)
    ctx.scaling = scaling
    ctx.backend = backend
    ctx.has_base = base_out is not None
    ctx.save_for_backward(x, lora_A, lora_B, topk_idx, topk_weights, h, sort_order, offsets)


def _lora_backward(ctx, grad_y, grad_h):
    x, lora_A, lora_B, topk_idx, topk_weights, h, sort_order, offsets = ctx.saved_tensors
    dx, d_a, d_b, d_w = _lora_experts_bwd(
        grad_y, x, lora_A, lora_B, topk_idx, topk_weights, h, ctx.scaling, sort_order, offsets, ctx.backend)
    d_base = grad_y if ctx.has_base else None
    return dx, d_a, d_b, None, d_w, None, d_base, None, None, None, None


torch.library.register_autograd("cuma::lora_experts_fwd", _lora_backward, setup_context=_lora_setup)


def _check_expert_inputs(x, lora_A, lora_B, topk_idx, topk_weights, base_out) -> None:
    def shape(t):
        return tuple(t.shape)

    if x.dim() != 2:
        raise ValueError(f"x must have shape [T, K], got {shape(x)}")
    if lora_B.dim() != 3:
        raise ValueError(f"lora_B must have shape [E, N, r], got {shape(lora_B)}")
    num_experts, n, rank = lora_B.shape
    T, kd = x.shape
    if lora_A.dim() != 3 or lora_A.shape[0] not in (1, num_experts) or lora_A.shape[1:] != (rank, kd):
        raise ValueError(f"lora_A must have shape [E={num_experts}, r={rank}, K={kd}] or [1, {rank}, {kd}], "
                         f"got {shape(lora_A)}")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != T:
        raise ValueError(f"topk_idx must have shape [T={T}, k], got {shape(topk_idx)}")
    if topk_weights.shape != topk_idx.shape:
        raise ValueError(f"topk_weights must have the shape of topk_idx {shape(topk_idx)}, got {shape(topk_weights)}")
    if base_out is not None and base_out.shape != (T, n):
        raise ValueError(f"base_out must have shape [T={T}, N={n}], got {shape(base_out)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)) + ((("base_out", base_out),) if base_out is not None
                                                              else ()):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype")
    if topk_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_idx must be int32 or int64, got {topk_idx.dtype}")
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights must be floating point, got {topk_weights.dtype}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("topk_idx", topk_idx), ("topk_weights", topk_weights)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    # Range check: on the host for CPU tensors; on CUDA a device-side assert (no sync; an out-of-range index
    # would otherwise make the kernels read foreign memory silently). Skipped while tracing.
    if topk_idx.numel() and not torch.compiler.is_compiling():
        if topk_idx.is_cuda:
            torch._assert_async(((topk_idx >= 0) & (topk_idx < num_experts)).all(),
                                f"topk_idx values must be in [0, {num_experts})")
        else:
            lo, hi = (int(v) for v in torch.aminmax(topk_idx))
            if lo < 0 or hi >= num_experts:
                raise IndexError(f"topk_idx values must be in [0, {num_experts}), got min {lo} and max {hi}")


def lora_experts(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor | None = None,
    dispatch: DispatchMetadata | None = None,
) -> torch.Tensor:
    """Mixture of LoRA experts: y = base_out + scaling * sum_j w_tj * B_{e_tj} A_{e_tj} x_t.

    x [T, K]; lora_A [E, r, K] or [1, r, K] (one shared A); lora_B [E, N, r]; all three in one float dtype.
    topk_idx [T, k] int32/int64; topk_weights [T, k] float; base_out [T, N] in x's dtype, or None.
    dispatch: `dispatch_metadata(topk_idx, E)`, computed once per router and shared by the modules that use it
    (when None, the Triton backend computes it here and the routed torch path sorts the pairs itself).
    Returns y [T, N] in x's dtype (fp32 accumulation). Differentiable w.r.t. x, lora_A, lora_B, topk_weights
    and base_out.
    """
    _check_expert_inputs(x, lora_A, lora_B, topk_idx, topk_weights, base_out)
    backend = backend_for(x)
    sort_order = offsets = token_order = None
    if backend == "triton":
        if dispatch is None:
            dispatch = dispatch_metadata(topk_idx, lora_B.shape[0])
        sort_order, offsets, token_order = dispatch.sort_order, dispatch.offsets, dispatch.token_order
    elif torch_expert_path(x.shape[0], lora_B.shape[2], lora_B.shape[0], topk_idx.shape[1]) == "routed":
        backend = "torch_routed"
        if dispatch is None:
            sort_order, offsets = pair_order(topk_idx, lora_B.shape[0])
        else:
            sort_order, offsets = dispatch.sort_order, dispatch.offsets
    y, _ = _lora_experts_fwd(x, lora_A, lora_B, topk_idx, topk_weights, float(scaling), base_out, sort_order,
                             offsets, token_order, backend)
    return y

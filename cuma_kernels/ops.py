"""Public ops and backend choice: CUDA tensors -> Triton, CPU tensors -> the vectorised torch path.

`CUMA_BACKEND=triton|torch|auto` overrides the choice (triton on CPU means the Triton interpreter).
The torch path of `lora_experts` has two forms, chosen per call from the shapes (`torch_expert_path`):
the dense gated form (`reference.py`, every expert for every token) and the routed form (`routed_cpu.py`, only
the routed (token, slot) pairs). `CUMA_CPU_PATH=dense|routed|auto` overrides that choice.
The ops are `torch.library` custom ops with fake implementations, so they trace under
`torch.compile(fullgraph=True)` as opaque nodes; routing registers its autograd on the op, the experts' forward
(which writes into its output, possibly the base output in place) gets it from a `torch.autograd.Function`.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import grouped_lora
from .grouped_lora import lora_experts_triton_backward, lora_experts_triton_forward
from .reference import (
    ROUTING_MODES,
    _compute_dtype,
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


def _saved_h(backend: str, x: torch.Tensor, num_a: int, num_experts: int, rank: int, top_k: int) -> torch.Tensor:
    """An empty tensor shaped like the saved shrink output. backend: "triton", "torch" (dense form) or
    "torch_routed". Triton keeps h in x's dtype; the torch forms in their compute dtype (fp32 for half types)."""
    T = x.shape[0]
    if num_a == 1:
        shape = (T, rank)
    elif backend == "torch":
        shape = (T, num_experts * rank)
    else:
        shape = (T * top_k, rank)
    dtype = x.dtype if backend == "triton" else _compute_dtype(x.dtype)
    return x.new_empty(shape, dtype=dtype)


# The forward writes into `out`, which is either a fresh tensor or, with accumulate=True, the base output itself
# (the expert output is added in place: no extra [T, N] pass). A mutating op cannot take register_autograd, so
# autograd is the Function below, which marks the base output dirty.
@torch.library.custom_op("cuma::lora_experts_fwd", mutates_args=("out",))
def _lora_experts_fwd(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    scaling: float,
    out: torch.Tensor,
    base_out: Optional[torch.Tensor],
    accumulate: bool,
    sort_order: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
    token_order: Optional[torch.Tensor],
    backend: str,
) -> torch.Tensor:
    if backend == "triton":
        return lora_experts_triton_forward(x, lora_A, lora_B, topk_idx, topk_weights, scaling, out, base_out,
                                           accumulate, token_order, sort_order)
    base = out if accumulate else base_out
    if backend == "torch_routed":
        y, h = lora_experts_routed_forward(x, lora_A, lora_B, topk_idx, topk_weights, scaling, base, sort_order,
                                           offsets)
    else:
        y, h = lora_experts_torch_forward(x, lora_A, lora_B, topk_idx, topk_weights, scaling, base)
    out.copy_(y)
    return h.contiguous()


@_lora_experts_fwd.register_fake
def _(x, lora_A, lora_B, topk_idx, topk_weights, scaling, out, base_out, accumulate, sort_order, offsets,
      token_order, backend):
    return _saved_h(backend, x, lora_A.shape[0], lora_B.shape[0], lora_B.shape[2], topk_idx.shape[1])


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
    token_order: Optional[torch.Tensor],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        dx, d_a, d_b, d_w = lora_experts_triton_backward(
            grad_y, x, lora_A, lora_B, topk_idx, topk_weights, h, scaling, sort_order, offsets, token_order)
        return dx, d_a, d_b, d_w.to(topk_weights.dtype)
    if backend == "torch_routed":
        return lora_experts_routed_backward(grad_y, x, lora_A, lora_B, topk_idx, topk_weights, h, scaling, sort_order,
                                            offsets)
    return lora_experts_torch_backward(grad_y, x, lora_A, lora_B, topk_idx, topk_weights, h, scaling)


@_lora_experts_bwd.register_fake
def _(grad_y, x, lora_A, lora_B, topk_idx, topk_weights, h, scaling, sort_order, offsets, token_order, backend):
    return (torch.empty_like(x), torch.empty_like(lora_A), torch.empty_like(lora_B), torch.empty_like(topk_weights))


class _LoraExperts(torch.autograd.Function):
    # base_out comes first: when it is a view modified in place, autograd (CopySlices) takes the first
    # gradient returned as the modified tensor's
    @staticmethod
    def forward(ctx, base_out, x, lora_A, lora_B, topk_weights, topk_idx, scaling, sort_order, offsets, token_order,
                backend, inplace):
        if inplace:
            out = base_out
            h = _lora_experts_fwd(x, lora_A, lora_B, topk_idx, topk_weights, scaling, out, None, True, sort_order,
                                  offsets, token_order, backend)
            ctx.mark_dirty(out)
        else:
            out = x.new_empty(x.shape[0], lora_B.shape[1])
            h = _lora_experts_fwd(x, lora_A, lora_B, topk_idx, topk_weights, scaling, out, base_out, False,
                                  sort_order, offsets, token_order, backend)
        ctx.scaling, ctx.backend, ctx.has_base = scaling, backend, base_out is not None
        ctx.save_for_backward(x, lora_A, lora_B, topk_idx, topk_weights, h, sort_order, offsets, token_order)
        return out

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_A, lora_B, topk_idx, topk_weights, h, sort_order, offsets, token_order = ctx.saved_tensors
        dx, d_a, d_b, d_w = _lora_experts_bwd(grad_y, x, lora_A, lora_B, topk_idx, topk_weights, h, ctx.scaling,
                                              sort_order, offsets, token_order, ctx.backend)
        d_base = grad_y if ctx.has_base else None
        return d_base, dx, d_a, d_b, d_w, None, None, None, None, None, None, None


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


def expert_plan(x, lora_A, lora_B, topk_idx, dispatch: DispatchMetadata | None):
    """(backend, sort_order, offsets, token_order) of the experts' ops for this call: "triton" (with the dispatch
    metadata, computed here when None), "torch_routed" (with the expert-sorted pairs) or "torch" (dense form)."""
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
    return backend, sort_order, offsets, token_order


def lora_experts(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor | None = None,
    dispatch: DispatchMetadata | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Mixture of LoRA experts: y = base_out + scaling * sum_j w_tj * B_{e_tj} A_{e_tj} x_t.

    x [T, K]; lora_A [E, r, K] or [1, r, K] (one shared A); lora_B [E, N, r]; all three in one float dtype.
    topk_idx [T, k] int32/int64; topk_weights [T, k] float; base_out [T, N] in x's dtype, or None.
    dispatch: `dispatch_metadata(topk_idx, E)`, computed once per router and shared by the modules that use it
    (when None, the Triton backend computes it here and the routed torch path sorts the pairs itself).
    inplace: add into base_out and return it (no extra [T, N] pass). Its old value is lost, so base_out must be a
    tensor nobody reads afterwards, e.g. a freshly computed base layer output; autograd rejects a leaf that
    requires grad, and raises at backward time if another op saved base_out for its gradient.
    Returns y [T, N] in x's dtype (fp32 accumulation). Differentiable w.r.t. x, lora_A, lora_B, topk_weights
    and base_out.
    """
    _check_expert_inputs(x, lora_A, lora_B, topk_idx, topk_weights, base_out)
    if inplace and base_out is None:
        raise ValueError("inplace=True needs a base_out to add into")
    if inplace and base_out.is_leaf and base_out.requires_grad and torch.is_grad_enabled():
        raise ValueError("inplace=True cannot add into a leaf tensor that requires grad; pass inplace=False")
    backend, sort_order, offsets, token_order = expert_plan(x, lora_A, lora_B, topk_idx, dispatch)
    return _LoraExperts.apply(base_out, x, lora_A, lora_B, topk_weights, topk_idx, float(scaling), sort_order,
                              offsets, token_order, backend, inplace)


# ------------------------------------------------------------------- the shrink and the expand as two ops
# Projections that share a router and an input (q/k/v, gate/up) run one shrink over their A's concatenated along r
# (x read once) and one expand each; autograd adds the siblings' dh into the one shrink's backward (one dx and one
# dA launch for all of them). Triton backend only: the torch path keeps `lora_experts` per projection.


@torch.library.custom_op("cuma::lora_shrink", mutates_args=())
def _lora_shrink_op(x: torch.Tensor, lora_A: torch.Tensor, topk_idx: torch.Tensor, sort_order: torch.Tensor,
                    offsets: torch.Tensor, token_order: torch.Tensor) -> torch.Tensor:
    return grouped_lora.lora_shrink(x.contiguous(), lora_A.contiguous(), topk_idx.to(torch.int32).contiguous(),
                                    token_order, sort_order)


@_lora_shrink_op.register_fake
def _(x, lora_A, topk_idx, sort_order, offsets, token_order):
    return x.new_empty(topk_idx.shape[0] * topk_idx.shape[1], lora_A.shape[1])


@torch.library.custom_op("cuma::lora_shrink_bwd", mutates_args=())
def _lora_shrink_bwd_op(grad_h: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, topk_idx: torch.Tensor,
                        sort_order: torch.Tensor, offsets: torch.Tensor,
                        token_order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return grouped_lora.lora_shrink_backward(grad_h, x, lora_A, topk_idx, sort_order, offsets, token_order)


@_lora_shrink_bwd_op.register_fake
def _(grad_h, x, lora_A, topk_idx, sort_order, offsets, token_order):
    return torch.empty_like(x), torch.empty_like(lora_A)


def _shrink_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _shrink_backward(ctx, grad_h):
    x, lora_A, topk_idx, sort_order, offsets, token_order = ctx.saved_tensors
    dx, d_a = _lora_shrink_bwd_op(grad_h, x, lora_A, topk_idx, sort_order, offsets, token_order)
    return dx, d_a, None, None, None, None


torch.library.register_autograd("cuma::lora_shrink", _shrink_backward, setup_context=_shrink_setup)


@torch.library.custom_op("cuma::lora_expand_fwd", mutates_args=("out",))
def _lora_expand_fwd(h: torch.Tensor, lora_B: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                     scaling: float, out: torch.Tensor, base_out: Optional[torch.Tensor], accumulate: bool,
                     token_order: torch.Tensor) -> None:
    grouped_lora.lora_expand(h, lora_B.contiguous(), topk_idx.to(torch.int32).contiguous(),
                             topk_weights.to(torch.float32).contiguous(), scaling, out, token_order, base_out,
                             accumulate)


@_lora_expand_fwd.register_fake
def _(h, lora_B, topk_idx, topk_weights, scaling, out, base_out, accumulate, token_order):
    return None


@torch.library.custom_op("cuma::lora_expand_bwd", mutates_args=())
def _lora_expand_bwd(grad_y: torch.Tensor, h: torch.Tensor, lora_B: torch.Tensor, topk_idx: torch.Tensor,
                     topk_weights: torch.Tensor, scaling: float, sort_order: torch.Tensor, offsets: torch.Tensor,
                     token_order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dh, d_b, d_w = grouped_lora.lora_expand_backward(grad_y, h, lora_B, topk_idx, topk_weights, scaling, sort_order,
                                                     offsets, token_order)
    return dh, d_b, d_w.to(topk_weights.dtype)


@_lora_expand_bwd.register_fake
def _(grad_y, h, lora_B, topk_idx, topk_weights, scaling, sort_order, offsets, token_order):
    return h.new_empty(h.shape), torch.empty_like(lora_B), torch.empty_like(topk_weights)


class _LoraExpand(torch.autograd.Function):
    # base_out first, as in _LoraExperts
    @staticmethod
    def forward(ctx, base_out, h, lora_B, topk_weights, topk_idx, scaling, sort_order, offsets, token_order, inplace):
        if inplace:
            out = base_out
            _lora_expand_fwd(h, lora_B, topk_idx, topk_weights, scaling, out, None, True, token_order)
            ctx.mark_dirty(out)
        else:
            out = h.new_empty(topk_idx.shape[0], lora_B.shape[1])
            _lora_expand_fwd(h, lora_B, topk_idx, topk_weights, scaling, out, base_out, False, token_order)
        ctx.scaling, ctx.has_base = scaling, base_out is not None
        ctx.save_for_backward(h, lora_B, topk_idx, topk_weights, sort_order, offsets, token_order)
        return out

    @staticmethod
    def backward(ctx, grad_y):
        h, lora_B, topk_idx, topk_weights, sort_order, offsets, token_order = ctx.saved_tensors
        dh, d_b, d_w = _lora_expand_bwd(grad_y, h, lora_B, topk_idx, topk_weights, ctx.scaling, sort_order, offsets,
                                        token_order)
        return grad_y if ctx.has_base else None, dh, d_b, d_w, None, None, None, None, None, None


def _triton_dispatch(t: torch.Tensor, topk_idx: torch.Tensor, num_experts: int,
                     dispatch: DispatchMetadata | None) -> DispatchMetadata:
    if backend_for(t) != "triton":
        raise RuntimeError("lora_shrink / lora_expand run on the Triton backend only (CUDA, or CUMA_BACKEND=triton "
                           "under the interpreter); use lora_experts elsewhere")
    return dispatch if dispatch is not None else dispatch_metadata(topk_idx, num_experts)


def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, topk_idx: torch.Tensor, num_experts: int,
                dispatch: DispatchMetadata | None = None) -> torch.Tensor:
    """The routed shrink alone: h [T*k, R] with row t*k+j = A_{e_tj} x_t (per-expert A), or x @ A0^T [T, R].

    x [T, K]; lora_A [E, R, K] or [1, R, K] in x's dtype, where R may be several projections' ranks side by side
    (their A's concatenated along r), so one launch reads x once for all of them. topk_idx [T, k] from a router
    over `num_experts` experts; dispatch as in `lora_experts`. h is in x's dtype and differentiable w.r.t. x and
    lora_A. Triton backend only.
    """
    if lora_A.shape[0] == 1:  # shared A: one dense GEMM, differentiated by autograd itself
        return grouped_lora.lora_shrink(x, lora_A, topk_idx, None, None)
    dispatch = _triton_dispatch(x, topk_idx, num_experts, dispatch)
    return _lora_shrink_op(x, lora_A, topk_idx, dispatch.sort_order, dispatch.offsets, dispatch.token_order)


def lora_expand(h: torch.Tensor, lora_B: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                scaling: float, base_out: torch.Tensor | None = None, dispatch: DispatchMetadata | None = None,
                inplace: bool = False) -> torch.Tensor:
    """The routed expand alone: base_out + scaling * sum_j w_tj * B_{e_tj} h_tj, [T, N] in h's dtype.

    h [T*k, r] per pair or [T, r] shared (e.g. a column slice of `lora_shrink`'s output); lora_B [E, N, r];
    topk_idx, topk_weights, base_out, dispatch and inplace as in `lora_experts`. Differentiable w.r.t. h, lora_B,
    topk_weights and base_out. Triton backend only.
    """
    T = topk_idx.shape[0]
    if h.dim() != 2 or h.shape[0] not in (T, T * topk_idx.shape[1]) or h.shape[1] != lora_B.shape[2]:
        raise ValueError(f"h must have shape [T*k or T, r={lora_B.shape[2]}], got {tuple(h.shape)}")
    if base_out is not None and base_out.shape != (T, lora_B.shape[1]):
        raise ValueError(f"base_out must have shape [T={T}, N={lora_B.shape[1]}], got {tuple(base_out.shape)}")
    if inplace and base_out is None:
        raise ValueError("inplace=True needs a base_out to add into")
    if inplace and base_out.is_leaf and base_out.requires_grad and torch.is_grad_enabled():
        raise ValueError("inplace=True cannot add into a leaf tensor that requires grad; pass inplace=False")
    dispatch = _triton_dispatch(h, topk_idx, lora_B.shape[0], dispatch)
    return _LoraExpand.apply(base_out, h, lora_B, topk_weights, topk_idx, float(scaling), dispatch.sort_order,
                             dispatch.offsets, dispatch.token_order, inplace)

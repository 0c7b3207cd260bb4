"""Grouped LoRA experts in Triton: shrink, token-major expand, and the backward kernels.

Shapes: x [T, K], lora_A [E, r, K] (or [1, r, K] shared "Hydra" A), lora_B [E, N, r], topk_idx / topk_weights
[T, k]. Forward: y = base_out + scaling * sum_j w_tj * B_{e_tj} (A_{e_tj} x_t). Semantics: `reference.py`.

The shrink output h (always fp32) comes in one of three layouts, chosen from the shapes alone so that the
fake (meta) implementation can predict it:
- "shared": [T, r], one dense GEMM x @ A^T (shared A).
- "dense":  [T, E*r], one dense GEMM x @ A_cat^T, while E*r <= DENSE_SHRINK_MAX (cheap next to the base GEMM).
- "pairs":  [T*k, r], row t*k+j = A_{e_tj} x_t, a grouped GEMM over the tokens sorted by expert.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import interpreting, rank_block, tune_configs

DENSE_SHRINK_MAX = 1024


def h_layout(num_a: int, num_experts: int, rank: int) -> str:
    """Layout of the saved shrink output for an A of shape [num_a, rank, K] (see the module docstring)."""
    if num_a == 1:
        return "shared"
    return "dense" if num_experts * rank <= DENSE_SHRINK_MAX else "pairs"


def h_strides(layout: str, num_experts: int, top_k: int, rank: int) -> tuple[int, int, int]:
    """(per token, per slot, per expert) element strides that locate h_tj inside each layout."""
    if layout == "shared":
        return rank, 0, 0
    if layout == "dense":
        return num_experts * rank, 0, rank
    return top_k * rank, rank, 0


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # The interpreter multiplies bf16 bit patterns as integers, so tiles are upcast there. On a GPU, fp32
    # operands take the exact path: TF32 would break the fp32 tolerance; bf16/fp16 use tensor cores.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    else:
        b = b.to(a.dtype)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


# out[row, c] = scale * sum_kk X[src, kk] * W[e, c, kk]. Dense mode: row = src = m, e = 0.
# Grouped mode: positions m walk the expert-sorted (token, slot) pairs, so a tile touches one or two experts;
# the tile loops over the experts it holds (a dynamic range), masking the other rows. Used for the grouped
# shrink (W = A) and, in the backward, for dh = scale * dy @ B_e (W = B_e^T through strides).
@triton.autotune(
    configs=tune_configs(
        [{"BLOCK_M": 64, "BLOCK_K": 64}, {"BLOCK_M": 128, "BLOCK_K": 64}, {"BLOCK_M": 64, "BLOCK_K": 128}],
        {"BLOCK_M": 64, "BLOCK_K": 64},
    ),
    key=["R", "KD", "GROUPED"],
)
@triton.jit
def _gather_matmul_kernel(
    x_ptr, stride_xm, stride_xk,
    w_ptr, stride_we, stride_wr, stride_wk,
    out_ptr, stride_om, stride_or,
    order_ptr, expert_ptr,
    M, R, KD, scale,
    TOP_K: tl.constexpr, GROUPED: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    if GROUPED:
        pair = tl.load(order_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        src = pair // TOP_K
        dst = pair
        expert = tl.load(expert_ptr + pair, mask=m_mask, other=0)
        e_lo = tl.min(tl.where(m_mask, expert, 1 << 30), axis=0)
        e_hi = tl.max(tl.where(m_mask, expert, -1), axis=0)
    else:
        src = offs_m.to(tl.int64)
        dst = src
        expert = tl.zeros((BLOCK_M,), dtype=tl.int32)
        e_lo = 0
        e_hi = 0
    for ex in range(e_lo, e_hi + 1):
        rows = m_mask & (expert == ex)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        w_base = w_ptr + ex * stride_we
        for k0 in range(0, KD, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < KD
            xt = tl.load(x_ptr + src[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=rows[:, None] & k_mask[None, :], other=0.0)
            wt = tl.load(w_base + offs_r[None, :] * stride_wr + offs_k[:, None] * stride_wk,
                         mask=r_mask[None, :] & k_mask[:, None], other=0.0)
            acc = _mma(xt, wt, acc, UPCAST, IEEE)
        tl.store(out_ptr + dst[:, None] * stride_om + offs_r[None, :] * stride_or, acc * scale,
                 mask=rows[:, None] & r_mask[None, :])


# Token-major expand: a program owns BLOCK_T tokens x BLOCK_N outputs and adds every expert's contribution
# in registers, so each output element is written once (deterministic, no atomics). For each expert present
# in the tile it builds the gated [BLOCK_T, r] slice (sum over the token's slots that chose it of g * h) and
# multiplies by B_e^T. Experts absent from the tile are skipped, so tiles are filled in `token_order` (tokens
# grouped by their set of experts) when it is given: a tile then holds few distinct experts, and the work per
# token falls from E*r towards k*r. Rows are gathered and scattered by that permutation; each row is still
# written by exactly one program. The rank dimension is padded to >= 16.
@triton.autotune(
    configs=tune_configs(
        [{"BLOCK_T": 64, "BLOCK_N": 64}, {"BLOCK_T": 64, "BLOCK_N": 128}, {"BLOCK_T": 128, "BLOCK_N": 128,
                                                                            "num_warps": 8}],
        {"BLOCK_T": 32, "BLOCK_N": 64},
    ),
    key=["N", "R", "E", "HAS_BASE"],
)
@triton.jit
def _expand_kernel(
    h_ptr, stride_ht, stride_hj, stride_he,
    b_ptr, stride_be, stride_bn, stride_br,
    idx_ptr, gate_ptr, token_order_ptr,
    base_ptr, stride_st, stride_sn,
    out_ptr, stride_ot, stride_on,
    T, N, R, E, scaling,
    TOP_K: tl.constexpr, HAS_BASE: tl.constexpr, PERMUTED: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    slots = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_mask = slots < T
    if PERMUTED:
        rows = tl.load(token_order_ptr + slots, mask=t_mask, other=0).to(tl.int64)
    else:
        rows = slots
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = cols < N
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R

    e_lo = E
    e_hi = -1
    for j in tl.static_range(TOP_K):
        ej = tl.load(idx_ptr + rows * TOP_K + j, mask=t_mask, other=0)
        e_lo = tl.minimum(e_lo, tl.min(tl.where(t_mask, ej, E), axis=0))
        e_hi = tl.maximum(e_hi, tl.max(tl.where(t_mask, ej, -1), axis=0))

    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for ex in range(e_lo, e_hi + 1):
        hg = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        hits = 0
        for j in tl.static_range(TOP_K):
            ej = tl.load(idx_ptr + rows * TOP_K + j, mask=t_mask, other=-1)
            gj = tl.load(gate_ptr + rows * TOP_K + j, mask=t_mask, other=0.0)
            sel = t_mask & (ej == ex)
            hits += tl.sum(sel.to(tl.int32), axis=0)
            hj = tl.load(h_ptr + rows[:, None] * stride_ht + j * stride_hj + ex * stride_he + offs_r[None, :],
                         mask=sel[:, None] & r_mask[None, :], other=0.0)
            hg += hj * gj[:, None]
        if hits > 0:
            bt = tl.load(b_ptr + ex * stride_be + offs_r[:, None] * stride_br + cols[None, :] * stride_bn,
                         mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            if UPCAST:
                acc = _mma(hg, bt, acc, UPCAST, IEEE)
            else:
                acc = _mma(hg.to(bt.dtype), bt, acc, UPCAST, IEEE)
    acc = acc * scaling
    mask = t_mask[:, None] & n_mask[None, :]
    if HAS_BASE:
        acc += tl.load(base_ptr + rows[:, None] * stride_st + cols[None, :] * stride_sn, mask=mask,
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_ot + cols[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=mask)


# dB_e = scaling * sum over e's sorted segment of dy_t^T (g_tj h_tj). One program per (expert, N tile) walks
# the segment [offsets[e], offsets[e+1]) in BLOCK_M chunks: each dB element is owned by one program, so there
# are no atomics and the sum order is fixed. An empty expert stores zeros.
@triton.autotune(
    configs=tune_configs(
        [{"BLOCK_M": 64, "BLOCK_N": 64}, {"BLOCK_M": 64, "BLOCK_N": 128}, {"BLOCK_M": 128, "BLOCK_N": 64}],
        {"BLOCK_M": 64, "BLOCK_N": 64},
    ),
    key=["N", "R", "E"],
)
@triton.jit
def _expand_weight_grad_kernel(
    dy_ptr, stride_dt, stride_dn,
    h_ptr, stride_ht, stride_hj, stride_he,
    gate_ptr, order_ptr, offsets_ptr,
    db_ptr, stride_be, stride_bn, stride_br,
    N, R, E, scaling,
    TOP_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    ex = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = cols < N
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    start = tl.load(offsets_ptr + ex)
    end = tl.load(offsets_ptr + ex + 1)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_M):
        pos = p0 + tl.arange(0, BLOCK_M)
        p_mask = pos < end
        pair = tl.load(order_ptr + pos, mask=p_mask, other=0).to(tl.int64)
        tok = pair // TOP_K
        slot = pair % TOP_K
        g = tl.load(gate_ptr + pair, mask=p_mask, other=0.0)
        h = tl.load(h_ptr + tok[:, None] * stride_ht + slot[:, None] * stride_hj + ex * stride_he + offs_r[None, :],
                    mask=p_mask[:, None] & r_mask[None, :], other=0.0)
        hg = h * g[:, None]
        dy = tl.load(dy_ptr + tok[:, None] * stride_dt + cols[None, :] * stride_dn,
                     mask=p_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(tl.trans(dy), hg, acc, UPCAST, IEEE)
    tl.store(db_ptr + ex * stride_be + cols[:, None] * stride_bn + offs_r[None, :] * stride_br,
             (acc * scaling).to(db_ptr.dtype.element_ty), mask=n_mask[:, None] & r_mask[None, :])


def _flags(dtype: torch.dtype) -> tuple[bool, bool]:
    upcast = interpreting()
    return upcast, (dtype == torch.float32 or upcast)


def gather_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    w_strides: tuple[int, int, int],
    rows_out: int,
    out_dim: int,
    scale: float = 1.0,
    topk_idx: torch.Tensor | None = None,
    sort_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 out [rows_out, out_dim] with out[row] = scale * W_e @ x[src] (W_e [out_dim, K] through `w_strides`).

    Dense when sort_order is None (row = src, expert 0); grouped otherwise: rows are flat (token, slot) pairs,
    src = pair // k, e = topk_idx.flat[pair], visited in the expert-sorted order `sort_order` [T*k].
    """
    kd = x.shape[1]
    out = torch.empty(rows_out, out_dim, dtype=torch.float32, device=x.device)
    if rows_out == 0 or out_dim == 0:
        return out
    if kd == 0:
        return out.zero_()
    grouped = sort_order is not None
    top_k = topk_idx.shape[1] if grouped else 1
    block_r = min(rank_block(out_dim), 128)
    upcast, ieee = _flags(x.dtype)
    order = sort_order if grouped else out
    experts = topk_idx if grouped else out
    grid = lambda meta: (triton.cdiv(rows_out, meta["BLOCK_M"]), triton.cdiv(out_dim, block_r))  # noqa: E731
    _gather_matmul_kernel[grid](
        x, x.stride(0), x.stride(1),
        w, w_strides[0], w_strides[1], w_strides[2],
        out, out.stride(0), out.stride(1),
        order, experts,
        rows_out, out_dim, kd, scale,
        TOP_K=top_k, GROUPED=grouped, UPCAST=upcast, IEEE=ieee, BLOCK_R=block_r,
    )
    return out


def lora_shrink(
    x: torch.Tensor, lora_A: torch.Tensor, topk_idx: torch.Tensor, sort_order: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, str]:
    """x [T, K], lora_A [E|1, r, K] (contiguous) -> (h fp32 in the layout h_layout() names, that layout)."""
    T = x.shape[0]
    num_a, rank, kd = lora_A.shape
    layout = h_layout(num_a, num_experts, rank)
    if layout == "pairs":
        h = gather_matmul(x, lora_A, (rank * kd, kd, 1), T * topk_idx.shape[1], rank,
                          topk_idx=topk_idx, sort_order=sort_order)
    else:
        h = gather_matmul(x, lora_A, (0, kd, 1), T, num_a * rank)
    return h, layout


def lora_expand(
    h: torch.Tensor,
    layout: str,
    lora_B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor | None,
    out_dtype: torch.dtype,
    token_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [T, N] (out_dtype) = base_out + scaling * sum_j g_tj B_{e_tj} h_tj. lora_B [E, N, r] contiguous,
    topk_idx [T, k] int32 and topk_weights [T, k] fp32 contiguous, base_out [T, N] or None, token_order [T]
    int64 (a permutation of the tokens, e.g. DispatchMetadata.token_order) or None."""
    T, top_k = topk_idx.shape
    num_experts, n, rank = lora_B.shape
    out = torch.empty(T, n, dtype=out_dtype, device=lora_B.device)
    if T == 0 or n == 0:
        return out
    sht, shj, she = h_strides(layout, num_experts, top_k, rank)
    upcast, ieee = _flags(lora_B.dtype)
    base = base_out if base_out is not None else out
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _expand_kernel[grid](
        h, sht, shj, she,
        lora_B, lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
        topk_idx, topk_weights, token_order if token_order is not None else topk_idx,
        base, base.stride(0), base.stride(1),
        out, out.stride(0), out.stride(1),
        T, n, rank, num_experts, scaling,
        TOP_K=top_k, HAS_BASE=base_out is not None, PERMUTED=token_order is not None, UPCAST=upcast, IEEE=ieee,
        BLOCK_R=rank_block(rank),
    )
    return out


def lora_experts_triton_forward(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor | None,
    sort_order: torch.Tensor,
    token_order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [T, N] in x's dtype, h fp32 saved for the backward). Inputs as in `lora_experts`; idx int32."""
    x, lora_A, lora_B = x.contiguous(), lora_A.contiguous(), lora_B.contiguous()
    topk_idx = topk_idx.to(torch.int32).contiguous()
    topk_weights = topk_weights.to(torch.float32).contiguous()
    if base_out is not None:
        base_out = base_out.contiguous()
    h, layout = lora_shrink(x, lora_A, topk_idx, sort_order, lora_B.shape[0])
    y = lora_expand(h, layout, lora_B, topk_idx, topk_weights, scaling, base_out, x.dtype, token_order)
    return y, h


def expert_weight_grad(
    dy: torch.Tensor,
    h: torch.Tensor,
    layout: str,
    gates: torch.Tensor,
    sort_order: torch.Tensor,
    offsets: torch.Tensor,
    out: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Fill out [E, N, r] (any strides, e.g. a permuted view) with scaling * sum_{pairs of e} dy_t^T (g_tj h_tj).

    dy [T, N]; h fp32 in `layout` (see h_strides); gates [T, k] fp32; sort_order/offsets from DispatchMetadata.
    """
    num_experts, n, rank = out.shape
    if n == 0 or rank == 0 or num_experts == 0:
        return out
    top_k = gates.shape[1]
    sht, shj, she = h_strides(layout, num_experts, top_k, rank)
    upcast, ieee = _flags(dy.dtype)
    grid = lambda meta: (num_experts, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _expand_weight_grad_kernel[grid](
        dy, dy.stride(0), dy.stride(1),
        h, sht, shj, she,
        gates, sort_order, offsets,
        out, out.stride(0), out.stride(1), out.stride(2),
        n, rank, num_experts, scaling,
        TOP_K=top_k, UPCAST=upcast, IEEE=ieee, BLOCK_R=rank_block(rank),
    )
    return out


def lora_experts_triton_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    h: torch.Tensor,
    scaling: float,
    sort_order: torch.Tensor,
    offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [T, K], dA like lora_A, dB like lora_B, d topk_weights [T, k] fp32).

    dh_tj = scaling * dy_t @ B_{e_tj} is a grouped GEMM over sorted pairs ([T*k, r], never [T, k, N]);
    dg_tj = dh_tj . h_tj (an r-length dot); dB runs per expert over its sorted segment.
    dA and dx: dense GEMMs over the scattered [T, E*r] (or [T, r]) gradient while E*r is small; in the grouped
    ("pairs") layout they reuse the sparse kernels instead (dx is an expand through A^T, dA_e^T a segment sum
    like dB), so no [T, E*r] tensor is ever built.
    """
    grad_y = grad_y.contiguous()
    x, lora_A, lora_B = x.contiguous(), lora_A.contiguous(), lora_B.contiguous()
    topk_idx = topk_idx.to(torch.int32).contiguous()
    gates = topk_weights.to(torch.float32).contiguous()
    T, top_k = topk_idx.shape
    num_experts, n, rank = lora_B.shape
    num_a, _, kd = lora_A.shape
    layout = h_layout(num_a, num_experts, rank)
    idx64 = topk_idx.long()

    dh_raw = gather_matmul(grad_y, lora_B, (n * rank, 1, rank), T * top_k, rank, scale=scaling,
                           topk_idx=topk_idx, sort_order=sort_order)
    dh = dh_raw.view(T, top_k, rank)
    if layout == "shared":
        h_pairs = h[:, None, :].expand(T, top_k, rank)
    elif layout == "dense":
        h_pairs = h.view(T, num_experts, rank).gather(1, idx64[:, :, None].expand(T, top_k, rank))
    else:
        h_pairs = h.view(T, top_k, rank)
    d_gates = (dh * h_pairs).sum(-1)

    if layout == "pairs":
        dx = lora_expand(dh_raw, "pairs", lora_A.permute(0, 2, 1), topk_idx, gates, 1.0, None, x.dtype)
        d_a = torch.empty_like(lora_A)
        expert_weight_grad(x, dh_raw, "pairs", gates, sort_order, offsets, d_a.permute(0, 2, 1), 1.0)
    else:
        dh = dh * gates[:, :, None]
        if layout == "shared":
            dh_dense = dh.sum(1)  # [T, r]
        else:
            dh_dense = torch.zeros(T, num_experts, rank, dtype=torch.float32, device=x.device)
            dh_dense.scatter_add_(1, idx64[:, :, None].expand(T, top_k, rank), dh)
            dh_dense = dh_dense.view(T, num_experts * rank)
        a_cat = lora_A.view(num_a * rank, kd)
        dh_c = dh_dense.to(x.dtype)
        dx = dh_c @ a_cat
        d_a = (dh_c.t() @ x).view(num_a, rank, kd)

    d_b = expert_weight_grad(grad_y, h, layout, gates, sort_order, offsets, torch.empty_like(lora_B), scaling)
    return dx, d_a, d_b, d_gates

"""Routed LoRA experts in Triton: every GEMM of the forward and the backward touches only the routed pairs.

Shapes: x [T, K], lora_A [E, r, K] (or [1, r, K] shared "Hydra" A), lora_B [E, N, r], topk_idx / topk_weights
[T, k]. Forward: y = base_out + scaling * sum_j w_tj * B_{e_tj} (A_{e_tj} x_t). Semantics: `reference.py`.

Launches (P = T * k routed (token, slot) pairs):
- shrink     per-expert A: h [P, r] (row t*k+j = A_{e_tj} x_t), token-major; shared A: h = x @ A0^T [T, r].
- expand     y[t] (+)= scaling * sum_j g_tj B_{e_tj} h_tj, token-major, added into base_out in place if asked.
- dy pass    dh_tj = scaling * B_{e_tj}^T dy_t, then dg_tj = dh_tj . h_tj and g_tj * dh_tj, token-major.
- dx         the expand kernel again, through A^T (shared A: the slots summed first, one GEMM).
- dB, dA     per expert segment of the expert-sorted pairs, split over tokens into pieces whose fp32 partial
             sums are added in a fixed order by a second small kernel (deterministic, no atomics); or, where
             `reads_once` says it moves fewer bytes, per expert-set piece of `token_order`: each dy / x row read
             once for all k experts of its token, k partials per piece, added in a fixed order the same way.
h is saved in x's dtype (the compute dtype), never in fp32.

Token-major kernels walk the tokens in `DispatchMetadata.token_order` (tokens grouped by their set of experts) and
handle the k experts of a token by rank: the q-th smallest expert of each token. Inside a tile of tokens with
one expert set, rank q is one expert, so a tile costs exactly k rank-r GEMM slices; a tile that straddles sets
runs one masked slice per distinct expert at that rank, so the wasted work grows with how fast the sets change
(rank 0 changes slowest in that order; `benchmarks/roofline.py` counts it). The shrink and the dy pass, whose
outputs are per pair, switch to the expert-sorted pairs when there are too few tokens per expert set
(`pair_major`); the expand and dx sum a token's k experts in registers, so they stay token-major.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .utils import interpreting, rank_block, sm_count, tune_configs

# Split of the dB / dA segments: a piece holds at most this many pairs and at least MIN_PIECE_PAIRS, sized so
# that pieces x column tiles fill the GPU about PIECE_WAVES times over, whatever the routing skew.
MIN_PIECE_PAIRS = 64
PIECE_WAVES = 4

# The shrink and the dy pass walk tokens (token-major) while there are at least this many tokens per possible set of
# k experts, i.e. while most tiles hold one set; past that they walk the expert-sorted pairs (pair-major), whose
# tiles hold one or two experts at the price of reading each x / dy row once per pair.
TOKENS_PER_EXPERT_SET = 64


def pair_major(T: int, num_experts: int, top_k: int) -> bool:
    """True when the shrink and the dy pass walk the expert-sorted pairs instead of the tokens."""
    return math.comb(num_experts, top_k) * TOKENS_PER_EXPERT_SET > T


# Autotune candidates per kernel (GPU configs, interpreter default); tests run each GPU config's tile sizes.
SHRINK_CONFIGS = ([{"BLOCK_T": 64, "BLOCK_K": 64}, {"BLOCK_T": 128, "BLOCK_K": 64}, {"BLOCK_T": 64, "BLOCK_K": 128}],
                  {"BLOCK_T": 32, "BLOCK_K": 32})
EXPAND_CONFIGS = ([{"BLOCK_T": 64, "BLOCK_N": 64}, {"BLOCK_T": 64, "BLOCK_N": 128},
                   {"BLOCK_T": 128, "BLOCK_N": 128, "num_warps": 8}],
                  {"BLOCK_T": 32, "BLOCK_N": 32})
DY_PASS_CONFIGS = ([{"BLOCK_T": 64, "BLOCK_N": 64}, {"BLOCK_T": 64, "BLOCK_N": 128},
                    {"BLOCK_T": 128, "BLOCK_N": 64, "num_warps": 8}],
                   {"BLOCK_T": 32, "BLOCK_N": 32})
SEGMENT_CONFIGS = ([{"BLOCK_M": 64, "BLOCK_C": 64}, {"BLOCK_M": 64, "BLOCK_C": 128}, {"BLOCK_M": 128, "BLOCK_C": 64}],
                   {"BLOCK_M": 32, "BLOCK_C": 32})
SET_PIECE_CONFIGS = ([{"BLOCK_M": 64, "BLOCK_C": 64}, {"BLOCK_M": 64, "BLOCK_C": 128},
                      {"BLOCK_M": 32, "BLOCK_C": 128, "num_warps": 8}],
                     {"BLOCK_M": 32, "BLOCK_C": 32})


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


@triton.jit
def _ranked_slot(idx_ptr, rows, t_mask, q, TOP_K: tl.constexpr):
    # (expert, slot) of each row's q-th smallest (expert, slot) pair: rank of slot j = number of slots with a
    # smaller expert, or the same expert at a lower slot. O(k^2) vector ops on values already in cache.
    expert = tl.zeros(rows.shape, dtype=tl.int32)
    slot = tl.zeros(rows.shape, dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        ej = tl.load(idx_ptr + rows * TOP_K + j, mask=t_mask, other=0)
        rank = tl.zeros(rows.shape, dtype=tl.int32)
        for i in tl.static_range(TOP_K):
            if i != j:
                ei = tl.load(idx_ptr + rows * TOP_K + i, mask=t_mask, other=0)
                if i < j:
                    rank += (ei <= ej).to(tl.int32)
                else:
                    rank += (ei < ej).to(tl.int32)
        expert = tl.where(rank == q, ej, expert)
        slot = tl.where(rank == q, j, slot)
    return expert, slot


@triton.jit
def _tile_pairs(pid, idx_ptr, token_order_ptr, sort_order_ptr, T, TOP_K: tl.constexpr, PAIR_MAJOR: tl.constexpr,
                BLOCK_T: tl.constexpr):
    # (token, slot, expert, valid) of the tile's rows. Token-major: tile pid // k of token_order at rank pid % k.
    # Pair-major: tile pid of the expert-sorted pairs (one or two experts per tile, whatever the routing).
    if PAIR_MAJOR:
        offs = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = offs < T * TOP_K
        pair = tl.load(sort_order_ptr + offs, mask=t_mask, other=0).to(tl.int64)
        rows = pair // TOP_K
        slot = (pair % TOP_K).to(tl.int32)
        expert = tl.load(idx_ptr + pair, mask=t_mask, other=0)
    else:
        offs = (pid // TOP_K) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = offs < T
        rows = tl.load(token_order_ptr + offs, mask=t_mask, other=0).to(tl.int64)
        expert, slot = _ranked_slot(idx_ptr, rows, t_mask, pid % TOP_K, TOP_K)
    return rows, slot, expert, t_mask


@triton.jit
def _expert_range(expert, t_mask, E):
    return tl.min(tl.where(t_mask, expert, E), axis=0), tl.max(tl.where(t_mask, expert, -1), axis=0)


# Program (tile, rank-column tile). Token-major, the k rank programs of a tile are launched next to each other,
# so the x rows the first one reads are still in L2 for the others: x comes from HBM about once.
@triton.autotune(
    configs=tune_configs(*SHRINK_CONFIGS),
    key=["R", "KD", "TOP_K", "PAIR_MAJOR"],
)
@triton.jit
def _shrink_kernel(
    x_ptr, stride_xt, stride_xk,
    a_ptr, stride_ae, stride_ar, stride_ak,
    h_ptr,
    idx_ptr, token_order_ptr, sort_order_ptr,
    T, R, KD, E,
    TOP_K: tl.constexpr, PAIR_MAJOR: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, slot, expert, t_mask = _tile_pairs(tl.program_id(0), idx_ptr, token_order_ptr, sort_order_ptr, T, TOP_K,
                                             PAIR_MAJOR, BLOCK_T)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    e_lo, e_hi = _expert_range(expert, t_mask, E)
    for ex in range(e_lo, e_hi + 1):
        sel = t_mask & (expert == ex)
        if tl.sum(sel.to(tl.int32), axis=0) > 0:
            acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, KD, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < KD
                xt = tl.load(x_ptr + rows[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                             mask=sel[:, None] & k_mask[None, :], other=0.0)
                at = tl.load(a_ptr + ex * stride_ae + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                             mask=r_mask[None, :] & k_mask[:, None], other=0.0)
                acc = _mma(xt, at, acc, UPCAST, IEEE)
            pair = rows * TOP_K + slot
            tl.store(h_ptr + pair[:, None] * R + offs_r[None, :], acc.to(h_ptr.dtype.element_ty),
                     mask=sel[:, None] & r_mask[None, :])


# Program (token tile, output-column tile): adds every expert's contribution in registers, so each output
# element is read and written once by one program (deterministic; with base_ptr == out_ptr, in place).
# SHARED_W: one weight for every slot (dx through a shared A), so the gated rows are summed before one GEMM.
@triton.autotune(
    configs=tune_configs(*EXPAND_CONFIGS),
    key=["N", "R", "TOP_K", "HAS_BASE", "SHARED_W"],
    restore_value=["out_ptr"],  # the in-place form adds into out: every benchmarked config must see it unchanged
)
@triton.jit
def _expand_kernel(
    h_ptr, stride_ht, stride_hj,
    w_ptr, stride_we, stride_wn, stride_wr,
    idx_ptr, gate_ptr, token_order_ptr,
    base_ptr, stride_st, stride_sn,
    out_ptr, stride_ot, stride_on,
    hsum_ptr,
    T, N, R, E, scaling,
    TOP_K: tl.constexpr, GATED: tl.constexpr, SHARED_W: tl.constexpr, HAS_BASE: tl.constexpr,
    STORE_HSUM: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs < T
    rows = tl.load(token_order_ptr + offs, mask=t_mask, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = cols < N
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    if SHARED_W:
        hs = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            hj = tl.load(h_ptr + rows[:, None] * stride_ht + j * stride_hj + offs_r[None, :],
                         mask=t_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
            if GATED:
                hj = hj * tl.load(gate_ptr + rows * TOP_K + j, mask=t_mask, other=0.0)[:, None]
            hs += hj
        if STORE_HSUM:
            if pid_n == 0:
                tl.store(hsum_ptr + rows[:, None] * R + offs_r[None, :], hs.to(hsum_ptr.dtype.element_ty),
                         mask=t_mask[:, None] & r_mask[None, :])
        wt = tl.load(w_ptr + offs_r[:, None] * stride_wr + cols[None, :] * stride_wn,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(hs.to(wt.dtype), wt, acc, UPCAST, IEEE)
    else:
        for q in tl.static_range(TOP_K):
            expert, slot = _ranked_slot(idx_ptr, rows, t_mask, q, TOP_K)
            e_lo, e_hi = _expert_range(expert, t_mask, E)
            for ex in range(e_lo, e_hi + 1):
                sel = t_mask & (expert == ex)
                if tl.sum(sel.to(tl.int32), axis=0) > 0:
                    hq = tl.load(h_ptr + rows[:, None] * stride_ht + slot[:, None] * stride_hj + offs_r[None, :],
                                 mask=sel[:, None] & r_mask[None, :], other=0.0)
                    if GATED:
                        g = tl.load(gate_ptr + rows * TOP_K + slot, mask=sel, other=0.0)
                        hq = hq.to(tl.float32) * g[:, None]
                    wt = tl.load(w_ptr + ex * stride_we + offs_r[:, None] * stride_wr + cols[None, :] * stride_wn,
                                 mask=r_mask[:, None] & n_mask[None, :], other=0.0)
                    acc = _mma(hq.to(wt.dtype), wt, acc, UPCAST, IEEE)
    acc = acc * scaling
    mask = t_mask[:, None] & n_mask[None, :]
    if HAS_BASE:
        acc += tl.load(base_ptr + rows[:, None] * stride_st + cols[None, :] * stride_sn, mask=mask,
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_ot + cols[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=mask)


# Program (tile of pairs, as in the shrink): walks all of N so dh_tj is complete in registers, then derives the
# gate gradient (an r-length dot with h) and the gated dh for dx and dA in its epilogue. Token-major, dy is read
# once per tile (the rank siblings, launched together, find it in L2). No [T, k, N] tensor and no glue ops.
@triton.autotune(
    configs=tune_configs(*DY_PASS_CONFIGS),
    key=["N", "R", "TOP_K", "PAIR_MAJOR"],
)
@triton.jit
def _dy_pass_kernel(
    dy_ptr, stride_dt, stride_dn,
    b_ptr, stride_be, stride_bn, stride_br,
    h_ptr, stride_ht, stride_hj,
    idx_ptr, gate_ptr, token_order_ptr, sort_order_ptr,
    dgate_ptr, dhg_ptr,
    T, N, R, E, scaling,
    TOP_K: tl.constexpr, PAIR_MAJOR: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, slot, expert, t_mask = _tile_pairs(tl.program_id(0), idx_ptr, token_order_ptr, sort_order_ptr, T, TOP_K,
                                             PAIR_MAJOR, BLOCK_T)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    e_lo, e_hi = _expert_range(expert, t_mask, E)
    pair = rows * TOP_K + slot
    for ex in range(e_lo, e_hi + 1):
        sel = t_mask & (expert == ex)
        if tl.sum(sel.to(tl.int32), axis=0) > 0:
            acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                n_mask = cols < N
                dy = tl.load(dy_ptr + rows[:, None] * stride_dt + cols[None, :] * stride_dn,
                             mask=sel[:, None] & n_mask[None, :], other=0.0)
                bt = tl.load(b_ptr + ex * stride_be + cols[:, None] * stride_bn + offs_r[None, :] * stride_br,
                             mask=n_mask[:, None] & r_mask[None, :], other=0.0)
                acc = _mma(dy, bt, acc, UPCAST, IEEE)
            dh = acc * scaling
            h = tl.load(h_ptr + rows[:, None] * stride_ht + slot[:, None] * stride_hj + offs_r[None, :],
                        mask=sel[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
            tl.store(dgate_ptr + pair, tl.sum(dh * h, axis=1), mask=sel)
            g = tl.load(gate_ptr + pair, mask=sel, other=0.0)
            tl.store(dhg_ptr + pair[:, None] * R + offs_r[None, :], (dh * g[:, None]).to(dhg_ptr.dtype.element_ty),
                     mask=sel[:, None] & r_mask[None, :])


# Program (piece, column tile): partial[piece] = scale * sum over the piece's pairs of X[t]^T (g? * H[pair]),
# [C, r] in fp32. A piece is a run of one expert's sorted pairs, so the sum is one expert's.
@triton.autotune(
    configs=tune_configs(*SEGMENT_CONFIGS),
    key=["C", "R", "TOP_K", "GATED"],
)
@triton.jit
def _segment_partial_kernel(
    x_ptr, stride_xt, stride_xc,
    h_ptr, stride_ht, stride_hj,
    gate_ptr, order_ptr, piece_start_ptr, piece_end_ptr,
    part_ptr,
    C, R, scale,
    TOP_K: tl.constexpr, GATED: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    piece = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cols < C
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    start = tl.load(piece_start_ptr + piece)
    end = tl.load(piece_end_ptr + piece)
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_M):
        pos = p0 + tl.arange(0, BLOCK_M)
        p_mask = pos < end
        pair = tl.load(order_ptr + pos, mask=p_mask, other=0).to(tl.int64)
        tok = pair // TOP_K
        h = tl.load(h_ptr + tok[:, None] * stride_ht + (pair % TOP_K)[:, None] * stride_hj + offs_r[None, :],
                    mask=p_mask[:, None] & r_mask[None, :], other=0.0)
        xt = tl.load(x_ptr + tok[:, None] * stride_xt + cols[None, :] * stride_xc,
                     mask=p_mask[:, None] & c_mask[None, :], other=0.0)
        if GATED:
            h = h.to(tl.float32) * tl.load(gate_ptr + pair, mask=p_mask, other=0.0)[:, None]
        acc = _mma(tl.trans(xt), h.to(xt.dtype), acc, UPCAST, IEEE)
    tl.store(part_ptr + piece * C * R + cols[:, None] * R + offs_r[None, :], acc * scale,
             mask=c_mask[:, None] & r_mask[None, :])


# Program (expert, column tile): out[e] = sum of e's pieces in piece order (fixed, so the result is the same on
# every run); an expert without pairs gets zeros.
@triton.jit
def _sum_pieces_kernel(
    part_ptr, first_piece_ptr,
    out_ptr, stride_oe, stride_oc, stride_or,
    C, R,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    ex = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    mask = (cols < C)[:, None] & (offs_r < R)[None, :]
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    for piece in range(tl.load(first_piece_ptr + ex), tl.load(first_piece_ptr + ex + 1)):
        acc += tl.load(part_ptr + piece * C * R + cols[:, None] * R + offs_r[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + ex * stride_oe + cols[:, None] * stride_oc + offs_r[None, :] * stride_or,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


# Program (expert-set piece, column tile): a piece is a run of `token_order` whose tokens share one set of k
# experts, so each x row of the run is read once and feeds all k experts: partial[piece][:, q] = scale * sum over
# the run of X[t]^T (g? * H[t, slot of its q-th smallest expert]), the k ranks side by side in one [C, k*r] tile.
@triton.autotune(
    configs=tune_configs(*SET_PIECE_CONFIGS),
    key=["C", "R", "TOP_K", "GATED"],
)
@triton.jit
def _set_partial_kernel(
    x_ptr, stride_xt, stride_xc,
    h_ptr, stride_ht, stride_hj,
    gate_ptr, ranked_slot_ptr, token_order_ptr, piece_start_ptr, piece_end_ptr,
    part_ptr,
    C, R, scale,
    TOP_K: tl.constexpr, GATED: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_KR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    piece = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cols < C
    offs_j = tl.arange(0, BLOCK_KR)
    rank_q = offs_j // BLOCK_R
    offs_r = offs_j % BLOCK_R
    j_mask = (rank_q < TOP_K) & (offs_r < R)
    start = tl.load(piece_start_ptr + piece)
    end = tl.load(piece_end_ptr + piece)
    acc = tl.zeros((BLOCK_C, BLOCK_KR), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_M):
        pos = p0 + tl.arange(0, BLOCK_M)
        p_mask = pos < end
        tok = tl.load(token_order_ptr + pos, mask=p_mask, other=0).to(tl.int64)
        hj_mask = p_mask[:, None] & j_mask[None, :]
        slot = tl.load(ranked_slot_ptr + tok[:, None] * TOP_K + rank_q[None, :], mask=hj_mask, other=0).to(tl.int64)
        h = tl.load(h_ptr + tok[:, None] * stride_ht + slot * stride_hj + offs_r[None, :], mask=hj_mask, other=0.0)
        if GATED:
            h = h.to(tl.float32) * tl.load(gate_ptr + tok[:, None] * TOP_K + slot, mask=hj_mask, other=0.0)
        xt = tl.load(x_ptr + tok[:, None] * stride_xt + cols[None, :] * stride_xc,
                     mask=p_mask[:, None] & c_mask[None, :], other=0.0)
        acc = _mma(tl.trans(xt), h.to(xt.dtype), acc, UPCAST, IEEE)
    if start < end:  # an unused piece (past the last run) writes nothing, and nothing reads it
        tl.store(part_ptr + piece * C * BLOCK_KR + cols[:, None] * BLOCK_KR + offs_j[None, :], acc * scale,
                 mask=c_mask[:, None] & j_mask[None, :])


# Program (expert, column tile): out[e] = the sum of e's (piece, rank) partials in piece order (fixed: the same
# result on every run); an expert in no piece gets zeros. A token that names one expert twice puts that expert at
# two ranks of its piece: both entries are summed.
@triton.jit
def _sum_set_pieces_kernel(
    part_ptr, entries_ptr, first_ptr,
    out_ptr, stride_oe, stride_oc, stride_or,
    C, R,
    TOP_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_KR: tl.constexpr, BLOCK_C: tl.constexpr,
):
    ex = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    mask = (cols < C)[:, None] & (offs_r < R)[None, :]
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    for i in range(tl.load(first_ptr + ex), tl.load(first_ptr + ex + 1)):
        entry = tl.load(entries_ptr + i)
        piece = entry // TOP_K
        column = (entry % TOP_K) * BLOCK_R
        acc += tl.load(part_ptr + piece * C * BLOCK_KR + cols[:, None] * BLOCK_KR + column + offs_r[None, :], mask=mask,
                       other=0.0)
    tl.store(out_ptr + ex * stride_oe + cols[:, None] * stride_oc + offs_r[None, :] * stride_or,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def _flags(dtype: torch.dtype) -> tuple[bool, bool]:
    upcast = interpreting()
    return upcast, (dtype == torch.float32 or upcast)


def _h_strides(h: torch.Tensor, T: int, top_k: int) -> tuple[int, int]:
    """(per token, per slot) element strides of h_tj: [T, r] shared by the slots, or [T*k, r] per pair. h may be a
    column slice of a wider h (one projection's part of a shared shrink): its rows need only unit column stride."""
    if h.shape[1] > 1 and h.stride(1) != 1:
        raise ValueError(f"h needs unit column stride, got strides {h.stride()}")
    row = h.stride(0)
    return (row, 0) if h.shape[0] != T * top_k else (top_k * row, row)


def _pair_grid(T: int, top_k: int, block: int, by_pairs: bool) -> int:
    return triton.cdiv(T * top_k, block) if by_pairs else triton.cdiv(T, block) * top_k


def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, topk_idx: torch.Tensor, token_order: torch.Tensor,
                sort_order: torch.Tensor) -> torch.Tensor:
    """h in x's dtype: [T*k, r] with row t*k+j = A_{e_tj} x_t (per-expert A), or x @ A0^T [T, r] (shared A).

    x [T, K] and lora_A [E|1, r, K] in one dtype; topk_idx [T, k] int32; token_order [T] and sort_order [T*k]
    int64 from DispatchMetadata.
    """
    T, top_k = topk_idx.shape
    num_a, rank, kd = lora_A.shape
    if num_a == 1:
        return x @ lora_A[0].t()
    h = torch.empty(T * top_k, rank, dtype=x.dtype, device=x.device)
    if h.numel() == 0:
        return h
    if kd == 0:
        return h.zero_()
    block_r = min(rank_block(rank), 128)
    upcast, ieee = _flags(x.dtype)
    by_pairs = pair_major(T, num_a, top_k)
    grid = lambda meta: (_pair_grid(T, top_k, meta["BLOCK_T"], by_pairs), triton.cdiv(rank, block_r))  # noqa: E731
    _shrink_kernel[grid](
        x, x.stride(0), x.stride(1),
        lora_A, lora_A.stride(0), lora_A.stride(1), lora_A.stride(2),
        h, topk_idx, token_order, sort_order,
        T, rank, kd, num_a,
        TOP_K=top_k, PAIR_MAJOR=by_pairs, UPCAST=upcast, IEEE=ieee, BLOCK_R=block_r,
    )
    return h


def lora_expand(
    h: torch.Tensor,
    weight: torch.Tensor,
    topk_idx: torch.Tensor,
    gates: torch.Tensor | None,
    scaling: float,
    out: torch.Tensor,
    token_order: torch.Tensor,
    base_out: torch.Tensor | None = None,
    accumulate: bool = False,
    hsum: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fill out [T, N] with scaling * sum_j g_tj W_{e_tj} h_tj, plus base_out, or plus out itself (accumulate).

    h [T*k, r] per pair or [T, r] shared by the slots; weight [E|1, N, r] through any strides (a [1, ...] weight
    serves every slot); gates [T, k] fp32 or None (h already gated); topk_idx [T, k] int32; token_order [T]
    int64. hsum [T, r]: with a single weight, also receives sum_j g_tj h_tj. Returns out.
    """
    T, top_k = topk_idx.shape
    num_w, n, rank = weight.shape
    if T == 0 or n == 0:
        return out
    shared_w = num_w == 1
    sht, shj = _h_strides(h, T, top_k)
    upcast, ieee = _flags(weight.dtype)
    base = out if accumulate else (base_out if base_out is not None else out)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _expand_kernel[grid](
        h, sht, shj,
        weight, weight.stride(0), weight.stride(1), weight.stride(2),
        topk_idx, gates if gates is not None else h, token_order,
        base, base.stride(0), base.stride(1),
        out, out.stride(0), out.stride(1),
        hsum if hsum is not None else h,
        T, n, rank, num_w, scaling,
        TOP_K=top_k, GATED=gates is not None, SHARED_W=shared_w, HAS_BASE=accumulate or base_out is not None,
        STORE_HSUM=hsum is not None, UPCAST=upcast, IEEE=ieee, BLOCK_R=rank_block(rank),
    )
    return out


def lora_experts_triton_forward(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    scaling: float,
    out: torch.Tensor,
    base_out: torch.Tensor | None,
    accumulate: bool,
    token_order: torch.Tensor,
    sort_order: torch.Tensor,
) -> torch.Tensor:
    """Fill out [T, N] with the expert output (plus base_out, or added into out when accumulate) and return h
    (x's dtype) for the backward. Inputs as in `lora_experts`."""
    x, lora_A, lora_B = x.contiguous(), lora_A.contiguous(), lora_B.contiguous()
    topk_idx = topk_idx.to(torch.int32).contiguous()
    gates = topk_weights.to(torch.float32).contiguous()
    h = lora_shrink(x, lora_A, topk_idx, token_order, sort_order)
    lora_expand(h, lora_B, topk_idx, gates, scaling, out, token_order, base_out, accumulate)
    return h


def segment_pieces(offsets: torch.Tensor, pairs: int, columns: int) -> tuple[torch.Tensor, ...]:
    """Split each expert's segment of sorted pairs into pieces, on the device without a host sync.

    -> (piece_start [S] int64, piece_end [S] int64, first_piece [E+1] int64): expert e owns pieces
    first_piece[e]:first_piece[e+1]; S = cdiv(pairs, chunk) + E is a static bound (unused pieces are empty).
    The chunk is sized so that pieces x column tiles cover the GPU PIECE_WAVES times.
    """
    num_experts = offsets.shape[0] - 1
    col_tiles = triton.cdiv(max(columns, 1), 128)
    target = max(1, triton.cdiv(PIECE_WAVES * sm_count(offsets.device), col_tiles))
    chunk = max(MIN_PIECE_PAIRS, triton.next_power_of_2(triton.cdiv(max(pairs, 1), target)))
    counts = offsets[1:] - offsets[:-1]
    first_piece = torch.zeros(num_experts + 1, dtype=torch.int64, device=offsets.device)
    torch.cumsum((counts + chunk - 1) // chunk, 0, out=first_piece[1:])
    num_pieces = triton.cdiv(pairs, chunk) + num_experts
    piece = torch.arange(num_pieces, device=offsets.device)
    owner = torch.searchsorted(first_piece[1:], piece, right=True).clamp_max(num_experts - 1)
    start = offsets[owner] + (piece - first_piece[owner]) * chunk
    end = torch.minimum(start + chunk, offsets[owner + 1])
    used = piece < first_piece[-1]
    return torch.where(used, start, 0), torch.where(used, end, 0), first_piece


def segment_outer(
    x: torch.Tensor,
    h: torch.Tensor,
    gates: torch.Tensor | None,
    sort_order: torch.Tensor,
    pieces: tuple[torch.Tensor, ...],
    out: torch.Tensor,
    scale: float,
    top_k: int,
) -> torch.Tensor:
    """Fill out [E, C, r] (any strides, e.g. a permuted view) with scale * sum_{pairs p of e} x_t^T (g_p h_p).

    x [T, C]; h [T*k, r] per pair or [T, r] shared; gates [T, k] fp32 or None; pieces from `segment_pieces`.
    """
    num_experts, cols, rank = out.shape
    if cols == 0 or rank == 0 or num_experts == 0:
        return out
    piece_start, piece_end, first_piece = pieces
    T = x.shape[0]
    sht, shj = _h_strides(h, T, top_k)
    upcast, ieee = _flags(x.dtype)
    block_r = rank_block(rank)
    partial = torch.empty(piece_start.shape[0], cols, rank, dtype=torch.float32, device=x.device)
    grid = lambda meta: (piece_start.shape[0], triton.cdiv(cols, meta["BLOCK_C"]))  # noqa: E731
    _segment_partial_kernel[grid](
        x, x.stride(0), x.stride(1),
        h, sht, shj,
        gates if gates is not None else h, sort_order, piece_start, piece_end,
        partial,
        cols, rank, scale,
        TOP_K=top_k, GATED=gates is not None, UPCAST=upcast, IEEE=ieee, BLOCK_R=block_r,
    )
    block_c = 64
    _sum_pieces_kernel[(num_experts, triton.cdiv(cols, block_c))](
        partial, first_piece,
        out, out.stride(0), out.stride(1), out.stride(2),
        cols, rank,
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return out


# ---- dA and dB per expert-set piece: each routed token's x (dy) row read once for all k of its experts.
# The expert-segment form above gathers a row once per pair (k times) but writes one fp32 partial per piece of one
# expert; the set form reads it once but writes k partials per piece, and there is a piece per set of experts
# (C(E, k) with uniform routing). `reads_once` picks the form with fewer modelled HBM bytes for the shapes.
SET_PIECE_WAVES = 1  # pieces x column tiles of 128 cover the GPU this many times (more pieces: more partials)
MAX_SET_PIECE_COLUMNS = 128  # k * rank tile of the set kernel's accumulator: [128, 128] fp32 at most, as the segment kernel's


class SetPieces:
    """Runs of `token_order` with one set of experts, cut into pieces, and where each (piece, rank) sum goes.

    piece_start / piece_end [S] int64 positions in token_order (unused pieces are empty); ranked_slot [T, k] int32:
    the slot of each token's q-th smallest expert; entries [S*k] int64: piece * k + rank, sorted by expert (stable,
    so in piece order); first [E+2] int64: expert e owns entries[first[e]:first[e+1]] (the last range is unused
    pieces'). S is a static bound, so nothing here syncs with the host.
    """

    def __init__(self, piece_start, piece_end, ranked_slot, entries, first):
        self.piece_start, self.piece_end, self.ranked_slot = piece_start, piece_end, ranked_slot
        self.entries, self.first = entries, first


def _multisets(num_experts: int, top_k: int) -> int:
    return math.comb(num_experts + top_k - 1, top_k)


def _set_chunk(T: int, columns: int, device: torch.device) -> int:
    target = max(1, triton.cdiv(SET_PIECE_WAVES * sm_count(device), triton.cdiv(max(columns, 1), 128)))
    return max(MIN_PIECE_PAIRS, triton.next_power_of_2(triton.cdiv(max(T, 1), target)))


def _set_piece_bound(T: int, num_experts: int, top_k: int, chunk: int) -> int:
    return triton.cdiv(T, chunk) + min(T, _multisets(num_experts, top_k))


def reads_once(T: int, columns: int, rank: int, num_experts: int, top_k: int, device: torch.device) -> bool:
    """True when dA and dB run per expert-set piece (each x / dy row read once) rather than per expert segment.

    The set form needs exact set keys (E**k < 2**62) and k rank tiles that fit one accumulator
    (MAX_SET_PIECE_COLUMNS); CUMA_OUTER=sets|segments forces a form within that. Auto takes the set form when
    tokens walk in set order (not `pair_major`) and its modelled
    bytes (x once, k fp32 partials per piece) are fewer than the segments' (x k times, one partial per piece),
    counting the pieces that uniform routing makes (every set of k distinct experts, cut into chunks).
    """
    import os

    choice = os.environ.get("CUMA_OUTER", "auto")
    if choice not in ("auto", "sets", "segments"):
        raise ValueError(f"CUMA_OUTER must be auto, sets or segments, got {choice!r}")
    possible = num_experts ** top_k < 2 ** 62 and top_k * rank_block(rank) <= MAX_SET_PIECE_COLUMNS
    if choice != "auto" or not possible:
        return choice == "sets" and possible
    if pair_major(T, num_experts, top_k):
        return False
    pairs = T * top_k
    seg_chunk = max(MIN_PIECE_PAIRS, triton.next_power_of_2(triton.cdiv(max(pairs, 1), max(1, triton.cdiv(
        PIECE_WAVES * sm_count(device), triton.cdiv(max(columns, 1), 128))))))
    seg_pieces = triton.cdiv(pairs, seg_chunk) + num_experts
    sets = min(T, math.comb(num_experts, top_k))  # every set of k distinct experts used, as uniform routing does
    set_pieces_ = sets * triton.cdiv(triton.cdiv(T, sets), _set_chunk(T, columns, device))
    segment_bytes = 2 * pairs * columns + 8 * seg_pieces * columns * rank
    set_bytes = 2 * T * columns + 8 * set_pieces_ * top_k * columns * rank
    return set_bytes < segment_bytes


def set_pieces(topk_idx: torch.Tensor, token_order: torch.Tensor, num_experts: int, columns: int) -> SetPieces:
    """The expert-set pieces of `token_order` (tokens sorted by their set of experts), on the device, no host sync.

    A piece starts wherever a token's sorted experts differ from the previous token's, and every `chunk` tokens
    inside a run (sized so that pieces x column tiles cover the GPU SET_PIECE_WAVES times).
    """
    T, top_k = topk_idx.shape
    device = topk_idx.device
    ranked = torch.sort(topk_idx.long(), dim=1, stable=True)
    by_rank = ranked.values.index_select(0, token_order)  # [T, k]: each token's experts, smallest first
    chunk = _set_chunk(T, columns, device)
    bound = _set_piece_bound(T, num_experts, top_k, chunk)
    pos = torch.arange(T, device=device)
    new_run = torch.ones(T, dtype=torch.bool, device=device)
    new_run[1:] = (by_rank[1:] != by_rank[:-1]).any(1)
    run_start = torch.cummax(torch.where(new_run, pos, 0), 0).values
    piece_of = torch.cumsum(((pos - run_start) % chunk == 0).long(), 0) - 1  # nondecreasing
    piece_start = torch.searchsorted(piece_of, torch.arange(bound, device=device))  # T where unused
    piece_end = torch.cat([piece_start[1:], piece_start.new_full((1,), T)])
    used = piece_start < T
    experts = by_rank.index_select(0, piece_start.clamp_max(max(T - 1, 0))) if T else by_rank.new_zeros(bound, top_k)
    experts = torch.where(used[:, None], experts, num_experts).reshape(-1)  # unused pieces: a spare expert E
    entries = torch.sort(experts, stable=True).indices
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, experts, torch.ones_like(experts))
    first = torch.zeros(num_experts + 2, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=first[1:])
    return SetPieces(piece_start, piece_end, ranked.indices.to(torch.int32).contiguous(), entries, first)


def set_piece_outer(x: torch.Tensor, h: torch.Tensor, gates: torch.Tensor | None, token_order: torch.Tensor,
                    pieces: SetPieces, out: torch.Tensor, scale: float, top_k: int) -> torch.Tensor:
    """`segment_outer` per expert-set piece: fill out [E, C, r] (any strides) with scale * sum_{pairs p of e}
    x_t^T (g_p h_p), reading each x row once. x [T, C]; h [T*k, r] per pair or [T, r] shared; gates [T, k] fp32
    or None."""
    num_experts, cols, rank = out.shape
    if cols == 0 or rank == 0 or num_experts == 0:
        return out
    T = x.shape[0]
    sht, shj = _h_strides(h, T, top_k)
    upcast, ieee = _flags(x.dtype)
    block_r = rank_block(rank)
    block_kr = triton.next_power_of_2(top_k * block_r)
    num_pieces = pieces.piece_start.shape[0]
    partial = torch.empty(num_pieces, cols, block_kr, dtype=torch.float32, device=x.device)
    grid = lambda meta: (num_pieces, triton.cdiv(cols, meta["BLOCK_C"]))  # noqa: E731
    _set_partial_kernel[grid](
        x, x.stride(0), x.stride(1),
        h, sht, shj,
        gates if gates is not None else h, pieces.ranked_slot, token_order, pieces.piece_start, pieces.piece_end,
        partial,
        cols, rank, scale,
        TOP_K=top_k, GATED=gates is not None, UPCAST=upcast, IEEE=ieee, BLOCK_R=block_r, BLOCK_KR=block_kr,
    )
    block_c = 64
    _sum_set_pieces_kernel[(num_experts, triton.cdiv(cols, block_c))](
        partial, pieces.entries, pieces.first,
        out, out.stride(0), out.stride(1), out.stride(2),
        cols, rank,
        TOP_K=top_k, BLOCK_R=block_r, BLOCK_KR=block_kr, BLOCK_C=block_c,
    )
    return out


def outer_pieces(topk_idx: torch.Tensor, offsets: torch.Tensor, token_order: torch.Tensor, columns: int,
                 rank: int) -> SetPieces | tuple[torch.Tensor, ...]:
    """The work split of dA / dB for these shapes: SetPieces (`reads_once`) or expert-segment pieces."""
    T, top_k = topk_idx.shape
    num_experts = offsets.shape[0] - 1
    if T and reads_once(T, columns, rank, num_experts, top_k, topk_idx.device):
        return set_pieces(topk_idx, token_order, num_experts, columns)
    return segment_pieces(offsets, T * top_k, columns)


def expert_outer(x, h, gates, sort_order, token_order, pieces, out, scale, top_k):
    """scale * sum over each expert's pairs of x_t^T (g h): `set_piece_outer` or `segment_outer`, as `pieces` says."""
    if isinstance(pieces, SetPieces):
        return set_piece_outer(x, h, gates, token_order, pieces, out, scale, top_k)
    return segment_outer(x, h, gates, sort_order, pieces, out, scale, top_k)


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
    token_order: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [T, K], dA like lora_A, dB like lora_B, d topk_weights [T, k] fp32); h from the forward.

    One token-major pass over dy gives dh, the gate gradient and g * dh; dx is an expand through A^T; dA and dB
    are segment sums over the expert-sorted pairs (shared A: dA0 = (sum_j g dh)^T x, one GEMM).
    """
    grad_y = grad_y.contiguous()
    x, lora_A, lora_B = x.contiguous(), lora_A.contiguous(), lora_B.contiguous()
    topk_idx = topk_idx.to(torch.int32).contiguous()
    gates = topk_weights.to(torch.float32).contiguous()
    T, top_k = topk_idx.shape
    num_a, rank, kd = lora_A.shape
    dx = torch.empty_like(x)
    d_a = torch.empty_like(lora_A)
    pieces = outer_pieces(topk_idx, offsets, token_order, max(lora_B.shape[1], kd), rank)
    dhg, d_b, d_gates = _output_side_backward(grad_y, h, lora_B, topk_idx, gates, scaling, sort_order, token_order,
                                              pieces)
    if T == 0:
        return dx, d_a.zero_(), d_b, d_gates
    a_t = lora_A.permute(0, 2, 1)  # [E|1, K, r]: the expand weight for dx
    if num_a == 1:
        dh_sum = torch.empty(T, rank, dtype=x.dtype, device=x.device)
        lora_expand(dhg, a_t, topk_idx, None, 1.0, dx, token_order, hsum=dh_sum)
        torch.mm(dh_sum.t(), x, out=d_a[0])
    else:
        lora_expand(dhg, a_t, topk_idx, None, 1.0, dx, token_order)
        expert_outer(x, dhg, None, sort_order, token_order, pieces, d_a.permute(0, 2, 1), 1.0, top_k)
    return dx, d_a, d_b, d_gates


def _output_side_backward(grad_y, h, lora_B, topk_idx, gates, scaling, sort_order, token_order, pieces):
    """(g * dh [T*k, r] in h's dtype, dB, d gates [T, k] fp32): the dy pass and the dB segment sums."""
    T, top_k = topk_idx.shape
    num_experts, n, rank = lora_B.shape
    d_gates = torch.empty(T, top_k, dtype=torch.float32, device=h.device)
    dhg = torch.empty(T * top_k, rank, dtype=h.dtype, device=h.device)
    d_b = torch.empty_like(lora_B)
    if T == 0:
        return dhg, d_b.zero_(), d_gates
    if n == 0:
        d_gates.zero_()
        dhg.zero_()
    else:
        upcast, ieee = _flags(h.dtype)
        sht, shj = _h_strides(h, T, top_k)
        by_pairs = pair_major(T, num_experts, top_k)
        grid = lambda meta: (_pair_grid(T, top_k, meta["BLOCK_T"], by_pairs),)  # noqa: E731
        _dy_pass_kernel[grid](
            grad_y, grad_y.stride(0), grad_y.stride(1),
            lora_B, lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
            h, sht, shj,
            topk_idx, gates, token_order, sort_order,
            d_gates, dhg,
            T, n, rank, num_experts, scaling,
            TOP_K=top_k, PAIR_MAJOR=by_pairs, UPCAST=upcast, IEEE=ieee, BLOCK_R=rank_block(rank),
        )
    expert_outer(grad_y, h, gates, sort_order, token_order, pieces, d_b, scaling, top_k)
    return dhg, d_b, d_gates


# ---- The shrink and the expand as separate ops: projections that share a router and an input run one shrink over
# their concatenated A's (x read once) and one expand each; the gradient of h joins them.

def lora_expand_backward(
    grad_y: torch.Tensor,
    h: torch.Tensor,
    lora_B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    scaling: float,
    sort_order: torch.Tensor,
    offsets: torch.Tensor,
    token_order: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of `lora_expand` alone: (dh like h, dB like lora_B, d topk_weights [T, k] fp32).

    h [T*k, r] per pair or [T, r] shared by the slots (a column slice of a wider h is fine); dh is contiguous, in
    h's dtype, and already carries the gates (dh_tj = g_tj * scaling * B^T dy_t; shared h: summed over the slots).
    """
    grad_y, lora_B = grad_y.contiguous(), lora_B.contiguous()
    topk_idx = topk_idx.to(torch.int32).contiguous()
    gates = topk_weights.to(torch.float32).contiguous()
    T, top_k = topk_idx.shape
    pieces = outer_pieces(topk_idx, offsets, token_order, lora_B.shape[1], lora_B.shape[2])
    dhg, d_b, d_gates = _output_side_backward(grad_y, h, lora_B, topk_idx, gates, scaling, sort_order, token_order,
                                              pieces)
    if h.shape[0] != T * top_k:  # shared by the slots: its gradient is the sum over them, added in fp32
        dhg = dhg.view(T, top_k, -1).sum(1, dtype=torch.float32).to(h.dtype)
    return dhg, d_b, d_gates


# Rank columns per dx / dA launch of the shared shrink's backward: the tile sizes the per-projection kernels use
# (r <= 128) and the sm_90 compile test covers. Wider concatenations run in column chunks.
MAX_RANK_BLOCK = 128


def lora_shrink_backward(
    grad_h: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    topk_idx: torch.Tensor,
    sort_order: torch.Tensor,
    offsets: torch.Tensor,
    token_order: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of `lora_shrink` with per-expert A: (dx [T, K], dA like lora_A [E, R, K]).

    grad_h [T*k, R] (any R: the ranks of several projections side by side). dx is an expand of grad_h through
    A^T, dA a segment sum over the expert-sorted pairs, each in chunks of at most MAX_RANK_BLOCK rank columns.
    """
    x, lora_A, grad_h = x.contiguous(), lora_A.contiguous(), grad_h.contiguous()
    topk_idx = topk_idx.to(torch.int32).contiguous()
    T, top_k = topk_idx.shape
    rank, kd = lora_A.shape[1:]
    dx = torch.zeros_like(x) if rank == 0 else torch.empty_like(x)
    d_a = torch.empty_like(lora_A)
    if T == 0:
        return dx.zero_(), d_a.zero_()
    pieces = outer_pieces(topk_idx, offsets, token_order, kd, min(rank, MAX_RANK_BLOCK))
    a_t, d_a_t = lora_A.permute(0, 2, 1), d_a.permute(0, 2, 1)  # [E, K, R]
    for c0 in range(0, rank, MAX_RANK_BLOCK):
        cols = slice(c0, min(rank, c0 + MAX_RANK_BLOCK))
        lora_expand(grad_h[:, cols], a_t[:, :, cols], topk_idx, None, 1.0, dx, token_order, accumulate=c0 > 0)
        expert_outer(x, grad_h[:, cols], None, sort_order, token_order, pieces, d_a_t[:, :, cols], 1.0, top_k)
    return dx, d_a

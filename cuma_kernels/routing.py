"""Router tail (softmax -> top-k -> renormalise) as one Triton kernel, its backward, and dispatch metadata.

Semantics: `reference.route_topk_torch`. Modes: "cuma" (softmax over the k selected probabilities, the
published double softmax), "sum" (p / sum p), "soft" (raw top-k probabilities). Ties go to the lower expert.
Non-finite logits follow the torch path exactly: NaN reads as -inf; a row with a +inf logit or no finite logit
has NaN probabilities, which rank below every number, so it picks experts 0..k-1 with NaN weights. Indices are
always k distinct experts in [0, E).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .reference import ROUTING_MODES, router_probs

MODE_CODES = {"cuma": 0, "sum": 1, "soft": 2}


# One program owns BLOCK_T rows and holds each row's E probabilities in registers (E <= 64 or so).
# Top-k is k rounds of "row max, then the lowest column holding it": this gives the lower-index tie rule
# directly, which a bitonic sort would not. The selected values stay in a [BLOCK_T, BLOCK_K] register tile so
# the renormalisation needs no second pass over memory. NaN logits are replaced before the row max because GPU
# max drops NaN while the interpreter's keeps it; NaN probabilities then get the key NAN_KEY, between every real
# probability (>= 0) and the -1 that marks taken or padded columns.
@triton.jit
def _route_topk_kernel(
    logits_ptr, stride_lt, stride_le,
    weights_ptr, idx_ptr,
    T, E,
    TOP_K: tl.constexpr, MODE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    row_mask = rows < T
    col_mask = cols < E
    mask = row_mask[:, None] & col_mask[None, :]
    logits = tl.load(logits_ptr + rows[:, None] * stride_lt + cols[None, :] * stride_le, mask=mask,
                     other=float("-inf")).to(tl.float32)
    logits = tl.where(logits != logits, float("-inf"), logits)
    row_max = tl.max(logits, axis=1)
    row_max = tl.where(row_mask, row_max, 0.0)
    p = tl.exp(logits - row_max[:, None])
    p = tl.where(mask, p, 0.0)
    denom = tl.sum(p, axis=1)
    denom = tl.where(row_mask, denom, 1.0)
    p = p / denom[:, None]
    NAN_KEY: tl.constexpr = -0.5
    work = tl.where(col_mask[None, :], tl.where(p != p, NAN_KEY, p), -1.0)

    kcols = tl.arange(0, BLOCK_K)
    vals = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    idxs = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(work, axis=1)
        cand = tl.where(work == best[:, None], cols[None, :], BLOCK_E)
        arg = tl.min(cand, axis=1)
        work = tl.where(cols[None, :] == arg[:, None], -1.0, work)
        vals = tl.where(kcols[None, :] == j, best[:, None], vals)
        idxs = tl.where(kcols[None, :] == j, arg[:, None], idxs)
    vals = tl.where(vals == NAN_KEY, float("nan"), vals)

    kmask = kcols < TOP_K
    if MODE == 0:
        # softmax over the selected probabilities; column 0 holds their max
        top = tl.sum(tl.where(kcols[None, :] == 0, vals, 0.0), axis=1)
        ev = tl.where(kmask[None, :], tl.exp(vals - top[:, None]), 0.0)
        w = ev / tl.sum(ev, axis=1)[:, None]
    elif MODE == 1:
        s = tl.sum(tl.where(kmask[None, :], vals, 0.0), axis=1)
        s = tl.where(row_mask, s, 1.0)
        w = vals / s[:, None]
    else:
        w = vals
    out_mask = row_mask[:, None] & kmask[None, :]
    offs = rows[:, None] * TOP_K + kcols[None, :]
    tl.store(weights_ptr + offs, w, mask=out_mask)
    tl.store(idx_ptr + offs, idxs, mask=out_mask)


def route_topk_triton(logits: torch.Tensor, top_k: int, mode: str = "cuma") -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (any float dtype, any strides) -> (weights [T, k] float32, idx [T, k] int32)."""
    if mode not in MODE_CODES:
        raise ValueError(f"unknown routing mode {mode!r}; expected one of {ROUTING_MODES}")
    T, E = logits.shape
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    idx = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)
    if T == 0:
        return weights, idx
    block_e = max(2, triton.next_power_of_2(E))
    block_t = max(1, min(64, 4096 // block_e))
    grid = (triton.cdiv(T, block_t),)
    _route_topk_kernel[grid](
        logits, logits.stride(0), logits.stride(1),
        weights, idx,
        T, E,
        TOP_K=top_k, MODE=MODE_CODES[mode],
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=max(2, triton.next_power_of_2(top_k)),
    )
    return weights, idx


def route_topk_backward(
    logits: torch.Tensor, topk_weights: torch.Tensor, topk_idx: torch.Tensor, grad_weights: torch.Tensor, mode: str
) -> torch.Tensor:
    """d logits [T, E] (float32) from d weights [T, k], in closed form (no autograd graph, no host sync).

    w = f(v), v = p[idx], p = softmax(logits). dv by mode, scattered into dp, then the softmax Jacobian.
    """
    p = router_probs(logits)
    gw = grad_weights.float()
    w = topk_weights.float()
    if mode == "cuma":
        dv = w * (gw - (gw * w).sum(-1, keepdim=True))
    elif mode == "sum":
        v = p.gather(1, topk_idx.long())
        dv = (gw - (gw * w).sum(-1, keepdim=True)) / v.sum(-1, keepdim=True)
    elif mode == "soft":
        dv = gw
    else:
        raise ValueError(f"unknown routing mode {mode!r}; expected one of {ROUTING_MODES}")
    dp = torch.zeros_like(p).scatter_add_(1, topk_idx.long(), dv)
    return p * (dp - (dp * p).sum(-1, keepdim=True))


@dataclass(frozen=True)
class DispatchMetadata:
    """Tokens grouped by expert, computed once per router and shared by every module using that router.

    counts [E] int64: (token, slot) pairs per expert.
    sort_order [T*k] int64: flat pair ids (t * k + j) sorted by expert, stable (token order inside an expert).
    offsets [E+1] int64: expert e's pairs are sort_order[offsets[e]:offsets[e+1]].
    token_order [T] int64: the tokens sorted by their set of experts (tokens routed alike become neighbours).
    """

    counts: torch.Tensor
    sort_order: torch.Tensor
    offsets: torch.Tensor
    token_order: torch.Tensor
    num_experts: int
    top_k: int


def dispatch_metadata(topk_idx: torch.Tensor, num_experts: int) -> DispatchMetadata:
    """topk_idx [T, k] (int32/int64) -> DispatchMetadata, on topk_idx's device, without a host sync.

    Counting uses scatter_add (torch.bincount syncs on CUDA to size its output).
    """
    if topk_idx.dim() != 2:
        raise ValueError(f"topk_idx must have shape [T, k], got {tuple(topk_idx.shape)}")
    flat = topk_idx.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    sort_order = torch.sort(flat, stable=True).indices
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    # key = the token's experts in ascending order, read as base-E digits (exact while E**k < 2**63, e.g. E <= 64
    # with k <= 8; past that the key wraps, which only makes the grouping, never the result, worse)
    top_k = int(topk_idx.shape[1])
    digits = torch.sort(topk_idx.long(), dim=1).values
    weights = num_experts ** torch.arange(top_k - 1, -1, -1, device=flat.device, dtype=torch.int64)
    token_order = torch.sort((digits * weights).sum(1), stable=True).indices
    return DispatchMetadata(counts, sort_order, offsets, token_order, num_experts, top_k)

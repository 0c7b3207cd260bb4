"""Routed torch path of `lora_experts`: only the routed (token, slot) pairs are computed.

The flat pairs p = t * k + j are sorted by expert once (stable, so tokens keep their order inside an expert);
expert e owns the contiguous segment sort_order[offsets[e]:offsets[e+1]]. Per non-empty segment there is one
shrink and one expand GEMM (`torch.mm` into a view of a preallocated buffer), and the expanded rows go back to
their tokens with one `index_add_`. Shared A: one dense shrink h = x @ A0^T [T, r], then its rows are gathered.

Saved for the backward (its shape follows from the input shapes, see `ops._saved_h_shape`):
- per-expert A: the sorted h [T*k, r] (row i = A_{e} x_t for the i-th sorted pair), unweighted;
- shared A: h [T, r] in token order.

Compared with the dense gated form (`reference.lora_experts_torch_forward`), which multiplies every token by every
expert, this does k/E of the GEMM work but pays for the gathers, the index_add and E small GEMMs per step; `ops.py`
chooses between the two from the shapes.
"""
from __future__ import annotations

import torch

from .reference import _compute_dtype


def pair_order(topk_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_idx [T, k] -> (sort_order [T*k] int64, offsets [E+1] int64), as in `dispatch_metadata`, without
    the token order. No host sync and no data-dependent shapes, so it traces under torch.compile."""
    flat = topk_idx.reshape(-1).long()
    sort_order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return sort_order, offsets


def _segments(offsets: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, start, end) of every non-empty segment; reading offsets costs nothing on the CPU."""
    bounds = offsets.tolist()
    return [(e, s, t) for e, (s, t) in enumerate(zip(bounds[:-1], bounds[1:])) if t > s]


def _sorted_gates(topk_weights: torch.Tensor, sort_order: torch.Tensor, scaling: float, compute: torch.dtype):
    """scaling * w of every sorted pair, [T*k, 1] in the compute dtype."""
    ws = topk_weights.reshape(-1).index_select(0, sort_order).to(compute)
    return ws.mul_(scaling).unsqueeze(1)


def _chunks(segments, width: int, itemsize: int):
    """(expert, start, end) pieces of the segments, short enough that a [rows, width] scratch block stays in cache.

    Gathering a whole segment (or all T*k rows) into one fresh buffer costs a trip through memory and, for large
    blocks, page faults on every call; the small scratch blocks are reused instead.
    """
    rows = _chunk_rows(None, width, itemsize)
    for e, s, t in segments:
        for c in range(s, t, rows):
            yield e, c, min(c + rows, t)


CHUNK_BYTES = 1 << 20


def _block(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous [rows, cols] view at the start of the flat scratch buffer."""
    return buf[:rows * cols].view(rows, cols)


def _chunk_rows(pairs: int | None, width: int, itemsize: int) -> int:
    rows = max(64, CHUNK_BYTES // max(1, width * itemsize))
    return rows if pairs is None else min(rows, pairs)


def lora_experts_routed_forward(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor | None,
    sort_order: torch.Tensor,
    offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [T, N] in x's dtype, h saved for the backward: [T*k, r] sorted, or [T, r] for a shared A)."""
    T, top_k = topk_idx.shape
    num_experts, out_features, rank = lora_B.shape
    in_features = x.shape[1]
    compute = _compute_dtype(x.dtype)
    xc, a, b = x.to(compute), lora_A.to(compute), lora_B.to(compute)
    segments = _segments(offsets)
    tok = sort_order // top_k  # token of each sorted pair
    ws = _sorted_gates(topk_weights, sort_order, scaling, compute)
    pairs = T * top_k
    shared = a.shape[0] == 1
    y = xc.new_empty(T, out_features)
    if base_out is None:
        y.zero_()
    else:
        y.copy_(base_out)
    if shared:
        h = xc @ a[0].t()  # [T, r]
        hs = h.index_select(0, tok)
    else:
        h = hs = xc.new_empty(pairs, rank)
    hw = xc.new_empty(pairs, rank)
    width = out_features if shared else max(in_features, out_features)
    buf = xc.new_empty(_chunk_rows(pairs, width, xc.element_size()) * width)
    for e, s, t in _chunks(segments, width, xc.element_size()):
        rows, idx = t - s, tok[s:t]
        if not shared:
            xs = torch.index_select(xc, 0, idx, out=_block(buf, rows, in_features))
            torch.mm(xs, a[e].t(), out=hs[s:t])
        torch.mul(hs[s:t], ws[s:t], out=hw[s:t])
        ys = torch.mm(hw[s:t], b[e].t(), out=_block(buf, rows, out_features))
        y.index_add_(0, idx, ys)
    return y.to(x.dtype), h


def lora_experts_routed_backward(
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
    """(dx, dA, dB, d topk_weights) of `lora_experts_routed_forward`, each in its input's dtype.

    dA and dB are full tensors (zeros for the experts no token chose: DDP expects every gradient).
    """
    T, top_k = topk_idx.shape
    num_experts, out_features, rank = lora_B.shape
    num_a, _, in_features = lora_A.shape
    compute = _compute_dtype(x.dtype)
    xc, a, b = x.to(compute), lora_A.to(compute), lora_B.to(compute)
    dy = grad_y.to(compute)
    segments = _segments(offsets)
    tok = sort_order // top_k
    ws = _sorted_gates(topk_weights, sort_order, scaling, compute)
    pairs = T * top_k
    shared = num_a == 1
    hs = h.index_select(0, tok) if shared else h
    hw = hs * ws
    d_b = xc.new_zeros(num_experts, out_features, rank)
    d_a = xc.new_zeros(num_a, rank, in_features)
    dhw = xc.new_empty(pairs, rank)  # d (w * h) per sorted pair, then dh in place
    width = out_features if shared else max(in_features, out_features)
    buf = xc.new_empty(_chunk_rows(pairs, width, xc.element_size()) * width)
    chunks = list(_chunks(segments, width, xc.element_size()))
    for e, s, t in chunks:  # output side: dB_e and d(w h) per sorted pair
        gys = torch.index_select(dy, 0, tok[s:t], out=_block(buf, t - s, out_features))
        d_b[e].addmm_(gys.t(), hw[s:t])
        torch.mm(gys, b[e], out=dhw[s:t])
    d_ws = (dhw * hs).sum(1).mul_(scaling)
    d_w = xc.new_empty(pairs).index_copy_(0, sort_order, d_ws).view(T, top_k)
    dh = dhw.mul_(ws)
    if shared:
        dh_tok = xc.new_zeros(T, rank).index_add_(0, tok, dh)
        torch.mm(dh_tok.t(), xc, out=d_a[0])
        dx = dh_tok @ a[0]
    else:
        dx = xc.new_zeros(T, in_features)
        for e, s, t in chunks:  # input side: dA_e and dx
            idx = tok[s:t]
            xs = torch.index_select(xc, 0, idx, out=_block(buf, t - s, in_features))
            d_a[e].addmm_(dh[s:t].t(), xs)
            dx.index_add_(0, idx, torch.mm(dh[s:t], a[e], out=_block(buf, t - s, in_features)))
    return dx.to(x.dtype), d_a.to(lora_A.dtype), d_b.to(lora_B.dtype), d_w.to(topk_weights.dtype)

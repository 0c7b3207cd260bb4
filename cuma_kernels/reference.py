"""Pure-torch semantics of the CuMA expert computation.

What lives here:
- `route_topk_torch` and `lora_experts_torch_forward` / `_backward`: the dense gated form (no Python loop over
  experts, no host sync) with a closed-form backward; the CPU path of the custom ops when the shapes favour it
  (the routed form is in `routed_cpu.py`), and the semantics the Triton kernels match.
- `lora_experts_torch`: the same dense form through plain autograd, the "dense torch" benchmark baseline.
- `lora_experts_loop`: the published per-expert loop, kept as an oracle and as a benchmark baseline.
"""
from __future__ import annotations

import torch

ROUTING_MODES = ("cuma", "sum", "soft")


def topk_stable(probs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim with ties broken toward the lower index (torch.topk does not promise that).

    For probabilities (values >= 0): a NaN ranks below every number (torch.sort would put it first).
    """
    key = torch.where(torch.isnan(probs), -1.0, probs)
    idx = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :top_k]
    return probs.gather(-1, idx), idx


def router_probs(logits: torch.Tensor) -> torch.Tensor:
    """fp32 softmax over experts with NaN logits read as -inf (that expert gets probability 0).

    A row whose softmax is undefined (a +inf logit, or no finite logit) comes out all NaN.
    """
    logits = logits.float()
    return torch.softmax(torch.where(torch.isnan(logits), float("-inf"), logits), dim=-1)


def renormalise(topk_probs: torch.Tensor, mode: str) -> torch.Tensor:
    """Gate weights from the k selected probabilities.

    "cuma": softmax over the selected *probabilities* (the published code's double softmax);
    "sum":  p / sum(p); "soft": the raw probabilities, not renormalised (the published soft-routing ablation).
    """
    if mode == "cuma":
        return torch.softmax(topk_probs, dim=-1)
    if mode == "sum":
        return topk_probs / topk_probs.sum(dim=-1, keepdim=True)
    if mode == "soft":
        return topk_probs
    raise ValueError(f"unknown routing mode {mode!r}; expected one of {ROUTING_MODES}")


def route_topk_torch(logits: torch.Tensor, top_k: int, mode: str = "cuma") -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (topk_weights [T, k] float32, topk_idx [T, k] int32). Differentiable in the weights.

    Non-finite logits (see `router_probs`, `topk_stable`): indices are always k distinct experts in [0, E);
    a row with a +inf logit or no finite logit gets NaN weights and experts 0..k-1.
    """
    probs = router_probs(logits)
    vals, idx = topk_stable(probs, top_k)
    return renormalise(vals, mode), idx.to(torch.int32)


def dense_gates(topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, k] routing -> [T, E] gate matrix, zero off the top-k (slots that pick the same expert add up)."""
    gates = topk_weights.new_zeros(topk_weights.shape[0], num_experts)
    return gates.scatter_add(1, topk_idx.long(), topk_weights)


def lora_experts_torch(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense gated form: every expert's rank-r product, masked by the [T, E] gates.

    x [T, K]; lora_A [E, r, K] or [1, r, K] (shared A); lora_B [E, N, r]; topk_idx/topk_weights [T, k].
    Returns base_out + scaling * sum_j w_tj B_{e_tj} A_{e_tj} x_t, in x's dtype (fp32 accumulation).
    """
    num_experts, out_features, rank = lora_B.shape
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xc, a, b = x.to(compute), lora_A.to(compute), lora_B.to(compute)
    gates = dense_gates(topk_idx, topk_weights.to(compute), num_experts)  # [T, E]
    b_cat = b.permute(1, 0, 2).reshape(out_features, num_experts * rank)  # [N, E*r]
    if a.shape[0] == 1:  # shared A: one shrink, then fan out per expert
        h = xc @ a[0].t()  # [T, r]
        hg = (gates[:, :, None] * h[:, None, :]).reshape(-1, num_experts * rank)
    else:
        h = xc @ a.reshape(num_experts * rank, -1).t()  # [T, E*r]
        hg = h * gates.repeat_interleave(rank, dim=1)
    delta = (hg @ b_cat.t()) * scaling
    if base_out is not None:
        delta = delta + base_out.to(compute)
    return delta.to(x.dtype)


def lora_experts_loop(x, lora_A, lora_B, topk_idx, topk_weights, scaling, base_out=None):
    """The published loop: for each slot and expert, gather its tokens, shrink, expand, scatter-add."""
    out = torch.zeros(x.shape[0], lora_B.shape[1], dtype=x.dtype, device=x.device)
    for slot in range(topk_idx.shape[1]):
        for e in range(lora_B.shape[0]):
            mask = topk_idx[:, slot] == e
            if not mask.any():
                continue
            a = lora_A[0] if lora_A.shape[0] == 1 else lora_A[e]
            h = x[mask] @ a.t()
            out[mask] += (h @ lora_B[e].t()) * topk_weights[mask, slot, None].to(x.dtype) * scaling
    return out if base_out is None else base_out + out


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def lora_experts_torch_forward(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense gated form without an autograd graph: (y [T, N] in x's dtype, h saved for the backward).

    h is x @ A^T in the compute dtype: [T, r] for a shared A, [T, E*r] otherwise.
    Pair with `lora_experts_torch_backward`: together they are the CPU path of `cuma_kernels.lora_experts`.
    """
    num_experts, out_features, rank = lora_B.shape
    compute = _compute_dtype(x.dtype)
    xc, a, b = x.to(compute), lora_A.to(compute), lora_B.to(compute)
    gates = dense_gates(topk_idx, topk_weights.to(compute), num_experts)  # [T, E]
    h = xc @ a.reshape(-1, a.shape[-1]).t()
    hg = _gated(h, gates, num_experts, rank)
    # scaling goes into the small [N, E*r] operand, never over a [T, N] tensor
    b_cat = b.permute(1, 0, 2).reshape(out_features, num_experts * rank) * scaling
    if base_out is None:
        y = hg @ b_cat.t()
    else:
        y = torch.addmm(base_out.to(compute), hg, b_cat.t())
    return y.to(x.dtype), h


def _gated(h: torch.Tensor, gates: torch.Tensor, num_experts: int, rank: int) -> torch.Tensor:
    """[T, E*r] = g_te * h_te (per-expert h [T, E*r]) or g_te * h_t (shared h [T, r])."""
    T = gates.shape[0]
    if h.shape[1] == rank:  # shared A (or a single expert: both branches agree)
        return (gates[:, :, None] * h[:, None, :]).reshape(T, num_experts * rank)
    return (h.view(T, num_experts, rank) * gates[:, :, None]).reshape(T, num_experts * rank)


def lora_experts_torch_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    h: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB, d topk_weights) of `lora_experts_torch_forward`, in closed form; each in its input's dtype."""
    num_experts, out_features, rank = lora_B.shape
    num_a, _, in_features = lora_A.shape
    T = x.shape[0]
    compute = _compute_dtype(x.dtype)
    xc, a, b = x.to(compute), lora_A.to(compute), lora_B.to(compute)
    dy = grad_y.to(compute)
    gates = dense_gates(topk_idx, topk_weights.to(compute), num_experts)
    b_cat = b.permute(1, 0, 2).reshape(out_features, num_experts * rank) * scaling
    hg = _gated(h, gates * scaling, num_experts, rank)
    d_b = (dy.t() @ hg).view(out_features, num_experts, rank).permute(1, 0, 2)
    dhg = (dy @ b_cat).view(T, num_experts, rank)
    h3 = h.view(T, h.shape[1] // rank, rank)
    d_gates = (dhg * h3).sum(-1)  # [T, E]
    d_w = d_gates.gather(1, topk_idx.long())
    dh = dhg * gates[:, :, None]
    dh = dh.sum(1) if num_a == 1 else dh.reshape(T, num_experts * rank)
    d_a = (dh.t() @ xc).view(num_a, rank, in_features)
    dx = dh @ a.reshape(num_a * rank, in_features)
    return dx.to(x.dtype), d_a.to(lora_A.dtype), d_b.to(lora_B.dtype).contiguous(), d_w.to(topk_weights.dtype)

"""Shrink, expand, the expert computation and the whole adapted layer, forward and forward+backward.

Rows in every group (all on the same x, weights and routing):
  cuma        cuma_kernels.lora_experts (Triton on CUDA, the vectorised torch path on CPU); for shrink/expand alone,
              the Triton kernels on CUDA (on CPU the shrink/expand of lora_experts are the `dense` rows' GEMMs)
  loop        the published per-expert loop: boolean masks, `mask.any()` host syncs, index_put adds
              (the layer group runs the whole published layer, with its DDP dummy and second top-k)
  dense       the dense gated torch form (cuma_kernels.reference.lora_experts_torch and its GEMMs)
  grouped_mm  tokens sorted by expert, torch._grouped_mm for shrink and expand, index_add back
  peft        PEFT LoRA at the same rank (one adapter, no routing): the adapter path, or the whole peft Linear
  base        the frozen base linear alone, x @ W^T (the time every row above is compared to)
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cuma_kernels
from baselines import (
    grouped_mm_expand,
    grouped_mm_experts,
    grouped_mm_shrink,
    grouped_mm_unsupported,
    peft_delta,
    published_expert_loop,
    published_layer,
    sort_by_expert,
)
from cuma_kernels.reference import lora_experts_loop, lora_experts_torch
from harness import leaf, measure

PROVIDERS = ["cuma", "loop", "dense", "grouped_mm", "peft", "base"]
MODES = ["fwd", "fwd+bwd"]


def _require_grouped_mm(p):
    reason = grouped_mm_unsupported(p.device.type, p.shape.torch_dtype)
    if reason:
        pytest.skip(reason)


def _triton_ops(p, train):
    if p.device.type != "cuda":
        pytest.skip("no CUDA: on CPU the shrink and expand of lora_experts are the dense GEMMs (the `dense` rows)")
    if train:
        pytest.skip("the Triton shrink/expand backward runs inside lora_experts' backward (the `experts` group)")
    try:
        from cuma_kernels.grouped_lora import lora_expand, lora_shrink
    except ImportError as e:
        pytest.skip(f"cuma_kernels.grouped_lora has no lora_shrink/lora_expand: {e}")
    return lora_shrink, lora_expand


def _run(benchmark, budget, p, op, mode, provider, forward, inputs):
    """forward(**leaves) -> tensor; with fwd+bwd the output is backpropagated with a fixed random gradient."""
    train = mode == "fwd+bwd"
    grads = {}

    def fn():
        leaves = {name: leaf(t, train and grad) for name, (t, grad) in inputs.items()}
        with torch.set_grad_enabled(train):
            out = forward(**leaves)
        if train:
            g = grads.get(out.shape)
            if g is None:
                g = grads[out.shape] = p.grad_y if out.shape == p.grad_y.shape else torch.randn_like(out)
            out.backward(g)

    measure(benchmark, fn, op=op, mode=mode, provider=provider, problem=p, budget=budget)


# ------------------------------------------------------------------------------------------------- shrink


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_shrink(benchmark, problem, budget, provider, mode):
    p, s = problem, problem.shape
    inputs = {"x": (p.x, True), "a": (p.lora_A, True)}
    if provider == "cuma":
        lora_shrink, _ = _triton_ops(p, mode == "fwd+bwd")
        d = cuma_kernels.dispatch_metadata(p.topk_idx, s.E)
        idx = p.topk_idx.to(torch.int32)

        def forward(x, a):
            return lora_shrink(x, a, idx, d.token_order, d.sort_order)
    elif provider == "loop":
        def forward(x, a):
            parts = []
            for slot in range(s.k):
                for e in range(s.E):
                    mask = p.topk_idx[:, slot] == e
                    if mask.any():
                        parts.append(x[mask] @ a[e].t())
            return torch.cat(parts)
    elif provider == "dense":
        def forward(x, a):
            return x @ a.reshape(s.E * s.r, s.K).t()
    elif provider == "grouped_mm":
        _require_grouped_mm(p)
        d = sort_by_expert(p.topk_idx, s.E)

        def forward(x, a):
            return grouped_mm_shrink(x, a, d)
    elif provider == "peft":
        name = p.peft.active_adapters[0]
        inputs = {"x": (p.x, True)}

        def forward(x):
            return p.peft.lora_A[name](x)
    else:
        inputs = {"x": (p.x, True)}

        def forward(x):
            return F.linear(x, p.weight)
    _run(benchmark, budget, p, "shrink", mode, provider, forward, inputs)


# ------------------------------------------------------------------------------------------------- expand


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_expand(benchmark, problem, budget, provider, mode):
    p, s = problem, problem.shape
    with torch.no_grad():
        base_out = F.linear(p.x, p.weight)
        h_dense = (p.x @ p.lora_A.reshape(s.E * s.r, s.K).t()).float()  # [T, E*r]
    inputs = {"b": (p.lora_B, True), "w": (p.topk_weights, True)}
    if provider == "cuma":
        lora_shrink, lora_expand = _triton_ops(p, mode == "fwd+bwd")
        d = cuma_kernels.dispatch_metadata(p.topk_idx, s.E)
        idx = p.topk_idx.to(torch.int32)
        h = lora_shrink(p.x, p.lora_A, idx, d.token_order, d.sort_order)

        def forward(b, w):
            out = torch.empty_like(base_out)
            return lora_expand(h, b, idx, w.float(), p.scaling, out, d.token_order, base_out)
    elif provider == "loop":
        h = h_dense.to(p.x.dtype)
        inputs["h"] = (h, True)

        def forward(h, b, w):
            lora = torch.zeros_like(base_out)
            for slot in range(s.k):
                for e in range(s.E):
                    mask = p.topk_idx[:, slot] == e
                    if not mask.any():
                        continue
                    lora[mask] += (h[mask, e * s.r:(e + 1) * s.r] @ b[e].t()) * w[mask, slot, None].to(h.dtype) * p.scaling
            return base_out + lora
    elif provider == "dense":
        inputs["h"] = (h_dense, True)
        idx = p.topk_idx.long()

        def forward(h, b, w):
            gates = torch.zeros(s.T, s.E, device=p.device).scatter_add(1, idx, w)
            hg = h * gates.repeat_interleave(s.r, dim=1)
            b_cat = b.permute(1, 0, 2).reshape(s.N, s.E * s.r).float() * p.scaling
            return torch.addmm(base_out.float(), hg, b_cat.t()).to(p.x.dtype)
    elif provider == "grouped_mm":
        _require_grouped_mm(p)
        d = sort_by_expert(p.topk_idx, s.E)
        experts = p.topk_idx.reshape(-1).long()[d.pair]
        h_sorted = h_dense.view(s.T, s.E, s.r)[d.token, experts].to(p.x.dtype)  # [T*k, r]
        inputs["h"] = (h_sorted, True)

        def forward(h, b, w):
            return grouped_mm_expand(h, b, w, p.scaling, d, base_out)
    elif provider == "peft":
        name = p.peft.active_adapters[0]
        with torch.no_grad():
            h_r = p.peft.lora_A[name](p.x)
        inputs = {"h": (h_r, True)}

        def forward(h):
            return base_out + p.peft.lora_B[name](h) * p.scaling
    else:
        inputs = {"x": (p.x, True)}

        def forward(x):
            return F.linear(x, p.weight)
    _run(benchmark, budget, p, "expand", mode, provider, forward, inputs)


# ------------------------------------------------------------------------------------------ experts / layer


def _expert_inputs(p):
    return {"x": (p.x, True), "a": (p.lora_A, True), "b": (p.lora_B, True), "w": (p.topk_weights, True)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_experts(benchmark, problem, budget, provider, mode):
    """The expert computation alone: scaling * sum_j w_tj B_e A_e x_t, no base output."""
    p = problem
    inputs = _expert_inputs(p)
    idx = p.topk_idx
    impl = {"cuma": cuma_kernels.lora_experts, "loop": lora_experts_loop, "dense": lora_experts_torch,
            "grouped_mm": grouped_mm_experts}.get(provider)
    if provider == "grouped_mm":
        _require_grouped_mm(p)
    if impl is not None:
        def forward(x, a, b, w):
            return impl(x, a, b, idx, w, p.scaling)
    elif provider == "peft":
        inputs = {"x": (p.x, True)}

        def forward(x):
            return peft_delta(p.peft, x)
    else:
        inputs = {"x": (p.x, True)}

        def forward(x):
            return F.linear(x, p.weight)
    _run(benchmark, budget, p, "experts", mode, provider, forward, inputs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_layer(benchmark, problem, budget, provider, mode):
    """The whole adapted layer x -> base linear + experts (routing given; the loop row is the published layer)."""
    p, s = problem, problem.shape
    train = mode == "fwd+bwd"
    inputs = _expert_inputs(p)
    idx = p.topk_idx
    if provider == "cuma":
        def forward(x, a, b, w):
            return cuma_kernels.lora_experts(x, a, b, idx, w, p.scaling, base_out=F.linear(x, p.weight))
    elif provider == "loop":
        inputs = dict(inputs, g=(p.gates, True))
        del inputs["w"]

        def forward(x, a, b, g):
            return published_layer(x, p.weight, None, a, b, g, s.k, p.scaling, training=train)
    elif provider == "dense":
        def forward(x, a, b, w):
            return lora_experts_torch(x, a, b, idx, w, p.scaling, base_out=F.linear(x, p.weight))
    elif provider == "grouped_mm":
        _require_grouped_mm(p)

        def forward(x, a, b, w):
            return grouped_mm_experts(x, a, b, idx, w, p.scaling, base_out=F.linear(x, p.weight))
    elif provider == "peft":
        inputs = {"x": (p.x, True)}

        def forward(x):
            return p.peft(x)
    else:
        inputs = {"x": (p.x, True)}

        def forward(x):
            return F.linear(x, p.weight)
    _run(benchmark, budget, p, "layer", mode, provider, forward, inputs)

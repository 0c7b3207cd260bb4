"""Router tail (softmax -> top-k -> renormalise) and dispatch metadata, on both backends.

CUMA_TEST_DEVICE=cuda runs the same tests on a GPU (the Triton backend then compiles for real).
"""
import math
import os

import pytest
import torch

import cuma_kernels
from cuma_kernels import dispatch_metadata, route_topk

DEVICE = os.environ.get("CUMA_TEST_DEVICE", "cpu")
BACKENDS = ["torch", "triton"]
MODES = ["cuma", "sum", "soft"]


@pytest.fixture
def backend(request, monkeypatch):
    name = request.param
    if name == "triton" and DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    monkeypatch.setenv("CUMA_BACKEND", name)
    return name


def reference_route(logits: torch.Tensor, top_k: int, mode: str):
    """fp64, one row at a time: sort experts by (-p, index), keep k, renormalise by mode."""
    rows_w, rows_i = [], []
    for row in logits.double().cpu():
        m = max(row.tolist())
        e = [math.exp(v - m) for v in row.tolist()]
        p = [v / sum(e) for v in e]
        chosen = sorted(range(len(p)), key=lambda i: (-p[i], i))[:top_k]
        vals = [p[i] for i in chosen]
        if mode == "cuma":
            ev = [math.exp(v - vals[0]) for v in vals]
            w = [v / sum(ev) for v in ev]
        elif mode == "sum":
            w = [v / sum(vals) for v in vals]
        else:
            w = vals
        rows_w.append(w)
        rows_i.append(chosen)
    shape = (logits.shape[0], top_k)
    return (torch.tensor(rows_w, dtype=torch.float64).reshape(shape),
            torch.tensor(rows_i, dtype=torch.int64).reshape(shape))


def reference_weights_autograd(logits: torch.Tensor, idx: torch.Tensor, mode: str) -> torch.Tensor:
    """fp64 weights for fixed indices, differentiable (for the logits gradient)."""
    p = torch.softmax(logits, dim=-1)
    v = p.gather(1, idx)
    if mode == "cuma":
        return torch.softmax(v, dim=-1)
    if mode == "sum":
        return v / v.sum(-1, keepdim=True)
    return v


def tie_free_logits(T, E, seed):
    g = torch.Generator().manual_seed(seed)
    # distinct values per row, spaced so fp32 softmax keeps their order
    ranks = torch.rand(T, E, generator=g).argsort(-1).double()
    return ranks * 0.37 + torch.rand(T, 1, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,E,k", [(0, 4, 1), (1, 8, 2), (37, 8, 2), (130, 6, 3), (7, 64, 8), (19, 5, 5)])
def test_route_topk_matches_reference(backend, mode, T, E, k):
    logits64 = tie_free_logits(T, E, seed=T * 100 + E)
    logits = logits64.float().to(DEVICE).requires_grad_()
    w, idx = route_topk(logits, k, mode)
    assert w.dtype == torch.float32 and idx.dtype == torch.int32
    assert w.shape == (T, k) and idx.shape == (T, k)
    w_ref, idx_ref = reference_route(logits64, k, mode)
    assert torch.equal(idx.cpu().long(), idx_ref)
    torch.testing.assert_close(w.detach().cpu().double(), w_ref, rtol=1e-4, atol=1e-6)

    grad_w = torch.randn(T, k, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w.backward(grad_w.float().to(DEVICE))
    l64 = logits64.clone().requires_grad_()
    reference_weights_autograd(l64, idx_ref, mode).backward(grad_w)
    torch.testing.assert_close(logits.grad.cpu().double(), l64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_ties_go_to_the_lower_expert(backend):
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0],
                           [1.0, 3.0, 3.0, 0.0, 3.0],
                           [2.0, -1.0, 2.0, 2.0, -5.0],
                           [-1.0, 4.0, -1.0, -1.0, -1.0]], device=DEVICE)
    _, idx = route_topk(logits, 3, "sum")
    expected = [[0, 1, 2], [1, 2, 4], [0, 2, 3], [1, 0, 2]]
    assert idx.cpu().tolist() == expected


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_cuma_mode_is_softmax_of_probabilities(backend):
    # two experts, k=2: g_top1 = sigmoid(p1 - p2), inside [0.5, 0.731] for any logits
    logits = torch.tensor([[10.0, -10.0], [0.3, 0.1]], device=DEVICE)
    w, idx = route_topk(logits, 2, "cuma")
    p = torch.softmax(logits.cpu().double(), -1)
    expected = torch.sigmoid(p[:, 0] - p[:, 1])
    torch.testing.assert_close(w[:, 0].cpu().double(), expected, rtol=1e-5, atol=1e-6)
    assert (w[:, 0] <= 0.7311).all() and (w[:, 0] >= 0.5).all()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_and_strided_logits(backend, dtype):
    base = tie_free_logits(40, 8, seed=5)
    logits = base.to(dtype).to(DEVICE).t().contiguous().t()  # column-major view
    assert not logits.is_contiguous()
    w, idx = route_topk(logits, 2, "cuma")
    w_ref, idx_ref = reference_route(base.to(dtype).double(), 2, "cuma")
    assert torch.equal(idx.cpu().long(), idx_ref)
    torch.testing.assert_close(w.cpu().double(), w_ref, rtol=1e-4, atol=1e-6)


def test_route_topk_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[T, E\]"):
        route_topk(torch.randn(2, 3, 4), 1)
    with pytest.raises(ValueError, match="top_k"):
        route_topk(torch.randn(2, 3), 4)
    with pytest.raises(ValueError, match="top_k"):
        route_topk(torch.randn(2, 3), 0)
    with pytest.raises(ValueError, match="mode"):
        route_topk(torch.randn(2, 3), 1, mode="softmax")
    with pytest.raises(TypeError, match="floating"):
        route_topk(torch.ones(2, 3, dtype=torch.int64), 1)


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("CUMA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="CUMA_BACKEND"):
        route_topk(torch.randn(2, 3), 1)


def _idx_cases():
    g = torch.Generator().manual_seed(0)
    rand = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(37)])
    skewed = torch.zeros(50, 1, dtype=torch.int64)  # every token on expert 0
    empty = torch.tensor([[0, 3], [3, 0], [3, 5], [5, 0]] * 9)  # experts 1, 2, 4 unused
    return {"random": (rand, 8), "skewed": (skewed, 4), "empty_experts": (empty, 6),
            "no_tokens": (torch.zeros(0, 2, dtype=torch.int64), 3)}


@pytest.mark.parametrize("case", list(_idx_cases()))
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_dispatch_metadata_invariants(case, idx_dtype):
    idx, E = _idx_cases()[case]
    idx = idx.to(idx_dtype).to(DEVICE)
    md = dispatch_metadata(idx, E)
    T, k = idx.shape
    flat = idx.reshape(-1).cpu().long()
    counts, order, offsets = md.counts.cpu(), md.sort_order.cpu(), md.offsets.cpu()
    assert counts.dtype == order.dtype == offsets.dtype == torch.int64
    assert counts.tolist() == [int((flat == e).sum()) for e in range(E)]
    assert sorted(order.tolist()) == list(range(T * k))  # a permutation
    assert offsets.shape == (E + 1,) and offsets[0] == 0 and offsets[-1] == T * k
    assert (offsets[1:] - offsets[:-1]).tolist() == counts.tolist()
    for e in range(E):
        seg = order[offsets[e]:offsets[e + 1]]
        assert (flat[seg] == e).all()
        assert seg.tolist() == sorted(seg.tolist())  # stable: token order kept inside an expert
    assert md.sort_order.device == idx.device
    token_order = md.token_order.cpu()
    assert sorted(token_order.tolist()) == list(range(T))  # a permutation of the tokens
    expert_sets = [tuple(sorted(row)) for row in idx.cpu()[token_order].tolist()]
    assert expert_sets == sorted(expert_sets)  # tokens routed alike are neighbours


def test_dispatch_metadata_rejects_bad_shape():
    with pytest.raises(ValueError, match="topk_idx"):
        dispatch_metadata(torch.zeros(5, dtype=torch.int64), 3)


def test_public_names():
    for name in ("route_topk", "lora_experts", "dispatch_metadata", "DispatchMetadata"):
        assert hasattr(cuma_kernels, name)


NAN, INF = float("nan"), float("inf")
NON_FINITE_ROWS = [  # (logits, expected experts for k=2, finite weights?)
    ([0.5, NAN, 2.0, 1.0, -1.0], [2, 3], True),  # NaN reads as -inf
    ([NAN] * 5, [0, 1], False),  # no finite logit: NaN probabilities, lowest experts
    ([1.0, INF, 0.0, INF, 2.0], [0, 1], False),  # +inf: softmax undefined
    ([-INF, 1.0, -INF, 3.0, 0.0], [3, 1], True),
    ([-INF] * 5, [0, 1], False),
    ([NAN, -INF, 1.0, NAN, -INF], [2, 0], True),  # zero-probability ties go to the lower expert
]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_logits_pick_valid_experts(backend, mode):
    logits = torch.tensor([row for row, _, _ in NON_FINITE_ROWS], device=DEVICE).requires_grad_()
    w, idx = route_topk(logits, 2, mode)
    assert idx.cpu().tolist() == [experts for _, experts, _ in NON_FINITE_ROWS]
    finite = torch.tensor([ok for _, _, ok in NON_FINITE_ROWS])
    assert torch.isfinite(w[finite.to(w.device)]).all() and torch.isnan(w[~finite.to(w.device)]).all()
    sanitized = torch.nan_to_num(logits.detach().cpu().double(), nan=-INF, posinf=INF, neginf=-INF)[finite]
    w_ref, idx_ref = reference_route(sanitized, 2, mode)
    assert torch.equal(idx.cpu()[finite].long(), idx_ref)
    torch.testing.assert_close(w.detach().cpu().double()[finite], w_ref, rtol=1e-5, atol=1e-7)
    w.backward(torch.ones_like(w))
    grad = logits.grad.cpu()
    assert torch.isfinite(grad[finite]).all() and (grad[finite][torch.isnan(logits.detach().cpu()[finite])] == 0).all()


def test_non_finite_logits_agree_across_backends(monkeypatch):
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(64, 8, generator=gen)
    pick = torch.rand(64, 8, generator=gen)
    logits[pick < 0.15] = NAN
    logits[(pick >= 0.15) & (pick < 0.2)] = INF
    logits[(pick >= 0.2) & (pick < 0.3)] = -INF
    logits[:4] = NAN
    results = {}
    for name in BACKENDS:
        if name == "triton" and DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
        monkeypatch.setenv("CUMA_BACKEND", name)
        results[name] = route_topk(logits.to(DEVICE), 3, "cuma")
    (w_t, i_t), (w_k, i_k) = results["torch"], results["triton"]
    assert ((i_k >= 0) & (i_k < 8)).all() and torch.equal(i_t.cpu(), i_k.cpu())
    assert all(len(set(row)) == 3 for row in i_k.cpu().tolist())
    torch.testing.assert_close(w_k.cpu(), w_t.cpu(), equal_nan=True)

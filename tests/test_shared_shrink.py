"""Projections that share a router and an input run one shrink launch over their concatenated A's (Triton backend).

The kernel-level ops (`lora_shrink` over [A_q; A_k; A_v], then one `lora_expand` per projection) against an fp64
loop reference.
CUMA_TEST_DEVICE=cuda runs the same tests on a GPU.
"""
import os

import pytest
import torch

import cuma_kernels.grouped_lora as grouped_lora
from cuma_kernels import dispatch_metadata, lora_expand, lora_shrink
from cuma_kernels.reference import route_topk_torch

DEVICE = os.environ.get("CUMA_TEST_DEVICE", "cpu")

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton on CPU needs TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("CUMA_BACKEND", "triton")


def loop_reference(x, A, B, idx, w, scaling):
    """fp64: y_t = scaling * sum_j w_tj B_{e_tj} A_{e_tj} x_t, one token and slot at a time."""
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(B.shape[1], dtype=torch.float64)
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            a = A[0] if A.shape[0] == 1 else A[e]
            acc = acc + w[t, j] * (B[e] @ (a @ x[t]))
        rows.append(acc * scaling)
    return torch.stack(rows)


@pytest.mark.parametrize("shared_A", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_shrink_over_concatenated_A_matches_fp64(shared_A, dtype):
    # ranks 48 + 48 + 48 = 144 > 128: the shrink's backward runs its dx and dA in two rank chunks
    gen = torch.Generator().manual_seed(0)
    T, K, E, k, r, scaling = 37, 40, 5, 2, 48, 0.5
    widths = [24, 8, 17]  # N of the three projections
    x = torch.randn(T, K, generator=gen, dtype=torch.float64)
    As = [torch.randn(1 if shared_A else E, r, K, generator=gen, dtype=torch.float64) * 0.1 for _ in widths]
    Bs = [torch.randn(E, n, r, generator=gen, dtype=torch.float64) * 0.3 for n in widths]
    logits = torch.randn(T, E, generator=gen, dtype=torch.float64)
    dys = [torch.randn(T, n, generator=gen, dtype=torch.float64) for n in widths]
    bases = [torch.randn(T, n, generator=gen, dtype=torch.float64).to(dtype) for n in widths]  # the base outputs

    leaves = [t.to(dtype).double() for t in (x, logits, *As, *Bs)]  # the reference sees the rounded inputs
    ref = [t.clone().requires_grad_() for t in leaves]
    w, idx = route_topk_torch(ref[1], k)
    ys = [base.double() + loop_reference(ref[0], A, B, idx, w.double(), scaling)
          for A, B, base in zip(ref[2:5], ref[5:8], bases)]
    sum((y * dy).sum() for y, dy in zip(ys, dys)).backward()

    got = [t.to(DEVICE, dtype).detach().requires_grad_() for t in leaves]
    got[1] = got[1].detach().float().requires_grad_()  # router logits in fp32
    w, idx = route_topk_torch(got[1], k)
    dispatch = dispatch_metadata(idx.int(), E)
    h = lora_shrink(got[0], torch.cat(got[2:5], dim=1), idx.int(), E, dispatch)
    outs = [lora_expand(part, B, idx.int(), w, scaling, base.to(DEVICE), dispatch=dispatch)
            for part, B, base in zip(torch.split(h, r, dim=1), got[5:8], bases)]
    sum((y.float() * dy.to(y.device).float()).sum() for y, dy in zip(outs, dys)).backward()

    for y, y_ref in zip(outs, ys):
        y_ref = y_ref.detach()
        if dtype == torch.float32:
            torch.testing.assert_close(y.double().cpu(), y_ref, rtol=1e-4, atol=1e-4 * y_ref.abs().max().item())
        else:
            assert (y.double().cpu() - y_ref).abs().max() <= 1e-2 * y_ref.abs().max()
    for name, g, g_ref in zip(["x", "logits", "A_q", "A_k", "A_v", "B_q", "B_k", "B_v"], got, ref):
        rel = (g.grad.double().cpu() - g_ref.grad).norm() / g_ref.grad.norm()
        assert rel < (1e-4 if dtype == torch.float32 else 1e-2), name

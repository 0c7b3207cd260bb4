"""The base linear and its experts as one op (`linear_with_experts`): output and every gradient (x, the base
weight and bias, A, B, the gates) against an fp64 einsum reference, on the torch backend's two forms and on the
Triton kernels (the interpreter on a CPU; CUMA_TEST_DEVICE=cuda runs them for real)."""
import pytest
import torch

from cuma_kernels import linear_with_experts
from test_lora_expert_kernels import DEVICE, backend  # noqa: F401  (the backend fixture, by parameter)


def routing(T, E, k, pattern, gen):
    """[T, k] distinct experts per token. "random"; "skewed": 90% of the tokens put their first slot on expert 0;
    "empty": expert 1 is never chosen."""
    if pattern == "skewed":
        first = torch.where(torch.rand(T, generator=gen) < 0.9, 0, torch.randint(1, E, (T,), generator=gen))
        rows = [[int(f)] + [e for e in torch.randperm(E, generator=gen).tolist() if e != f][:k - 1] for f in first]
    else:
        pool = [e for e in range(E) if pattern != "empty" or e != 1]
        rows = [[pool[i] for i in torch.randperm(len(pool), generator=gen)[:k].tolist()] for _ in range(T)]
    idx = torch.tensor(rows, dtype=torch.int32).view(T, k)
    return idx, torch.rand(T, k, generator=gen) + 0.1


def reference(x, W, b, A, B, idx, w, scaling):
    idx = idx.long()
    a = A[idx] if A.shape[0] > 1 else A[0].expand(*idx.shape, *A.shape[1:])
    y = x @ W.t() + scaling * torch.einsum("tj,tjnr,tjrk,tk->tn", w, B[idx], a, x)
    return y if b is None else y + b


def run(T, K, N, r, E, k, dtype, pattern="random", bias=True, shared=False, weight_grad=False, seed=0):
    """{name: (got, fp64 reference)} for y and every gradient; fresh random inputs from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=gen)
    W = torch.randn(N, K, generator=gen) / K ** 0.5
    b = torch.randn(N, generator=gen) if bias else None
    A = torch.randn(1 if shared else E, r, K, generator=gen) / K ** 0.5
    B = torch.randn(E, N, r, generator=gen) / r ** 0.5
    idx, w = routing(T, E, k, pattern, gen)
    grad = torch.randn(T, N, generator=gen)
    scaling = 1.75

    names = ["x", "W", "b", "A", "B", "w"]
    leaves = {n: t for n, t in zip(names, (x, W, b, A, B, w)) if t is not None}
    dev = {n: (t.to(DEVICE) if n == "w" else t.to(dtype).to(DEVICE)).requires_grad_(n != "W" or weight_grad)
           for n, t in leaves.items()}
    y = linear_with_experts(dev["x"], dev["W"], dev.get("b"), dev["A"], dev["B"], idx.to(DEVICE), dev["w"], scaling)
    y.backward(grad.to(dtype).to(DEVICE))
    ref = {n: t.detach().cpu().double().requires_grad_() for n, t in dev.items()}
    y_ref = reference(ref["x"], ref["W"], ref.get("b"), ref["A"], ref["B"], idx, ref["w"], scaling)
    y_ref.backward(grad.double())
    assert y.dtype == dtype and y.shape == (T, N)
    out = {"y": (y.detach().cpu().double(), y_ref.detach())}
    for n, t in dev.items():
        if n == "W" and not weight_grad:
            assert t.grad is None
            continue
        assert t.grad.dtype == (torch.float32 if n == "w" else dtype), n
        out[n] = (t.grad.cpu().double(), ref[n].grad)
    return out


def check(res, dtype):
    for name, (got, ref) in res.items():
        scale = max(ref.abs().max().item(), 1e-6)
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}")
        elif name in ("y", "x"):  # activations: max-abs against the reference's scale
            assert (got - ref).abs().max() <= 1e-2 * scale, name
        else:  # weight and gate gradients: relative norm
            assert ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item() < 1e-2, name


BACKENDS = ["torch", "torch-routed", "triton"]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("pattern", ["random", "skewed", "empty"])
def test_fp32_matches_reference(backend, pattern):
    check(run(37, 67, 45, 5, 4, 2, torch.float32, pattern=pattern, seed={"random": 1, "skewed": 2, "empty": 3}[pattern]), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_reference(backend, dtype):
    check(run(37, 67, 45, 5, 4, 2, dtype, pattern="skewed", seed=5), dtype)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_without_bias_and_with_a_trainable_weight(backend):
    res = run(29, 40, 56, 8, 5, 2, torch.float32, bias=False, weight_grad=True, seed=9)
    assert "W" in res and "b" not in res
    check(res, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_shared_A_and_three_slots(backend):
    check(run(23, 40, 24, 16, 6, 3, torch.float32, shared=True, seed=4), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_no_tokens(backend):
    res = run(0, 40, 24, 8, 4, 2, torch.float32)
    assert res["y"][0].shape == (0, 24) and res["b"][0].abs().sum() == 0 and res["A"][0].abs().sum() == 0


def test_bad_base_weight_messages():
    x, A, B = torch.randn(4, 8), torch.randn(3, 2, 8), torch.randn(3, 6, 2)
    idx, w = torch.zeros(4, 2, dtype=torch.int32), torch.ones(4, 2)
    with pytest.raises(ValueError, match=r"weight must have shape \[N=6, K=8\], got \(6, 7\)"):
        linear_with_experts(x, torch.randn(6, 7), None, A, B, idx, w, 1.0)
    with pytest.raises(ValueError, match=r"bias must have shape \[N=6\]"):
        linear_with_experts(x, torch.randn(6, 8), torch.randn(5), A, B, idx, w, 1.0)
    with pytest.raises(TypeError, match=r"weight is torch.float16 .* compute dtype"):
        linear_with_experts(x, torch.randn(6, 8, dtype=torch.float16), None, A, B, idx, w, 1.0)
    with pytest.raises(TypeError, match=r"x must be float32, bfloat16 or float16"):
        linear_with_experts(x.double(), torch.randn(6, 8).double(), None, A.double(), B.double(), idx, w, 1.0)

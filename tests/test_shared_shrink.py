"""Projections that share a router and an input run one shrink launch over their concatenated A's (Triton backend).

The kernel-level ops (`lora_shrink` over [A_q; A_k; A_v], then one `lora_expand` per projection) against an fp64
loop reference, and the patched model against the per-projection path (CUMA_SHARED_SHRINK=0) and an fp64 model.
CUMA_TEST_DEVICE=cuda runs the same tests on a GPU.
"""
import os

import pytest
import torch
from torch import nn

import cuma_kernels.grouped_lora as grouped_lora
import cuma_model
from cuma_kernels import dispatch_metadata, lora_expand, lora_shrink
from cuma_kernels.reference import route_topk_torch
from cuma_model.context import ForwardState, activate
from tiny_models import randomize_experts, tiny_decoder

DEVICE = os.environ.get("CUMA_TEST_DEVICE", "cpu")
QKV, GATE_UP = ["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton on CPU needs TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("CUMA_BACKEND", "triton")
    # plain frozen nn.Linear bases would otherwise own their base per projection instead of sharing the shrink
    # (tests/test_owned_base_linear.py covers that choice)
    monkeypatch.setenv("CUMA_OWN_BASE", "0")


@pytest.fixture
def shrink_calls(monkeypatch):
    """Counts the shrink launches (the Python launcher of the shrink kernel; shared A: its one GEMM)."""
    calls = []
    launcher = grouped_lora.lora_shrink

    def counting(x, lora_A, *args):
        calls.append(lora_A.shape[1])
        return launcher(x, lora_A, *args)

    monkeypatch.setattr(grouped_lora, "lora_shrink", counting)
    return calls


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


def tiny_model(targets, dtype=torch.float32, shared_A=False, dropout=0.0, checkpointing=None):
    model = tiny_decoder("llama", dtype=dtype)
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=8, demographic_dim=4, shared_A=shared_A,
                           target_modules=targets, dropout=dropout)
    randomize_experts(model)
    model.train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    return model.to(DEVICE)


def run(model, device=DEVICE):
    """Logits and every gradient: the input embeddings' (dx), cuma_A, cuma_B and the routers'."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (2, 7), generator=gen).to(device)
    z = torch.randn(2, 4, generator=gen).to(device)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    out = model(inputs_embeds=embeds, demographic_embeds=z.to(embeds.dtype))
    weights = torch.linspace(-1, 1, out.logits.shape[-1], device=device, dtype=torch.float64)
    (out.logits.double() * weights).sum().backward()
    grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.requires_grad}
    grads["inputs_embeds"] = embeds.grad.detach().double().cpu()
    return out.logits.detach().double().cpu(), grads


def fp64_reference(model, targets, monkeypatch, shared_A=False):
    """`model`'s weights in fp64 on the torch backend, one shrink per projection: an independent reference."""
    monkeypatch.setenv("CUMA_BACKEND", "torch")
    try:
        ref = tiny_model(targets, torch.float64, shared_A).to("cpu")
        ref.load_state_dict({k: v.detach().double().cpu() for k, v in model.state_dict().items()})
        return run(ref, "cpu")
    finally:
        monkeypatch.setenv("CUMA_BACKEND", "triton")


def assert_matches(got, ref, dtype):
    (logits, grads), (logits_ref, grads_ref) = got, ref
    scale = logits_ref.abs().max()
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert (logits - logits_ref).abs().max() <= tol * scale
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        rel = (grads[name] - grads_ref[name]).norm() / grads_ref[name].norm().clamp_min(1e-30)
        assert rel < (1e-4 if dtype == torch.float32 else 1e-2), (name, float(rel))


@pytest.mark.parametrize("shared_A", [False, True])
def test_model_qkv_and_gate_up_share_one_shrink_each(monkeypatch, shrink_calls, shared_A):
    targets = QKV + GATE_UP
    model = tiny_model(targets, shared_A=shared_A)
    ref = fp64_reference(model, targets, monkeypatch, shared_A)
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    got = run(model)
    assert before == {name: set(vars(m)) for name, m in model.named_modules()}  # the sharing lives in the state
    layers = model.config.num_hidden_layers
    assert shrink_calls == [3 * 8, 2 * 8] * layers  # one launch per sibling set: q/k/v, then gate/up
    assert_matches(got, ref, torch.float32)
    shrink_calls.clear()
    monkeypatch.setenv("CUMA_SHARED_SHRINK", "0")
    per_projection = run(tiny_model(targets, shared_A=shared_A))
    assert shrink_calls == [8] * 5 * layers
    assert_matches(got, per_projection, torch.float32)


def test_model_bf16_q_and_v_only(monkeypatch, shrink_calls):
    model = tiny_model(["q_proj", "v_proj"], torch.bfloat16)
    got = run(model)
    assert shrink_calls == [2 * 8] * model.config.num_hidden_layers  # q and v: still one launch
    monkeypatch.setenv("CUMA_SHARED_SHRINK", "0")
    assert_matches(got, run(tiny_model(["q_proj", "v_proj"], torch.bfloat16)), torch.bfloat16)
    # against fp64 the whole bf16 network's rounding counts (its base layers too): outputs only here; the bf16
    # gradients against fp64 are checked at the kernel level above
    logits_ref, _ = fp64_reference(model, ["q_proj", "v_proj"], monkeypatch)
    assert (got[0] - logits_ref).abs().max() <= 1e-2 * logits_ref.abs().max()


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_replays_the_shared_shrink(monkeypatch, shrink_calls, reentrant):
    targets = QKV + GATE_UP
    plain = run(tiny_model(targets))
    forward_launches = len(shrink_calls)
    shrink_calls.clear()
    got = run(tiny_model(targets, checkpointing=reentrant))
    assert len(shrink_calls) == 2 * forward_launches  # the forward and its replay, each shared
    assert_matches(got, plain, torch.float32)


def test_siblings_fed_different_inputs_do_not_share(shrink_calls):
    model = tiny_model(QKV)
    attn = model.model.layers[0].self_attn
    handle = model.cuma
    gen = torch.Generator().manual_seed(3)
    x1, x2 = (torch.randn(2, 5, 32, generator=gen).to(DEVICE) for _ in range(2))
    z = torch.randn(2, 4, generator=gen).to(DEVICE)
    with torch.no_grad(), activate(ForwardState(handle, z)):
        got = [attn.q_proj(x1), attn.k_proj(x2), attn.v_proj(x1)]
    os.environ["CUMA_SHARED_SHRINK"] = "0"
    try:
        with torch.no_grad(), activate(ForwardState(handle, z)):
            want = [attn.q_proj(x1), attn.k_proj(x2), attn.v_proj(x1)]
    finally:
        del os.environ["CUMA_SHARED_SHRINK"]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # each input met a fresh route (the cache keeps the last input): three shared launches, each used by one layer
    assert shrink_calls[:3] == [24, 24, 24] and len(shrink_calls) == 6


def test_active_dropout_keeps_per_projection_shrinks(shrink_calls):
    model = tiny_model(QKV, dropout=0.1)
    run(model)
    assert shrink_calls == [8] * 3 * model.config.num_hidden_layers
    shrink_calls.clear()
    model.eval()
    with torch.no_grad():
        model(torch.randint(3, 97, (1, 4)).to(DEVICE), demographic_embeds=torch.randn(1, 4).to(DEVICE))
    assert shrink_calls == [24] * model.config.num_hidden_layers  # dropout off in eval: shared again
    assert isinstance(model.model.layers[0].self_attn.q_proj.cuma_dropout, nn.Dropout)


def test_a_layer_called_outside_a_forward_runs_its_own_shrink(shrink_calls):
    model = tiny_model(QKV)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, 32).to(DEVICE)
    with torch.no_grad(), cuma_model.conditioning(model, torch.randn(2, 4).to(DEVICE)):
        attn.q_proj(x), attn.k_proj(x)  # no forward state: no route cache, nothing to share
    assert shrink_calls == [8, 8]

"""The adapted projection computes a plain frozen nn.Linear base together with its experts (one op, one dx
buffer): the patched model gives the same loss and gradients with that path on and off (CUMA_OWN_BASE; off, the
Triton backend shares one shrink between q/k/v instead), and bases it must not own (trainable, hooked, wrapped)
keep their own forward."""
import os

import pytest
import torch
from torch import nn

import cuma_kernels
import cuma_model
from tiny_models import randomize_experts, tiny_decoder


def output_nodes(model):
    """The autograd node that made every adapted projection's output (under its reshape), collected as they run."""
    nodes = []

    def record(module, args, out):
        node = out.grad_fn
        while type(node).__name__ in ("ViewBackward0", "UnsafeViewBackward0"):
            node = node.next_functions[0][0]
        nodes.append(type(node).__name__)

    for layer in cuma_model.cuma_layers(model).values():
        layer.register_forward_hook(record)
    return nodes


def run(monkeypatch, own, backend="torch", bias=False, dtype=torch.float32, upcast=False, **patch):
    monkeypatch.setenv("CUMA_BACKEND", backend)
    monkeypatch.setenv("CUMA_OWN_BASE", "1" if own else "0")
    model = tiny_decoder("qwen2" if bias else "llama", dtype=dtype)  # qwen2's q/k/v carry a bias
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=8, demographic_dim=4, **patch)
    randomize_experts(model)
    if upcast:  # the same (low-precision) values, computed in fp32
        model.float()
        dtype = torch.float32
    nodes = output_nodes(model)
    shrinks = []
    real_shrink = cuma_kernels.lora_shrink
    monkeypatch.setattr(cuma_kernels, "lora_shrink", lambda *a, **kw: shrinks.append(1) or real_shrink(*a, **kw))
    model.train()
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 4, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = model(ids, demographic_embeds=z, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach().float(), grads, nodes, len(shrinks)


def compare(on, off, tol):
    loss_on, grads_on = on[:2]
    loss_off, grads_off = off[:2]
    torch.testing.assert_close(loss_on, loss_off, rtol=tol, atol=tol)
    assert grads_on.keys() == grads_off.keys() and any("cuma_A" in n for n in grads_on)
    for name in grads_off:
        rel = (grads_on[name] - grads_off[name]).norm() / grads_off[name].norm().clamp_min(1e-12)
        assert rel < tol, name


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_owned_base_gives_the_same_loss_and_gradients(monkeypatch, backend, bias):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    on = run(monkeypatch, True, backend, bias)
    off = run(monkeypatch, False, backend, bias)
    assert on[2] and set(on[2]) == {"_LinearWithExpertsBackward"}  # every projection: one op, one backward
    assert "_LinearWithExpertsBackward" not in off[2]
    if backend == "triton":  # off, q and v share one shrink (each expands its slice); on, each owns its base
        assert on[3] == 0 and off[3] == 2  # shared shrinks: one per layer
    compare(on, off, 1e-4)


def test_owned_base_in_bfloat16(monkeypatch):
    """bf16 rounds differently on the two paths: each is compared with the same model computed in fp32, and the
    owned path may not be further from it than about the other path is. The router's first layer is the
    exception: its gradient sums near-cancelling terms (the gates' softmax Jacobian) and is 10-20% off fp32 on
    either path, so it only has to stay within that band."""
    ref = run(monkeypatch, False, dtype=torch.bfloat16, upcast=True)
    on, off = (run(monkeypatch, own, dtype=torch.bfloat16) for own in (True, False))
    assert set(on[2]) == {"_LinearWithExpertsBackward"}
    assert abs(on[0] - ref[0]) <= 1e-2 * abs(ref[0])
    for name, g in ref[1].items():
        err_on, err_off = ((run_[1][name] - g).norm() / g.norm().clamp_min(1e-12) for run_ in (on, off))
        bound = 0.25 if "cuma_router.layers.0." in name else 2 * err_off + 1e-2
        assert err_on <= bound, (name, float(err_on), float(err_off))


def test_bases_it_must_not_own_keep_their_forward(monkeypatch):
    monkeypatch.setenv("CUMA_BACKEND", "torch")
    model = tiny_decoder("llama")
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=8, demographic_dim=4)
    layers = list(cuma_model.cuma_layers(model).values())
    x = torch.randn(2, 3, layers[0].in_features)
    owns = [layer._owns_base(x) for layer in layers]
    assert all(owns)
    layers[0].base_layer.weight.requires_grad_(True)  # a trainable base weight
    layers[1].base_layer.register_forward_hook(lambda *_: None)  # someone else's hook on the base
    wrapped = nn.Linear(layers[2].in_features, layers[2].out_features)
    wrapped.__class__ = type("WrappedLinear", (nn.Linear,), {})  # a subclass (as quantized layers are)
    layers[2].base_layer = wrapped.requires_grad_(False)
    assert [layer._owns_base(x) for layer in layers[:3]] == [False, False, False]
    assert not layers[3]._owns_base(x.double())  # another dtype than the base's
    monkeypatch.setenv("CUMA_OWN_BASE", "0")
    assert not layers[3]._owns_base(x)
    monkeypatch.delenv("CUMA_OWN_BASE")
    layers[3].train()
    layers[3].cuma_dropout = nn.Dropout(0.1)  # each call draws a mask for the experts' input only
    assert not layers[3]._owns_base(x)


def test_trainable_base_falls_back_and_stays_correct(monkeypatch):
    def with_trainable_q(own):
        monkeypatch.setenv("CUMA_BACKEND", "torch")
        monkeypatch.setenv("CUMA_OWN_BASE", "1" if own else "0")
        model = tiny_decoder("llama")
        cuma_model.patch_model(model, num_experts=4, top_k=2, r=8, demographic_dim=4)
        randomize_experts(model)
        q = next(layer for name, layer in cuma_model.cuma_layers(model).items() if name.endswith("q_proj"))
        q.base_layer.weight.requires_grad_(True)
        ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
        z = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
        model(ids, demographic_embeds=z, labels=ids).loss.backward()
        return q.base_layer.weight.grad

    grad_on, grad_off = with_trainable_q(True), with_trainable_q(False)
    assert grad_on is not None and grad_on.norm() > 0
    torch.testing.assert_close(grad_on, grad_off, rtol=1e-4, atol=1e-6)

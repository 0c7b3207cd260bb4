"""The patched model gives the same outputs and gradients on the Triton kernels as on the torch path."""
import pytest
import torch

import cuma_model
from tiny_models import randomize_experts, tiny_decoder


def run(backend, monkeypatch, shared_A):
    monkeypatch.setenv("CUMA_BACKEND", backend)
    model = tiny_decoder("llama")
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=16, demographic_dim=4, shared_A=shared_A)
    randomize_experts(model)
    model.train()
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    out = model(ids, demographic_embeds=z, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


@pytest.mark.parametrize("shared_A", [False, True])
def test_triton_backend_matches_torch_in_the_model(monkeypatch, shared_A):
    logits_t, grads_t = run("torch", monkeypatch, shared_A)
    logits_k, grads_k = run("triton", monkeypatch, shared_A)
    torch.testing.assert_close(logits_k, logits_t, rtol=1e-4, atol=1e-5)
    assert grads_k.keys() == grads_t.keys()
    for name in grads_t:
        rel = (grads_k[name] - grads_t[name]).norm() / grads_t[name].norm().clamp_min(1e-12)
        assert rel < 1e-3, name

"""torch.compile(fullgraph=True) of a patched model: a training step with z is one graph, the same as eager, and
neither training batches nor generate calls of one shape recompile."""
import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import cuma_model
from tiny_models import randomize_experts, tiny_decoder

D = 4


def patched(**kw):
    model = tiny_decoder("llama")
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=4, demographic_dim=D, router_hidden_dim=8,
                           target_modules=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), aux_loss_coef=0.1,
                           **kw)
    randomize_experts(model, std=0.3)
    return model


def batch(seed, rows=2, seq=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding: the aux loss must skip it in both
    return dict(input_ids=ids, attention_mask=mask, labels=ids, demographic_embeds=torch.randn(rows, D, generator=g) * 2)


def step(run, model, inputs):
    model.zero_grad()
    out = run(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), out.aux_loss.detach(), grads


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_compiled_training_step_is_one_graph_equal_to_eager_and_batches_do_not_recompile(backend, monkeypatch):
    """The Triton backend (the interpreter on CPU) adds the GPU path's Python: dispatch metadata, the shared
    q/k/v and gate/up shrink."""
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    monkeypatch.setenv("CUMA_BACKEND", backend)
    torch._dynamo.reset()
    model = patched().train()
    counter = CompileCounterWithBackend("aot_eager")  # AOT autograd: the backward is traced too
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # fullgraph: any graph break raises
    for seed in range(3):  # new tokens and new z, one shape
        inputs = batch(seed)
        eager = step(model, model, inputs)
        got = step(compiled, model, inputs)
        torch.testing.assert_close(got[0], eager[0])
        torch.testing.assert_close(got[1], eager[1])
        assert eager[1] > 0
        for n in eager[2]:
            torch.testing.assert_close(got[2][n], eager[2][n], rtol=1e-5, atol=1e-7, msg=n)
        assert any(g.abs().sum() > 0 for n, g in got[2].items() if "router" in n)
    assert counter.frame_count == 1


def test_generation_with_z_through_a_compiled_forward_does_not_recompile_across_calls():
    torch._dynamo.reset()
    model = patched().eval()
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    calls = [batch(seed) for seed in (10, 11, 12, 13)]
    with torch.no_grad():
        expected = [model.generate(c["input_ids"], attention_mask=c["attention_mask"],
                                   demographic_embeds=c["demographic_embeds"], **kw) for c in calls]
        counter = CompileCounterWithBackend("eager")
        model.forward = torch.compile(model.forward, backend=counter, fullgraph=True)
        seen = []
        for i, (c, want) in enumerate(zip(calls, expected)):
            if i % 2:  # z through the context
                with cuma_model.conditioning(model, c["demographic_embeds"]):
                    got = model.generate(c["input_ids"], attention_mask=c["attention_mask"], **kw)
            else:  # z as the keyword
                got = model.generate(c["input_ids"], attention_mask=c["attention_mask"],
                                     demographic_embeds=c["demographic_embeds"], **kw)
            assert torch.equal(got, want)
            seen.append(counter.frame_count)
    # the keyword and the context are two states of the conditioning: each compiles once (prefill and decode
    # shapes), and later calls of either do not recompile
    assert seen[0] >= 1 and seen[2] == seen[1] and seen[3] == seen[1]
    assert not torch.equal(expected[0], expected[1])  # the calls really differ


def test_a_compiled_direct_backbone_call_is_one_graph_and_carries_the_aux_gradient(monkeypatch):
    """TRL's route: the backbone called with z, the aux loss handed to the caller's backward (its warning about the
    missing accumulation steps stays out of the graph)."""
    monkeypatch.setenv("CUMA_OWN_BASE", "0")  # compiled code never owns the base: eager runs the same ops, to the bit
    torch._dynamo.reset()
    model = patched().train()
    inputs = batch(5)
    probe = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))

    def loss_of(run):
        model.zero_grad()
        hidden = run(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     demographic_embeds=inputs["demographic_embeds"]).last_hidden_state
        (hidden * probe).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    counter = CompileCounterWithBackend("aot_eager")
    got = loss_of(torch.compile(model.model, backend=counter, fullgraph=True))  # first: its warning not yet given
    eager = loss_of(model.model)
    assert counter.frame_count == 1
    for n in eager:
        torch.testing.assert_close(got[n], eager[n], rtol=1e-5, atol=1e-7, msg=n)
    assert any(g.abs().sum() > 0 for n, g in got.items() if "router" in n)

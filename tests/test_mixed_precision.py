"""Mixed precision: under autocast the experts run in the autocast dtype with fp32 masters, within tolerance of fp32."""
import pytest
import torch

import cuma_model
from tiny_models import randomize_experts, tiny_decoder


def patched(**kw):
    model = tiny_decoder("llama")
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=8, demographic_dim=4, **kw)
    randomize_experts(model, std=0.3)
    return model


def layer_pass(model, layer, x, z, grad_out, autocast_dtype=None):
    params = [layer.cuma_A, layer.cuma_B, *layer.cuma_router.parameters()]
    for p in params:
        p.grad = None
    x = x.clone().requires_grad_(True)
    ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
    with cuma_model.forward_scope(model, z), ctx:
        y = layer(x)
    (y.float() * grad_out).sum().backward()
    return y, x.grad, [p.grad.clone() for p in (layer.cuma_A, layer.cuma_B)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared_A", [False, True])
def test_autocast_layer_matches_fp32(dtype, shared_A):
    model = patched(shared_A=shared_A)
    layer = model.model.layers[1].self_attn.v_proj
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(3, 11, 32, generator=g), torch.randn(3, 4, generator=g)
    grad_out = torch.randn(3, 11, layer.out_features, generator=g)
    y32, dx32, dw32 = layer_pass(model, layer, x, z, grad_out)
    y16, dx16, dw16 = layer_pass(model, layer, x, z, grad_out, dtype)
    assert y16.dtype == dtype and y32.dtype == torch.float32
    assert layer.cuma_A.dtype == torch.float32 and all(d.dtype == torch.float32 for d in dw16)  # fp32 masters
    assert (y16.float() - y32).abs().max() <= 1e-2 * y32.abs().max()
    assert (dx16.float() - dx32).norm() <= 1e-2 * dx32.norm()
    for d16, d32 in zip(dw16, dw32):
        assert (d16 - d32).norm() <= 1e-2 * d32.norm()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_model_trains(dtype):
    model = patched(target_modules=("q_proj", "v_proj", "gate_proj", "up_proj"))
    model.train()
    ids, z = torch.randint(3, 97, (2, 9)), torch.randn(2, 4)
    with torch.autocast("cpu", dtype=dtype):
        out = model(ids, labels=ids, demographic_embeds=z)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.aux_loss is not None
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.autocast("cpu", dtype=dtype), torch.no_grad():
        model.eval()
        model.generate(ids, demographic_embeds=z, max_new_tokens=3, do_sample=False)

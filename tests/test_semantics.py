"""The published math, checked against a loop oracle written here from the reference description."""
import pytest
import torch
from torch import nn

import cuma_model
from tiny_models import randomize_experts, tiny_decoder


def oracle_router_gates(router, x, z, mode):
    """Published CulturalRouter: cat([x, z]) -> Sequential MLP -> softmax -> (top-k: finfo.min scatter, softmax)."""
    lin = list(router.layers)
    u = torch.cat([x, z[:, None, :].expand(x.shape[0], x.shape[1], z.shape[1])], -1) if z is not None else x
    h = u
    for i, layer in enumerate(lin):
        h = layer(h)
        if i < len(lin) - 1:
            h = torch.relu(h)
    P = torch.softmax(h, -1)
    if mode == "soft":
        return P
    if mode == "sum":
        vals, idx = torch.topk(P, router.top_k)
        return torch.zeros_like(P).scatter(-1, idx, vals / vals.sum(-1, keepdim=True))
    vals, idx = torch.topk(P, router.top_k)
    G = torch.full_like(P, torch.finfo(P.dtype).min).scatter(-1, idx, vals)
    return torch.softmax(G, -1)


def oracle_cuma_linear(layer, x, G):
    """Published CuMALinear forward: base + loop over (slot, expert) with boolean masks."""
    out = layer.base_layer(x)
    w, I = torch.topk(G, layer.cuma_router.top_k)
    lora = torch.zeros_like(out)
    A, B, s = layer.expert_weights()
    for kk in range(I.shape[-1]):
        for e in range(B.shape[0]):
            m = I[..., kk] == e
            if not m.any():
                continue
            a = A[0] if A.shape[0] == 1 else A[e]
            lora[m] += ((x[m] @ a.T) @ B[e].T) * w[..., kk][m, None] * s
    return out + lora


def oracle_aux(G, attention_mask, top_k):
    m = attention_mask.to(G.dtype)
    N = m.sum()
    Gm = G * m[..., None]
    freq = torch.sign(Gm * m[..., None]).sum((0, 1)) / (N * top_k)
    prop = Gm.sum((0, 1)) / N
    return G.shape[-1] * (freq * prop).sum()


@pytest.mark.parametrize("mode", ["cuma", "sum", "soft"])
@pytest.mark.parametrize("shared_A", [False, True])
@pytest.mark.parametrize("share", [True, False])
def test_layers_and_aux_loss_match_published_loop(mode, shared_A, share):
    model = tiny_decoder("llama", dtype=torch.float64)
    cuma_model.patch_model(model, num_experts=5, top_k=2, r=4, lora_alpha=8, demographic_dim=6,
                           router_hidden_dim=12, routing_mode=mode, shared_A=shared_A, adapter_dtype="float32",
                           share_router_qkv=share, target_modules=("q_proj", "k_proj", "v_proj", "up_proj"))
    model.to(torch.float64)
    randomize_experts(model)
    seen = {}
    hooks = [layer.register_forward_hook(lambda mod, inp, out, n=name: seen.__setitem__(n, (inp[0], out)))
             for name, layer in cuma_model.cuma_layers(model).items()]
    torch.manual_seed(3)
    ids = torch.randint(3, 97, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in one row: the aux loss must ignore it
    z = torch.randn(3, 6, dtype=torch.float64)
    model.train()
    out = model(ids, attention_mask=mask, demographic_embeds=z, labels=ids)
    for h in hooks:
        h.remove()

    expected_aux = 0.0
    counted = set()
    for name, layer in cuma_model.cuma_layers(model).items():
        x, y = seen[name]
        G = oracle_router_gates(layer.cuma_router, x, z, mode)
        torch.testing.assert_close(y, oracle_cuma_linear(layer, x, G), rtol=1e-5, atol=1e-7)
        if layer.cuma_router.key not in counted:
            counted.add(layer.cuma_router.key)
            expected_aux = expected_aux + oracle_aux(G, mask, layer.cuma_router.top_k)
    assert len(counted) == len(cuma_model.routers(model))
    torch.testing.assert_close(out.aux_loss, 0.01 * expected_aux.to(out.aux_loss.dtype), rtol=1e-5, atol=1e-8)
    if mode == "soft":  # the published soft routing makes the loss a constant E / k per router
        torch.testing.assert_close(out.aux_loss.double(), torch.tensor(0.01 * len(counted) * 5 / 2, dtype=torch.float64))


def test_init_matches_published():
    model = tiny_decoder("llama", hidden_size=64, intermediate_size=64)
    cuma_model.patch_model(model, num_experts=8, r=16, lora_alpha=32, demographic_dim=4)
    A = torch.cat([l.cuma_A.flatten() for l in cuma_model.cuma_layers(model).values()])
    assert abs(A.std().item() - 0.01) < 0.001
    for layer in cuma_model.cuma_layers(model).values():
        assert torch.count_nonzero(layer.cuma_B) == 0 and layer.scaling == 2.0
    ids = torch.randint(3, 97, (2, 5))
    base = tiny_decoder("llama", hidden_size=64, intermediate_size=64)
    torch.testing.assert_close(model(ids, demographic_embeds=torch.randn(2, 4)).logits, base(ids).logits)


def test_router_interfaces():
    model = tiny_decoder("llama")
    cuma_model.patch_model(model, num_experts=6, top_k=3, r=4, demographic_dim=5)
    routers = cuma_model.routers(model)
    assert len(routers) == 2 and all(r.key.endswith("q_proj.cuma_router") for r in routers)
    x, z = torch.randn(2, 7, 32), torch.randn(2, 5)
    logits = routers[0].logits(x, z)
    assert logits.shape == (2, 7, 6)
    w, idx = routers[0].route(x, z)
    assert w.dtype == torch.float32 and idx.dtype == torch.int64 and w.shape == idx.shape == (2, 7, 3)
    torch.testing.assert_close(idx, torch.topk(torch.softmax(logits, -1), 3).indices)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 7))
    for layer in cuma_model.cuma_layers(model).values():
        A, B, s = layer.expert_weights()
        assert A.shape == (6, 4, layer.in_features) and B.shape == (6, layer.out_features, 4)


def test_demographic_scale_multiplies_z_at_the_router_input(tmp_path):
    scaled, plain = tiny_decoder("llama"), tiny_decoder("llama")
    cuma_model.patch_model(scaled, demographic_dim=5, demographic_scale=7.5)
    cuma_model.patch_model(plain, demographic_dim=5)
    plain.load_state_dict(scaled.state_dict())
    x, z = torch.randn(2, 7, 32), torch.randn(2, 5)
    r_scaled, r_plain = cuma_model.routers(scaled)[0], cuma_model.routers(plain)[0]
    torch.testing.assert_close(r_scaled.logits(x, z), r_plain.logits(x, 7.5 * z))
    assert not torch.allclose(r_scaled.logits(x, z), r_plain.logits(x, z))
    # the oracle router (published cat([x, z]) MLP) on the scaled z
    torch.testing.assert_close(torch.softmax(r_scaled.logits(x, z), -1),
                               oracle_router_gates(r_plain, x, 7.5 * z, "soft"))
    scaled.cuma.config.save(tmp_path)
    assert cuma_model.CuMAConfig.load(tmp_path).demographic_scale == 7.5


def test_shared_router_runs_once_per_layer():
    model = tiny_decoder("llama")
    cuma_model.patch_model(model, demographic_dim=4, target_modules=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
    r0 = cuma_model.routers(model)[0]
    orig = type(r0).logits
    counter = []

    def counting(self, x, z):
        counter.append(self.key)
        return orig(self, x, z)

    type(r0).logits = counting
    try:
        model(torch.randint(3, 97, (2, 6)), demographic_embeds=torch.randn(2, 4))
    finally:
        type(r0).logits = orig
    assert len(cuma_model.routers(model)) == 4  # (qkv, gate/up) x 2 layers
    assert sorted(counter) == sorted(r.key for r in cuma_model.routers(model))


def test_only_adapter_parameters_train_and_base_is_wrapped_not_copied():
    model = tiny_decoder("llama")
    q = model.model.layers[0].self_attn.q_proj
    cuma_model.patch_model(model, demographic_dim=4)
    assert model.model.layers[0].self_attn.q_proj.base_layer is q
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("cuma_" in n for n in trainable)
    assert not q.weight.requires_grad


def test_config_validation_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="top_k"):
        cuma_model.CuMAConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="routing_mode"):
        cuma_model.CuMAConfig(routing_mode="hard")
    with pytest.raises(ValueError, match="dropout"):
        cuma_model.CuMAConfig(dropout=1.5)
    with pytest.raises(ValueError, match="target_modules"):
        cuma_model.CuMAConfig(target_modules=())
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="demographic_scale"):
            cuma_model.CuMAConfig(demographic_scale=bad)
    cfg = cuma_model.CuMAConfig(num_experts=4, top_k=1, shared_A=True, target_modules=["q_proj"])
    cfg.save(tmp_path)
    assert cuma_model.CuMAConfig.load(tmp_path) == cfg
    with pytest.raises(ValueError, match="unknown"):
        cuma_model.CuMAConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="no linear layer matches"):
        cuma_model.patch_model(tiny_decoder("llama"), target_modules=("nope",))

"""The published encoder projection of z (`demographic_projection_layers`): one module for every router, applied
after the z statistics, trained with the routers, saved with the adapter on both save paths."""
import json

import pytest
import torch
import torch.nn.functional as F

import cuma_model
from cuma_model.checkpoint import adapter_state_dict
from cuma_model.router import DemographicProjection, DemographicRouter, demographic_statistics
from tiny_models import randomize_experts, tiny_decoder

D = 6


def profiles(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 1.0 + 0.3 * torch.randn(n, D, generator=g)


def patched(layers=2, norm="whiten", seed=0):
    model = tiny_decoder("llama", seed=seed)
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=4, demographic_dim=D, router_hidden_dim=8,
                           demographic_norm=norm, demographic_projection_layers=layers, share_router_qkv=False)
    randomize_experts(model, std=0.5)
    if norm != "none":
        cuma_model.fit_demographic_norm(model, profiles(40))
    return model


def test_the_router_routes_on_the_projection_of_the_whitened_z():
    torch.manual_seed(0)
    projection = DemographicProjection(D, 2, dtype=torch.float64)
    for p in projection.parameters():
        torch.nn.init.normal_(p, std=0.5)
    router = DemographicRouter(8, D, 4, 2, hidden_dim=16, demographic_scale=2.0, demographic_norm="whiten",
                               projection=projection, dtype=torch.float64)
    mean, whiten = demographic_statistics(profiles(40), whiten=True)
    router.set_demographic_norm(mean, whiten)
    x, z = torch.randn(3, 5, 8, dtype=torch.float64), profiles(3, seed=1).double()
    # by hand: whiten, scale, Linear, GELU, Linear, then the router's MLP on [x ; z']
    zn = 2.0 * ((z - mean.double()) @ whiten.double().T)
    l1, l2 = projection.layers
    zp = F.linear(F.gelu(F.linear(zn, l1.weight, l1.bias)), l2.weight, l2.bias)
    first, second = router.layers
    u = torch.cat([x, zp[:, None, :].expand(3, 5, D)], dim=-1)
    expected = F.linear(F.relu(F.linear(u, first.weight, first.bias)), second.weight, second.bias)
    torch.testing.assert_close(router.logits(x, z), expected)


def test_the_one_layer_projection_starts_as_published():
    torch.manual_seed(0)
    layer = DemographicProjection(384, 1).layers[0]
    assert torch.all(layer.bias == 0)
    expected_std = 0.01 * (2.0 / (384 + 384)) ** 0.5  # xavier normal, gain 0.01
    assert abs(layer.weight.std().item() / expected_std - 1) < 0.05


def test_one_projection_is_shared_trained_and_saved_once():
    model = patched()
    routers = cuma_model.routers(model)
    assert len(routers) > 1 and all(r.projection is model.cuma.projection for r in routers)
    names = [k for k in adapter_state_dict(model) if ".projection." in k]
    assert len(names) == 4  # two Linear layers, under one router's name only
    ids, z = torch.randint(3, 97, (2, 5)), profiles(2, seed=2)
    model.train()
    model(ids, demographic_embeds=z, labels=ids).loss.backward()
    grads = [p.grad for p in model.cuma.projection.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    # z reaches the output through the projection: changing it changes the logits
    model.eval()
    with torch.no_grad():
        before = model(ids, demographic_embeds=z).logits
        model.cuma.projection.layers[1].bias.add_(1.0)
        after = model(ids, demographic_embeds=z).logits
    assert not torch.allclose(before, after)


def test_the_projection_travels_with_the_adapter_on_both_paths(tmp_path):
    from peft import PeftModel

    model = patched(layers=2)
    with torch.no_grad():
        for p in model.cuma.projection.parameters():
            p.normal_(std=0.5)
    ids, z = torch.randint(3, 97, (2, 5)), profiles(2, seed=3)
    model.eval()
    with torch.no_grad():
        expected = model(ids, demographic_embeds=z).logits
    cuma_model.save_pretrained(model, tmp_path / "a")
    d = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert d["cuma_config_version"] == 4 and d["demographic_projection_layers"] == 2
    peft_model = PeftModel.from_pretrained(tiny_decoder("llama"), tmp_path / "a", is_trainable=True)
    peft_model.save_pretrained(tmp_path / "b")  # PEFT's own writer
    for loaded in (cuma_model.from_pretrained(tiny_decoder("llama"), tmp_path / "a"),
                   PeftModel.from_pretrained(tiny_decoder("llama"), tmp_path / "b")):
        loaded.eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids, demographic_embeds=z).logits, expected)
    assert any(".projection." in n for n, p in peft_model.named_parameters() if p.requires_grad)


def test_the_option_is_checked_and_left_out_of_files_that_do_not_use_it(tmp_path):
    with pytest.raises(ValueError, match="demographic_projection_layers must be 0, 1 or 2"):
        cuma_model.CuMAConfig(demographic_projection_layers=3)
    with pytest.raises(ValueError, match="needs a z"):
        cuma_model.CuMAConfig(demographic_dim=0, demographic_projection_layers=1)
    model = patched(layers=0, norm="center")
    assert model.cuma.projection is None and all(r.projection is None for r in cuma_model.routers(model))
    cuma_model.save_pretrained(model, tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    assert d["cuma_config_version"] == 3 and "demographic_projection_layers" not in d  # what earlier releases read
    assert cuma_model.CuMAConfig.load(tmp_path).demographic_projection_layers == 0

"""The published encoder projection of z (`demographic_projection_layers`): one module at the model's root, run once
per forward before the routers, holding the z statistics, trained with the routers, saved on both save paths."""
import json

import pytest
import torch
import torch.nn.functional as F

import cuma_model
from cuma_model.checkpoint import adapter_state_dict
from cuma_model.patch import PROJECTION_NAME
from cuma_model.router import DemographicProjection, demographic_statistics
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
    if layers:  # away from the near-zero published init, so that the projection visibly moves the logits
        with torch.no_grad():
            for p in model.cuma.projection.parameters():
                p.normal_(std=0.5)
    if norm != "none":
        cuma_model.fit_demographic_norm(model, profiles(40))
    return model


def test_the_projection_whitens_scales_and_maps_z():
    torch.manual_seed(0)
    projection = DemographicProjection(D, 2, demographic_norm="whiten", demographic_scale=2.0, dtype=torch.float64)
    for p in projection.parameters():
        torch.nn.init.normal_(p, std=0.5)
    with pytest.raises(ValueError, match="never fitted"):
        projection(profiles(2))
    mean, whiten = demographic_statistics(profiles(40), whiten=True)
    projection.set_demographic_norm(mean, whiten)
    z = profiles(3, seed=1).double()
    zn = 2.0 * ((z - mean.double()) @ whiten.double().T)  # by hand: whiten, scale, Linear, GELU, Linear
    l1, l2 = projection.layers
    expected = F.linear(F.gelu(F.linear(zn, l1.weight, l1.bias)), l2.weight, l2.bias)
    torch.testing.assert_close(projection(z), expected)


def test_the_routers_route_on_the_projected_z():
    model = patched()
    routers = cuma_model.routers(model)
    assert len(routers) > 1
    assert all(not hasattr(r, "z_mean") and r.demographic_scale == 1.0 for r in routers)  # the projection has them
    ids, z = torch.randint(3, 97, (2, 5)), profiles(2, seed=2)
    model.eval()
    with torch.no_grad():
        expected = model(ids, demographic_embeds=z).logits
        projected = model.cuma.projection(z)
        projection, model.cuma.projection = model.cuma.projection, None
        try:
            direct = model(ids, demographic_embeds=projected).logits
        finally:
            model.cuma.projection = projection
    torch.testing.assert_close(expected, direct)
    assert not torch.allclose(expected, model(ids, demographic_embeds=profiles(2, seed=9)).logits)


def test_the_one_layer_projection_starts_as_published():
    torch.manual_seed(0)
    layer = DemographicProjection(384, 1).layers[0]
    assert torch.all(layer.bias == 0)
    expected_std = 0.01 * (2.0 / (384 + 384)) ** 0.5  # xavier normal, gain 0.01
    assert abs(layer.weight.std().item() / expected_std - 1) < 0.05


def test_the_projection_sits_at_the_root_trains_and_is_saved_once():
    model = patched()
    assert getattr(model, PROJECTION_NAME) is model.cuma.projection
    names = [k for k in adapter_state_dict(model) if k.startswith(PROJECTION_NAME + ".")]
    assert sorted(names) == sorted(f"{PROJECTION_NAME}.{k}" for k in (
        "layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias", "z_mean", "z_whiten"))
    ids, z = torch.randint(3, 97, (2, 5)), profiles(2, seed=2)
    model.train()
    model(ids, demographic_embeds=z, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.cuma.projection.parameters())
    cuma_model.unpatch_model(model)
    assert not hasattr(model, PROJECTION_NAME)


@pytest.mark.parametrize("layers", [1, 2])
def test_the_projection_travels_with_the_adapter_on_both_paths(tmp_path, layers):
    from peft import PeftModel

    model = patched(layers=layers)
    ids, z = torch.randint(3, 97, (2, 5)), profiles(2, seed=3)
    model.eval()
    with torch.no_grad():
        expected = model(ids, demographic_embeds=z).logits
    cuma_model.save_pretrained(model, tmp_path / "a")
    d = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert d["cuma_config_version"] == 5 and d["demographic_projection_layers"] == layers
    peft_model = PeftModel.from_pretrained(tiny_decoder("llama"), tmp_path / "a", is_trainable=True)
    peft_model.save_pretrained(tmp_path / "b")  # PEFT's own writer
    for loaded in (cuma_model.from_pretrained(tiny_decoder("llama"), tmp_path / "a"),
                   PeftModel.from_pretrained(tiny_decoder("llama"), tmp_path / "b")):
        loaded.eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids, demographic_embeds=z).logits, expected)
    assert any(PROJECTION_NAME in n for n, p in peft_model.named_parameters() if p.requires_grad)


def test_the_option_is_checked_and_files_before_it_read_as_none(tmp_path):
    with pytest.raises(ValueError, match="demographic_projection_layers must be 0, 1 or 2"):
        cuma_model.CuMAConfig(demographic_projection_layers=3)
    with pytest.raises(ValueError, match="needs a z"):
        cuma_model.CuMAConfig(demographic_dim=0, demographic_projection_layers=1)
    model = patched(layers=0, norm="center")
    assert model.cuma.projection is None and not hasattr(model, PROJECTION_NAME)
    cuma_model.save_pretrained(model, tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    assert d["demographic_projection_layers"] == 0
    # a version 3 file was written before the option existed: it lacks the key and reads as 0
    del d["demographic_projection_layers"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(d | {"cuma_config_version": 3}))
    assert cuma_model.CuMAConfig.load(tmp_path).demographic_projection_layers == 0
    cuma_model.save_pretrained(patched(layers=1), tmp_path / "p")
    d = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    del d["demographic_projection_layers"]  # a version 4 or 5 file names it
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"lacks the keys \['demographic_projection_layers'\]"):
        cuma_model.CuMAConfig.load(tmp_path / "p")

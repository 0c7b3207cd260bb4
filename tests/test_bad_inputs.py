"""Inputs a hostile user would try on a patched model: each is a clear error or correct behaviour, never silent.

Setup as a user would write it: `m = patch_model(tiny_decoder(), num_experts=4, top_k=2, r=4, demographic_dim=8)`,
`ids` [2, 6], `z` [2, 8].
"""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import cuma_model
from tiny_models import randomize_experts, tiny_decoder

D = 8


def patched(**kw):
    model = cuma_model.patch_model(tiny_decoder("llama"), num_experts=4, top_k=2, r=4, demographic_dim=D, **kw)
    randomize_experts(model)
    return model


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 97, (2, 6), generator=g), torch.randn(2, D, generator=g)


@pytest.mark.parametrize("option, value", [("lora_alpha", 32.0), ("lora_alpha", float("nan")), ("r", 8),
                                           ("routing_mode", "sum"), ("top_k", 1)])
def test_a_config_changed_after_patching_is_refused_at_save(tmp_path, option, value):
    model = patched()
    setattr(model.cuma.config, option, value)
    with pytest.raises(ValueError, match=rf"changed after patching.*{option}"):
        cuma_model.save_pretrained(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_the_load_balancing_weight_may_change_after_patching_and_is_saved(tmp_path):
    model = patched()
    model.cuma.config.aux_loss_coef = 0.1  # read at every forward: a schedule is legitimate
    cuma_model.save_pretrained(model, tmp_path)
    assert cuma_model.CuMAConfig.load(tmp_path).aux_loss_coef == 0.1


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_saved_adapter_holding_nan_or_inf_is_refused_at_load(tmp_path, value):
    cuma_model.save_pretrained(patched(), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("cuma_B"))
    tensors[name][0, 0, 0] = value
    save_file(tensors, str(weights), metadata={"format": "pt"})
    model = tiny_decoder("llama")
    with pytest.raises(ValueError, match=rf"{name}.*NaN or inf"):
        cuma_model.from_pretrained(model, tmp_path)
    assert not cuma_model.is_patched(model)


@pytest.mark.parametrize("weights, match", [
    (torch.ones(3, 2), r"aux_token_weights must have the input's shape \[2, 6\], got \[3, 2\]"),
    (torch.ones(2, 10), r"aux_token_weights must have the input's shape \[2, 6\], got \[2, 10\]"),
    (torch.ones(2), r"aux_token_weights must have the input's shape"),
    (torch.full((2, 6), float("nan")), "aux_token_weights must be finite and >= 0"),
    (-torch.ones(2, 6), "aux_token_weights must be finite and >= 0"),
])
def test_bad_aux_token_weights_are_refused(weights, match):
    model = patched()
    model.train()
    ids, z = batch()
    with pytest.raises(ValueError, match=match):
        model(ids, labels=ids, demographic_embeds=z, aux_token_weights=weights)


def test_right_aux_token_weights_weight_the_load_balancing_loss():
    model = patched()
    model.train()
    ids, z = batch()
    plain = model(ids, labels=ids, demographic_embeds=z, attention_mask=torch.ones_like(ids)).aux_loss
    same = model(ids, labels=ids, demographic_embeds=z, aux_token_weights=torch.ones(2, 6)).aux_loss
    torch.testing.assert_close(same, plain)
    half = torch.ones(2, 6)
    half[:, :3] = 0
    assert not torch.allclose(model(ids, labels=ids, demographic_embeds=z, aux_token_weights=half).aux_loss, plain)


def test_a_model_routed_on_hidden_states_alone_refuses_demographic_embeds():
    model = cuma_model.patch_model(tiny_decoder("llama"), num_experts=4, top_k=2, r=4, demographic_dim=0)
    ids, z = batch()
    model(ids)  # needs no z
    with pytest.raises(ValueError, match="demographic_dim=0.*takes no demographic_embeds"):
        model(ids, demographic_embeds=z)
    with pytest.raises(ValueError, match="demographic_dim=0.*takes no demographic_embeds"):
        model.generate(ids, demographic_embeds=z, max_new_tokens=2)


def test_z_on_the_meta_device_is_refused():
    model = patched()
    ids, z = batch()
    with pytest.raises(ValueError, match="meta device"):
        model(ids, demographic_embeds=z.to("meta"))


def test_patch_model_refuses_what_is_not_a_model_and_a_model_already_holding_lora():
    with pytest.raises(TypeError, match="patch_model takes a torch nn.Module.*got dict"):
        cuma_model.patch_model({}, demographic_dim=D)
    lora = get_peft_model(tiny_decoder("llama"), LoraConfig(target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="q_proj.*already wrapped by a PEFT adapter"):
        cuma_model.patch_model(lora, demographic_dim=D)


@pytest.mark.parametrize("z, match", [
    (torch.randn(10, D + 1), rf"\[N, {D}\].*got \[10, {D + 1}\]"),
    (torch.randn(D), rf"\[N, {D}\].*got \[{D}\]"),
    (torch.full((10, D), float("nan")), "NaN or inf"),
])
def test_fit_demographic_norm_names_the_wrong_width(z, match):
    model = cuma_model.patch_model(tiny_decoder("llama"), num_experts=4, top_k=2, r=4, demographic_dim=D,
                                   demographic_norm="whiten")
    with pytest.raises(ValueError, match=match):
        cuma_model.fit_demographic_norm(model, z)


def test_peft_config_changed_after_wrapping_is_refused_at_save(tmp_path):
    model = get_peft_model(tiny_decoder("llama"), cuma_model.CuMAConfig(num_experts=4, top_k=2, r=4, demographic_dim=D))
    model.peft_config["default"].lora_alpha = 64.0
    with pytest.raises(ValueError, match=r"changed after patching \(lora_alpha: 16.0 -> 64.0\)"):
        model.save_pretrained(tmp_path)

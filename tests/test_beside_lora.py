"""CuMA beside a plain PEFT LoRA on other modules: the LoRA first, then CuMA; both train, save and load. The other
order (CuMA, then a LoRA that freezes it) is named by a warning that gives the supported order."""
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import cuma_model
from tiny_models import randomize_experts, tiny_decoder

D = 6


def lora_then_cuma():
    model = get_peft_model(tiny_decoder("llama"), LoraConfig(target_modules=["o_proj"], init_lora_weights=False))
    out = cuma_model.patch_model(model, num_experts=4, top_k=2, r=4, demographic_dim=D, router_hidden_dim=8)
    assert out is model  # the PeftModel is handed back, CuMA patched inside it
    return model


def test_both_train_when_the_lora_comes_first():
    model = lora_then_cuma()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("cuma_" in n for n in trainable)
    assert all("lora_" in n or "cuma_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for step in range(2):
        ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids, demographic_embeds=torch.randn(2, D)).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("lora_" in n for n in changed) and any("cuma_B" in n for n in changed)
    assert changed <= trainable


def test_both_save_and_load(tmp_path):
    model = lora_then_cuma()
    randomize_experts(model.get_base_model())
    model.eval()
    ids, z = torch.randint(3, 97, (2, 6)), torch.randn(2, D)
    with torch.no_grad():
        expected = model(input_ids=ids, demographic_embeds=z).logits
    model.save_pretrained(tmp_path / "lora")          # PEFT's files of the LoRA
    cuma_model.save_pretrained(model, tmp_path / "cuma")  # CuMA's, from the model it is patched in
    assert cuma_model.CuMAConfig.load(tmp_path / "cuma").num_experts == 4
    loaded = PeftModel.from_pretrained(tiny_decoder("llama"), tmp_path / "lora")
    loaded = cuma_model.from_pretrained(loaded, tmp_path / "cuma").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, demographic_embeds=z).logits, expected)
    unpatched = cuma_model.unpatch_model(loaded)
    assert isinstance(unpatched, PeftModel) and not cuma_model.is_patched(unpatched)


def test_a_lora_added_after_patching_is_named_with_the_supported_order():
    model = cuma_model.patch_model(tiny_decoder("llama"), num_experts=4, top_k=2, r=4, demographic_dim=D)
    model = get_peft_model(model, LoraConfig(target_modules=["o_proj"]))
    model.train()
    ids = torch.randint(3, 97, (2, 6))
    with pytest.warns(UserWarning, match="Add the other adapter first, then patch"):
        model(input_ids=ids, labels=ids, demographic_embeds=torch.randn(2, D))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        model(input_ids=ids, labels=ids, demographic_embeds=torch.randn(2, D))


def test_an_adapter_frozen_on_purpose_is_not_warned_about():
    model = cuma_model.patch_model(tiny_decoder("llama"), num_experts=4, top_k=2, r=4, demographic_dim=D)
    model.requires_grad_(False)
    model.cuma.trainable = False
    model.train()
    ids = torch.randint(3, 97, (2, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model(input_ids=ids, labels=ids, demographic_embeds=torch.randn(2, D))

"""Adapters round-trip through adapter_config.json + adapter_model.safetensors, and bad checkpoints fail loudly."""
import json
import os

import pytest
import torch

import cuma_model
from tiny_models import randomize_experts, tiny_decoder


def trained_model(**kw):
    model = tiny_decoder("llama")
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=4, demographic_dim=5, **kw)
    randomize_experts(model)
    with torch.no_grad():
        for r in cuma_model.routers(model):
            for p in r.parameters():
                p.add_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("kw", [{}, {"shared_A": True, "share_router_qkv": False, "routing_mode": "sum"}])
def test_round_trip_gives_identical_outputs(tmp_path, kw):
    model = trained_model(**kw)
    cuma_model.save_pretrained(model, tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "CUMA"
    loaded = cuma_model.from_pretrained(tiny_decoder("llama"), tmp_path / "adapter")
    ids, z = torch.randint(3, 97, (2, 6)), torch.randn(2, 5)
    assert torch.equal(loaded(ids, demographic_embeds=z).logits, model(ids, demographic_embeds=z).logits)
    assert loaded.cuma.config == model.cuma.config


def test_loading_onto_a_different_base_fails_clearly(tmp_path):
    cuma_model.save_pretrained(trained_model(), tmp_path)
    with pytest.raises(ValueError, match="shape"):
        cuma_model.from_pretrained(tiny_decoder("llama", hidden_size=48, intermediate_size=48), tmp_path)
    with pytest.raises(ValueError, match="does not fit this model"):
        cuma_model.from_pretrained(tiny_decoder("llama", num_hidden_layers=3), tmp_path)


def test_truncated_or_missing_files_fail_clearly(tmp_path):
    cuma_model.save_pretrained(trained_model(), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        cuma_model.from_pretrained(tiny_decoder("llama"), tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"num_experts": 4,')
    with pytest.raises(ValueError, match="not valid JSON"):
        cuma_model.from_pretrained(tiny_decoder("llama"), tmp_path)
    with pytest.raises(FileNotFoundError):
        cuma_model.from_pretrained(tiny_decoder("llama"), tmp_path / "nowhere")


def test_save_is_atomic(tmp_path, monkeypatch):
    model = trained_model()
    cuma_model.save_pretrained(model, tmp_path)
    good = (tmp_path / "adapter_model.safetensors").read_bytes()
    import safetensors.torch

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        cuma_model.save_pretrained(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_unpatch_restores_the_base_model():
    model, base = tiny_decoder("llama"), tiny_decoder("llama")
    cuma_model.patch_model(model, demographic_dim=3)
    randomize_experts(model)
    cuma_model.unpatch_model(model)
    assert not cuma_model.is_patched(model)
    assert sorted(n for n, _ in model.named_parameters()) == sorted(n for n, _ in base.named_parameters())
    ids = torch.randint(3, 97, (2, 4))
    torch.testing.assert_close(model(ids).logits, base(ids).logits)

"""CuMA held to what PEFT's own generic tests ask of every method, on a custom MLP and on tiny decoders.

One flat matrix (name, model, config) fanned out into save/load, config, enable/disable per model and per layer,
unload, the base model's state dict, training, gradient checkpointing and half precision. What cannot apply to a
routed mixture (merging, several CuMA adapters in one model) is checked to be refused with a clear error.
"""
import copy

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.peft_model import get_layer_status, get_model_status
from peft.utils.save_and_load import get_base_model_state_dict
from torch import nn

import cuma_model
from test_architectures import build as build_decoder
from tiny_models import randomize_experts

D = 4


class MLP(nn.Module):
    """PEFT's custom-model shape: linear layers on [batch, features], no transformers in sight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin0, self.lin1, self.lin2 = nn.Linear(10, 20), nn.Linear(20, 20), nn.Linear(20, 2)

    def forward(self, X, labels=None):
        out = self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(X)))))
        loss = nn.functional.cross_entropy(out, labels) if labels is not None else None
        return {"logits": out, "loss": loss}


CASES = {  # name: (model builder, config options)
    "mlp": (MLP, dict(target_modules=["lin0", "lin1"])),
    "mlp-shared-A": (MLP, dict(target_modules=["lin0", "lin1"], shared_A=True, routing_mode="sum")),
    "llama": (lambda: build_decoder("llama"), {}),
    "llama-qkv-projection": (lambda: build_decoder("llama"),
                             dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                  demographic_projection_layers=1)),
    "qwen2-gate-up": (lambda: build_decoder("qwen2"), dict(target_modules=["q_proj", "gate_proj", "up_proj"])),
    "gpt2-conv1d": (lambda: build_decoder("gpt2"), dict(target_modules=["c_attn"])),
}


def config(name, **overrides):
    return cuma_model.CuMAConfig(num_experts=4, top_k=2, r=4, demographic_dim=D, router_hidden_dim=8,
                                 **{**CASES[name][1], **overrides})


def inputs(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, D, generator=g) * 3
    if name.startswith("mlp"):
        return dict(X=torch.randn(3, 10, generator=g), demographic_embeds=z), torch.randint(0, 2, (3,), generator=g)
    ids = torch.randint(3, 97, (3, 6), generator=g)
    return dict(input_ids=ids, demographic_embeds=z), ids


def logits(model, kw):
    with torch.no_grad():
        return model(**kw)["logits"]


def base_logits(name, kw):
    return logits(CASES[name][0](), {k: v for k, v in kw.items() if k != "demographic_embeds"})


def wrapped(name, **overrides):
    model = get_peft_model(CASES[name][0](), config(name, **overrides))
    randomize_experts(model.get_base_model(), std=0.5)
    return model.eval()


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_and_load_round_trip(name, tmp_path):
    model = wrapped(name)
    kw, _ = inputs(name)
    expected = logits(model, kw)
    assert not torch.allclose(expected, base_logits(name, kw))  # the adapter does something
    model.save_pretrained(tmp_path)
    assert isinstance(PeftConfig.from_pretrained(tmp_path), cuma_model.CuMAConfig)
    loaded = PeftModel.from_pretrained(CASES[name][0](), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, kw), expected)
    again = cuma_model.from_pretrained(CASES[name][0](), tmp_path).eval()  # the other loader, the same files
    torch.testing.assert_close(logits(again, kw), expected)


@pytest.mark.parametrize("name", sorted(CASES))
def test_config_round_trips_and_copies(name):
    c = config(name)
    assert cuma_model.CuMAConfig.from_dict(c.to_dict()) == c
    assert copy.deepcopy(c) == c and c.to_dict()["peft_type"] == "CUMA"


@pytest.mark.parametrize("name", sorted(CASES))
def test_disable_per_model_and_per_layer(name):
    model = wrapped(name)
    kw, _ = inputs(name)
    expected, base = logits(model, kw), base_logits(name, kw)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, kw), base)
        assert not any(s.enabled for s in get_layer_status(model))
    torch.testing.assert_close(logits(model, kw), expected)
    assert get_model_status(model).enabled is True
    layers = [m for m in model.modules() if isinstance(m, cuma_model.integrations.peft.CuMAPeftLinear)]
    layers[0].enable_adapters(False)  # one layer off: neither the adapted nor the base output
    one_off = logits(model, kw)
    assert not torch.allclose(one_off, expected) and not torch.allclose(one_off, base)
    status = {s.name: s.enabled for s in get_layer_status(model)}
    assert sum(not enabled for enabled in status.values()) == 1
    for layer in layers:
        layer.enable_adapters(False)
    torch.testing.assert_close(logits(model, kw), base)
    for layer in layers:
        layer.enable_adapters(True)
    torch.testing.assert_close(logits(model, kw), expected)


@pytest.mark.parametrize("name", sorted(CASES))
def test_unload_gives_back_the_base_model_which_takes_another_adapter(name, tmp_path):
    model = wrapped(name)
    kw, _ = inputs(name)
    base = model.unload()
    assert not hasattr(base, "peft_config") and not cuma_model.is_patched(base)
    assert not any("cuma_" in n for n, _ in base.named_parameters())
    plain = {k: v for k, v in kw.items() if k != "demographic_embeds"}
    torch.testing.assert_close(logits(base, plain), base_logits(name, kw))
    target = CASES[name][1].get("target_modules", ["q_proj"])[0]
    lora = get_peft_model(base, LoraConfig(target_modules=[target]), adapter_name="mylora")
    lora.save_pretrained(tmp_path)
    assert (tmp_path / "mylora" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name", sorted(CASES))
def test_base_model_state_dict_loads_into_the_plain_model(name):
    model = wrapped(name)
    state = get_base_model_state_dict(model)
    plain = CASES[name][0]()
    assert set(state) == set(plain.state_dict())
    plain.load_state_dict(state, strict=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_prefix_finds_exactly_the_trainable_parameters(name):
    model = wrapped(name)
    prefixed = {n for n, _ in model.named_parameters() if model.prefix in n}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert prefixed and prefixed == trainable
    assert not any("lora_" in n for n in prefixed)


TRAINING = [(name, False) for name in sorted(CASES)] + [(name, True) for name in sorted(CASES) if "mlp" not in name]


@pytest.mark.parametrize("name, checkpointing", TRAINING)  # an MLP has no gradient checkpointing
def test_training_moves_every_adapter_parameter_and_nothing_else(name, checkpointing):
    model = get_peft_model(CASES[name][0](), config(name, aux_loss_coef=0.1))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for step in range(3):  # B starts at zero: A gets its first gradient on the second step
        kw, labels = inputs(name, seed=step)
        loss = model(**kw, labels=labels)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if model.prefix in n}


@pytest.mark.parametrize("name", ["llama", "gpt2-conv1d"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base(name, dtype, tmp_path):
    model = get_peft_model(CASES[name][0]().to(dtype), config(name))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if model.prefix in n)
    kw, labels = inputs(name)
    model.train()
    loss = model(**kw, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    # PEFT's autocast_adapter_dtype=False keeps the adapter in the base's precision, and a save records it
    kept = get_peft_model(CASES[name][0]().to(dtype), config(name), autocast_adapter_dtype=False)
    assert all(p.dtype == dtype for n, p in kept.named_parameters() if kept.prefix in n)
    kept.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(CASES[name][0]().to(dtype), tmp_path)
    assert all(p.dtype == dtype for n, p in loaded.named_parameters() if loaded.prefix in n)


def test_what_cannot_apply_to_a_routed_mixture_is_refused_clearly():
    model = wrapped("llama")
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="one adapter per model"):
        model.add_adapter("second", config("llama"))

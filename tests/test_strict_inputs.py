"""Bad configs and inputs fail at once with an error naming the problem; a failed load changes nothing."""
import json
import math

import pytest
import torch

import cuma_model
from tiny_models import randomize_experts, tiny_decoder


def saved_config(tmp_path, **kw):
    cfg = cuma_model.CuMAConfig(num_experts=4, top_k=2, r=4, demographic_dim=5, **kw)
    cfg.save(tmp_path)
    return json.loads((tmp_path / "adapter_config.json").read_text())


@pytest.mark.parametrize("key", ["lora_alpha", "routing_mode", "target_modules", "shared_A"])
def test_a_saved_config_missing_a_key_is_refused(tmp_path, key):
    d = saved_config(tmp_path, lora_alpha=64.0, routing_mode="sum")
    del d[key]
    (tmp_path / "adapter_config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=rf"adapter_config.json lacks the keys \['{key}'\]"):
        cuma_model.CuMAConfig.load(tmp_path)


@pytest.mark.parametrize("key, value, match", [
    ("num_experts", "8", "num_experts must be an int, got str"),
    ("num_experts", 8.0, "num_experts must be an int"),
    ("lora_alpha", "16", "lora_alpha must be a number"),
    ("shared_A", 1, "shared_A must be true or false"),
    ("target_modules", 3, "target_modules must be"),
    ("routing_mode", None, "routing_mode must be a string"),
    ("cuma_config_version", 99, "cuma_config_version 99"),
    ("surprise", 1, "unknown keys"),
    ("inference_mode", "yes", "inference_mode must be true or false"),
    ("task_type", "CHAT", "Invalid task type"),
    ("auto_mapping", [1], "auto_mapping must be an object or null"),
    ("peft_type", "LORA", "peft_type 'LORA'"),
])
def test_a_saved_config_with_a_wrong_value_names_file_and_key(tmp_path, key, value, match):
    d = saved_config(tmp_path)
    d[key] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(d))
    with pytest.raises((TypeError, ValueError), match=match) as info:
        cuma_model.CuMAConfig.load(tmp_path)
    assert "adapter_config.json" in str(info.value)


def test_peft_keys_are_part_of_a_saved_config_and_version_1_files_still_load(tmp_path):
    d = saved_config(tmp_path, routing_mode="sum")
    peft_keys = ["auto_mapping", "inference_mode", "peft_version", "revision", "task_type"]
    assert set(peft_keys) <= set(d) and d["peft_type"] == "CUMA" and d["cuma_config_version"] == 5
    # version 1 (before CuMA was a PEFT method) had neither PEFT's keys nor its spelling of the type
    v1 = {k: v for k, v in d.items() if k not in peft_keys} | {"peft_type": "CuMA", "cuma_config_version": 1}
    (tmp_path / "adapter_config.json").write_text(json.dumps(v1))
    assert cuma_model.CuMAConfig.load(tmp_path).routing_mode == "sum"
    # a version 2 or 3 file names them all
    del d["revision"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"adapter_config.json lacks the keys \['revision'\]"):
        cuma_model.CuMAConfig.load(tmp_path)


def test_a_config_that_is_not_an_object_or_not_cuma(tmp_path):
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object, got a list"):
        cuma_model.CuMAConfig.load(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(ValueError, match="peft_type 'LORA'"):
        cuma_model.CuMAConfig.load(tmp_path)


@pytest.mark.parametrize("kw, match", [
    ({"lora_alpha": 0}, "lora_alpha"), ({"lora_alpha": -2.0}, "lora_alpha"), ({"lora_alpha": math.nan}, "lora_alpha"),
    ({"init_A_std": math.nan}, "init_A_std"), ({"init_A_std": 0.0}, "init_A_std"),
    ({"aux_loss_coef": math.nan}, "aux_loss_coef"), ({"aux_loss_coef": math.inf}, "aux_loss_coef"),
    ({"dropout": math.nan}, "dropout"), ({"num_experts": "8"}, "num_experts must be an int"),
    ({"top_k": True}, "top_k must be an int"), ({"target_modules": "q_proj("}, "regular expression"),
])
def test_config_values_are_checked(kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        cuma_model.CuMAConfig(**kw)


def adapted(model):
    return sorted(cuma_model.cuma_layers(model))


def test_target_modules_follow_peft_rules():
    # a string is a regular expression over the whole qualified name, never a set of letters
    model = cuma_model.patch_model(tiny_decoder("llama"), demographic_dim=0, target_modules=r".*\.q_proj")
    assert adapted(model) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(ValueError, match="no linear layer matches target_modules='q_proj'.*regular expression"):
        cuma_model.patch_model(tiny_decoder("llama"), demographic_dim=0, target_modules="q_proj")
    # a list matches names by suffix: "proj" is not a substring test any more
    with pytest.raises(ValueError, match="no linear layer matches"):
        cuma_model.patch_model(tiny_decoder("llama"), demographic_dim=0, target_modules=["proj"])
    model = cuma_model.patch_model(tiny_decoder("llama"), demographic_dim=0,
                                   target_modules=["layers.1.self_attn.v_proj", "up_proj"])
    assert adapted(model) == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj",
                              "model.layers.1.self_attn.v_proj"]
    assert model.cuma.config.to_dict()["target_modules"] == ["layers.1.self_attn.v_proj", "up_proj"]
    cfg = cuma_model.CuMAConfig(target_modules=r".*\.(q|v)_proj")
    assert cuma_model.CuMAConfig.from_dict(cfg.to_dict()) == cfg


def test_non_finite_z_is_refused():
    model = cuma_model.patch_model(tiny_decoder("llama"), demographic_dim=3)
    ids, z = torch.randint(3, 97, (3, 5)), torch.randn(3, 3)
    model(ids, demographic_embeds=z)
    for bad in (math.nan, math.inf, -math.inf):
        z_bad = z.clone()
        z_bad[1, 2] = bad
        with pytest.raises(ValueError, match=r"NaN or inf \(rows \[1\]\)"):
            model(ids, demographic_embeds=z_bad)
        with pytest.raises(ValueError, match="NaN or inf"), cuma_model.conditioning(model, z_bad):
            model.generate(ids, max_new_tokens=2, do_sample=False)


def test_router_logits_are_float32_for_a_half_precision_router():
    model = tiny_decoder("llama")
    cuma_model.patch_model(model, demographic_dim=3, adapter_dtype="float16")
    router = cuma_model.routers(model)[0]
    with torch.no_grad():
        router.layers[-1].weight.mul_(3e4)  # fp16 logits of this size overflow to inf, then NaN gates
    x = torch.randn(2, 4, router.in_features) * 50
    logits = router.logits(x, torch.randn(2, 3))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert (logits.abs() > 65504).any()  # the values a float16 router would have overflowed on
    weights, idx = router.route(x, torch.randn(2, 3))
    assert torch.isfinite(weights).all() and 0 <= int(idx.min()) and int(idx.max()) < router.num_experts
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert router.logits(x.bfloat16(), torch.randn(2, 3)).dtype == torch.float32


def test_a_failed_load_leaves_the_model_as_it_was(tmp_path):
    saved = tiny_decoder("llama")
    cuma_model.patch_model(saved, demographic_dim=3)
    randomize_experts(saved)
    cuma_model.save_pretrained(saved, tmp_path)
    model = tiny_decoder("llama", num_hidden_layers=3)
    model.lm_head.weight.requires_grad_(False)  # a flag of the user's that must survive
    before = {n: (p.clone(), p.requires_grad) for n, p in model.named_parameters()}
    ids = torch.randint(3, 97, (2, 5))
    logits = model(ids).logits
    with pytest.raises(ValueError, match="does not fit this model"):
        cuma_model.from_pretrained(model, tmp_path)
    assert not cuma_model.is_patched(model)
    assert {n: (p.requires_grad) for n, p in model.named_parameters()} == {n: g for n, (_, g) in before.items()}
    torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=0)
    cuma_model.save_pretrained(cuma_model.patch_model(tiny_decoder("llama", num_hidden_layers=3), demographic_dim=3),
                               tmp_path / "right")
    cuma_model.from_pretrained(model, tmp_path / "right")  # a retry works: no "already patched"
    assert cuma_model.is_patched(model)


def test_unpatch_restores_requires_grad_and_disabled_adapters_need_no_z():
    model = tiny_decoder("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    base = tiny_decoder("llama")
    cuma_model.patch_model(model, demographic_dim=3)
    randomize_experts(model)
    ids = torch.randint(3, 97, (2, 5))
    with cuma_model.adapters_disabled(model):
        torch.testing.assert_close(model(ids).logits, base(ids).logits)
        model.generate(ids, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="missing conditioning"):
        model(ids)
    cuma_model.unpatch_model(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_a_failed_patch_leaves_the_model_as_it_was(monkeypatch):
    import cuma_model.patch as P

    model = tiny_decoder("llama")
    own_forward = model.forward
    model.forward = own_forward  # an instance-level forward (as an accelerate hook installs): must come back
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    calls = {"n": 0}
    real = P.CuMALinear

    def fails_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory")
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(P, "CuMALinear", fails_on_third)
        with pytest.raises(RuntimeError, match="out of memory"):
            cuma_model.patch_model(model, demographic_dim=3)
    assert not cuma_model.is_patched(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any("cuma_" in n for n, _ in model.named_parameters())
    cuma_model.patch_model(model, demographic_dim=3)  # and patching works afterwards
    cuma_model.unpatch_model(model)
    assert model.__dict__["forward"] == own_forward


def test_version_1_target_lists_keep_their_substring_meaning(tmp_path):
    """Adapters saved by the first release matched target names as substrings: they load as they were saved."""
    saved = tiny_decoder("llama")
    cuma_model.patch_model(saved, demographic_dim=3, target_modules=r".*self_attn\..*")  # what ["self_attn"] meant
    randomize_experts(saved)
    cuma_model.save_pretrained(saved, tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    version_1 = {k: v for k, v in d.items() if k not in ("task_type", "auto_mapping", "peft_version", "revision",
                                                           "inference_mode")}
    version_1.update(peft_type="CuMA", cuma_config_version=1, target_modules=["self_attn"])
    (tmp_path / "adapter_config.json").write_text(json.dumps(version_1))
    loaded = cuma_model.from_pretrained(tiny_decoder("llama"), tmp_path)
    assert sorted(cuma_model.cuma_layers(loaded)) == sorted(cuma_model.cuma_layers(saved))
    ids, z = torch.randint(3, 97, (2, 5)), torch.randn(2, 3)
    torch.testing.assert_close(loaded(ids, demographic_embeds=z).logits, saved(ids, demographic_embeds=z).logits)

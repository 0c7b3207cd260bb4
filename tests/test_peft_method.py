"""CuMA as a registered PEFT method: get_peft_model, PeftModel save/load, TRL's peft_config, and both folder formats."""
import json
import os
import subprocess
import sys
import textwrap
from copy import deepcopy

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors import safe_open

import cuma_model
from cuma_model.checkpoint import write_adapter
from cuma_model.integrations.peft import CuMAPeftLinear
from tiny_models import randomize_experts, tiny_decoder

OPTIONS = dict(num_experts=4, top_k=2, r=4, demographic_dim=5)
IDS = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(0))
Z = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
HERE = os.path.dirname(os.path.abspath(__file__))


def trained(model, seed=1):
    """Give a patched model's (or a PeftModel's) experts and routers non-zero, seed-determined weights."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    randomize_experts(inner, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in cuma_model.routers(inner):
            for p in router.parameters():
                p.add_(torch.randn(p.shape, generator=g))
    return model


def peft_cuma(seed=1, **kw):
    return trained(get_peft_model(tiny_decoder("llama"), cuma_model.CuMAConfig(**{**OPTIONS, **kw})), seed)


def logits(model, z=Z):
    with torch.no_grad():
        return model(IDS, demographic_embeds=z).logits


def n_adapter_params(model):
    return sum(p.numel() for p in cuma_model.checkpoint.adapter_state_dict(model).values())


@pytest.mark.parametrize("kw", [{"task_type": "CAUSAL_LM"}, {"shared_A": True, "share_router_qkv": False}])
def test_get_peft_model_computes_what_patch_model_computes(kw):
    cuma_kw = {k: v for k, v in kw.items() if k != "task_type"}
    torch.manual_seed(0)  # the same draws for A at init on both paths
    peft_model = get_peft_model(tiny_decoder("llama"), cuma_model.CuMAConfig(**OPTIONS, **kw))
    torch.manual_seed(0)
    patched = cuma_model.patch_model(tiny_decoder("llama"), **OPTIONS, **cuma_kw)
    trained(peft_model), trained(patched)
    assert all(isinstance(m, CuMAPeftLinear) for m in cuma_model.cuma_layers(peft_model.get_base_model()).values())
    peft_model.train(), patched.train()
    outs = [m(IDS, labels=IDS, demographic_embeds=Z) for m in (peft_model, patched)]
    assert torch.equal(outs[0].logits, outs[1].logits) and torch.equal(outs[0].loss, outs[1].loss)
    assert outs[0].aux_loss > 0 and torch.equal(outs[0].aux_loss, outs[1].aux_loss)
    for out in outs:
        out.loss.backward()
    grads = [{n.removeprefix("base_model.model."): p.grad for n, p in m.named_parameters() if p.requires_grad}
             for m in (peft_model, patched)]
    assert sorted(grads[0]) == sorted(grads[1]) and len(grads[0]) == len(cuma_model.checkpoint.adapter_state_dict(patched))
    for name, g in grads[1].items():
        assert g is not None and g.abs().sum() > 0 and torch.equal(grads[0][name], g), name


def test_save_pretrained_writes_peft_files_and_loads_back(tmp_path, capsys):
    base_dir = tmp_path / "base"  # a base loaded from a folder, so that the adapter records where it came from
    tiny_decoder("llama").save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    model = trained(get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                   cuma_model.CuMAConfig(**OPTIONS, task_type="CAUSAL_LM")))
    model.eval()
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    folder = tmp_path / "adapter"
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["peft_type"] == "CUMA" and saved["cuma_config_version"] == 5 and saved["task_type"] == "CAUSAL_LM"
    assert saved["base_model_name_or_path"] == str(base_dir) and saved["inference_mode"] is True
    assert saved["num_experts"] == 4 and saved["peft_version"]
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert keys == {"base_model.model." + k for k in cuma_model.checkpoint.adapter_state_dict(model.get_base_model())}
    card = (folder / "README.md").read_text()
    assert "library_name: peft" in card and f"base_model: {base_dir}" in card

    loaded = PeftModel.from_pretrained(tiny_decoder("llama"), folder)
    assert isinstance(loaded.base_model, cuma_model.integrations.peft.CuMAModel)
    assert torch.equal(logits(loaded), expected)
    loaded.print_trainable_parameters()
    trainable = PeftModel.from_pretrained(tiny_decoder("llama"), folder, is_trainable=True)
    trainable.print_trainable_parameters()
    lines = capsys.readouterr().out.splitlines()
    total = sum(p.numel() for p in trainable.parameters())
    assert lines[0].startswith(f"trainable params: 0 || all params: {total:,d}")
    assert lines[1].startswith(f"trainable params: {n_adapter_params(trainable.get_base_model()):,d} ||")
    status = loaded.get_model_status()
    assert status.peft_types == {"default": "CUMA"} and status.enabled is True and status.num_adapter_layers == 4


def test_disable_adapter_runs_the_base_model():
    model = peft_cuma()
    base = tiny_decoder("llama")
    adapted = logits(model)
    with torch.no_grad():
        base_logits = base(IDS).logits
    assert not torch.allclose(adapted, base_logits)
    with model.disable_adapter():
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, base_logits)  # the frozen base needs no z
            assert torch.equal(model(IDS, demographic_embeds=Z).logits, base_logits)
            inner = model.get_base_model()  # the backbone called directly (TRL's fused head) is the base too
            assert torch.equal(inner.lm_head(inner.model(IDS).last_hidden_state), base_logits)
        assert model.get_model_status().enabled is False
    assert torch.equal(logits(model), adapted)
    g = model.generate(IDS, demographic_embeds=Z, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert g.shape == (2, 9)
    copy = deepcopy(model)  # e.g. a trainer's reference model: its own forward and switch
    with copy.disable_adapter():
        assert torch.equal(logits(copy), base_logits) and torch.equal(logits(model), adapted)
    with torch.no_grad(), cuma_model.conditioning(model, Z):  # cuma_model's helpers take the PeftModel
        assert torch.equal(model(IDS).logits, adapted)


def test_one_adapter_per_model_and_load_adapter_replaces_the_active_one(tmp_path):
    a, b = peft_cuma(seed=1), peft_cuma(seed=2)
    b.save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="CuMA holds one adapter per model.*adapter_name='default'"):
        a.load_adapter(tmp_path / "b", adapter_name="other")
    assert list(a.peft_config) == ["default"]
    with pytest.raises(ValueError, match="one adapter per model"):
        a.add_adapter("other", cuma_model.CuMAConfig(**OPTIONS))
    a.load_adapter(tmp_path / "b", adapter_name="default")
    assert torch.equal(logits(a), logits(b))

    other_layout = peft_cuma(seed=3, r=2)
    other_layout.save_pretrained(tmp_path / "r2")
    before = logits(a)
    with pytest.raises(ValueError, match="shape"):
        a.load_adapter(tmp_path / "r2", adapter_name="default")
    assert torch.equal(logits(a), before)  # nothing was copied

    with pytest.raises(ValueError, match="cannot be merged"):
        a.merge_and_unload()
    base = a.unload()
    assert not cuma_model.is_patched(base)
    torch.testing.assert_close(base(IDS).logits, tiny_decoder("llama")(IDS).logits, rtol=0, atol=0)


def test_the_two_savers_read_each_other(tmp_path):
    peft_model = peft_cuma()
    patched = trained(cuma_model.patch_model(tiny_decoder("llama"), **OPTIONS))
    expected = logits(patched)
    assert torch.equal(logits(peft_model), expected)

    cuma_model.save_pretrained(patched, tmp_path / "ours")
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_decoder("llama"), tmp_path / "ours")), expected)
    peft_model.save_pretrained(tmp_path / "peft")
    assert torch.equal(logits(cuma_model.from_pretrained(tiny_decoder("llama"), tmp_path / "peft")), expected)

    # cuma_model.save_pretrained on a PeftModel: PEFT's files, written as a unit, the user's card edits kept
    (tmp_path / "unit").mkdir()
    (tmp_path / "unit" / "README.md").write_text("# my adapter\n")
    cuma_model.save_pretrained(peft_model, tmp_path / "unit")
    assert sorted(os.listdir(tmp_path / "unit")) == sorted(os.listdir(tmp_path / "peft"))
    assert (tmp_path / "unit" / "README.md").read_text().startswith("---")
    assert "# my adapter" in (tmp_path / "unit" / "README.md").read_text()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "unit" / name).read_bytes() == (tmp_path / "peft" / name).read_bytes()
    with pytest.raises(FileExistsError, match="another layout"):
        cuma_model.save_pretrained(peft_cuma(r=2), tmp_path / "unit")


def test_a_failed_save_through_cuma_leaves_the_previous_peft_folder(tmp_path, monkeypatch):
    first, second = peft_cuma(seed=1), peft_cuma(seed=2)
    cuma_model.save_pretrained(first, tmp_path / "a")
    good = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        cuma_model.save_pretrained(second, tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


# adapter_config.json exactly as cuma wrote it before it was a PEFT method (cuma_config_version 1)
VERSION_1 = {"num_experts": 4, "top_k": 2, "r": 4, "lora_alpha": 16.0, "dropout": 0.0,
             "target_modules": ["q_proj", "v_proj"], "shared_A": False, "demographic_dim": 5, "demographic_scale": 1.0,
             "router_hidden_dim": 256, "router_num_layers": 2, "share_router_qkv": True, "share_router_gate_up": True,
             "routing_mode": "cuma", "aux_loss_coef": 0.01, "init_A_std": 0.01, "adapter_dtype": "float32",
             "base_model_name_or_path": None, "peft_type": "CuMA", "cuma_config_version": 1}


def test_a_version_1_checkpoint_loads_on_both_paths(tmp_path):
    patched = trained(cuma_model.patch_model(tiny_decoder("llama"), **OPTIONS))
    write_adapter(patched, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(VERSION_1))
    expected = logits(patched)
    assert torch.equal(logits(cuma_model.from_pretrained(tiny_decoder("llama"), tmp_path)), expected)
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_decoder("llama"), tmp_path)), expected)
    config = PeftConfig.from_pretrained(tmp_path)  # PEFT's generic reader, as AutoPeftModel uses it
    assert isinstance(config, cuma_model.CuMAConfig) and config.peft_type == "CUMA" and config.num_experts == 4


def test_peft_loading_is_strict_and_leaves_a_base_that_does_not_fit_unchanged(tmp_path):
    peft_cuma().save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    for change, match in [(lambda d: d.pop("routing_mode"), r"adapter_config.json lacks the keys \['routing_mode'\]"),
                          (lambda d: d.pop("peft_version"), r"adapter_config.json lacks the keys \['peft_version'\]"),
                          (lambda d: d.update(surprise=1), r"adapter_config.json has unknown keys \['surprise'\]"),
                          (lambda d: d.update(inference_mode="yes"), "inference_mode must be true or false")]:
        d = dict(config)
        change(d)
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(d))
        base = tiny_decoder("llama")
        with pytest.raises((TypeError, ValueError), match=match):
            PeftModel.from_pretrained(base, tmp_path / "a")
        assert not cuma_model.is_patched(base)
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))

    base = tiny_decoder("llama", num_hidden_layers=3)
    before = base(IDS).logits
    with pytest.raises(ValueError, match="does not fit this model"):
        PeftModel.from_pretrained(base, tmp_path / "a")
    assert not cuma_model.is_patched(base) and not hasattr(base, "peft_config")
    assert all(not isinstance(m, CuMAPeftLinear) for m in base.modules())
    torch.testing.assert_close(base(IDS).logits, before, rtol=0, atol=0)


def test_trl_sft_trainer_wraps_the_model_with_cuma(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tiny_models import word_tokenizer

    tokenizer = word_tokenizer(["the", "cat", "sat", "on", "mat"])
    tokenizer.eos_token = "<|im_end|>"
    data = Dataset.from_dict({"text": ["the cat sat on the mat", "the mat sat on the cat"]})
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, max_length=16)
    trainer = SFTTrainer(model=tiny_decoder("llama"), args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=cuma_model.CuMAConfig(**OPTIONS, task_type="CAUSAL_LM"))
    assert isinstance(trainer.model, PeftModel) and trainer.model.peft_type == "CUMA"
    layers = cuma_model.cuma_layers(trainer.model.get_base_model())
    assert len(layers) == 4 and all(isinstance(m, CuMAPeftLinear) for m in layers.values())
    with pytest.raises(AttributeError, match="trains no token embeddings"):  # TRL's chat_template_path route
        trainer.model.peft_config["default"].trainable_token_indices
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.model." + n
                         for n in cuma_model.checkpoint.adapter_state_dict(trainer.model.get_base_model())}


def test_import_cuma_model_is_all_peft_needs_and_registration_is_idempotent(tmp_path):
    """In a fresh process: `import cuma_model` (twice, and reloaded) and PEFT loads a CuMA folder by itself."""
    model = peft_cuma()
    model.save_pretrained(tmp_path)
    torch.save(logits(model), tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import importlib, sys, torch
        sys.path.insert(0, {HERE!r})
        import cuma_model
        import cuma_model  # a second import is a no-op
        import cuma_model.integrations.peft as integration
        integration.register()
        importlib.reload(integration)
        integration.register()
        from peft import PeftModel, PeftType
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
        assert [t for t in PeftType if t.value == "CUMA"] == [PeftType.CUMA]
        assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.CUMA] is integration.CuMAModel
        from tiny_models import tiny_decoder
        loaded = PeftModel.from_pretrained(tiny_decoder("llama"), {str(tmp_path)!r})
        ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(0))
        z = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(loaded(ids, demographic_embeds=z).logits, torch.load({str(tmp_path / "expected.pt")!r}))
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]

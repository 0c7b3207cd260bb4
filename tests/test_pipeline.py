"""Per-prompt z through transformers' text-generation pipeline, at any batch size."""
import pytest
import torch
import transformers

import cuma_model
from cuma_model.integrations import CuMATextGenerationPipeline
from tiny_models import randomize_experts, tiny_decoder, word_tokenizer

D = 4
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away"]
PROMPTS = ["the cat sat on", "a dog ran far away", "the mat"]  # unequal lengths: batches are padded


@pytest.fixture(scope="module")
def pipe():
    model = tiny_decoder("llama", vocab_size=len(word_tokenizer(WORDS)))
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=4, demographic_dim=D, router_hidden_dim=8)
    randomize_experts(model, std=0.5)
    tokenizer = word_tokenizer(WORDS)
    tokenizer.padding_side = "left"
    return transformers.pipeline("text-generation", model=model.eval(), tokenizer=tokenizer,
                                 pipeline_class=CuMATextGenerationPipeline)


GENERATE = dict(max_new_tokens=6, do_sample=False, return_full_text=False)


def z_rows():
    return torch.randn(len(PROMPTS), D, generator=torch.Generator().manual_seed(0)) * 3


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_each_prompt_gets_its_own_row_at_any_batch_size(pipe, batch_size):
    z = z_rows()
    alone = [pipe(p, demographic_embeds=z[i:i + 1], **GENERATE)[0]["generated_text"] for i, p in enumerate(PROMPTS)]
    batched = pipe(PROMPTS, demographic_embeds=z, batch_size=batch_size, **GENERATE)
    assert [out[0]["generated_text"] for out in batched] == alone
    # z is what made the difference: the same prompt under the other rows' z generates something else
    others = [pipe(PROMPTS[0], demographic_embeds=z[i:i + 1], **GENERATE)[0]["generated_text"] for i in (1, 2)]
    assert any(o != alone[0] for o in others)


def test_a_prompt_alone_matches_generate_with_its_z(pipe):
    z = z_rows()[:1]
    text = pipe(PROMPTS[0], demographic_embeds=z, **GENERATE)[0]["generated_text"]
    ids = pipe.tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        out = pipe.model.generate(**ids, demographic_embeds=z, max_new_tokens=6, do_sample=False)
    assert text == pipe.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_chats_take_one_row_each(pipe):
    z = z_rows()[:2]
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    batched = pipe(chats, demographic_embeds=z, batch_size=2, **GENERATE)
    alone = [pipe(c, demographic_embeds=z[i:i + 1], **GENERATE) for i, c in enumerate(chats)]
    assert [b[0]["generated_text"] for b in batched] == [a[0]["generated_text"] for a in alone]


def test_a_z_of_another_row_count_is_refused(pipe):
    with pytest.raises(ValueError, match=r"one row per prompt: 3 prompt\(s\), got shape \(2, 4\)"):
        pipe(PROMPTS, demographic_embeds=z_rows()[:2], **GENERATE)


def test_the_stock_pipeline_says_what_to_use(pipe):
    stock = transformers.pipeline("text-generation", model=pipe.model, tokenizer=pipe.tokenizer)
    with pytest.raises(ValueError, match="CuMATextGenerationPipeline"):
        stock(PROMPTS, demographic_embeds=z_rows(), **GENERATE)

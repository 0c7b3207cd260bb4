"""Tiny random Hugging Face decoders built in code, for tests that need a real architecture but not real weights."""
from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 97
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def tiny_decoder(arch: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    config_cls, model_cls = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    kwargs = dict(_COMMON, **overrides)
    if arch == "qwen3":
        kwargs.setdefault("head_dim", 8)
    model = model_cls(config_cls(**kwargs)).to(dtype)
    return model.eval()


def randomize_experts(model, std: float = 0.2, seed: int = 1) -> None:
    """B starts at zero (the adapter is a no-op at step 0); tests need it non-zero to see the experts at all."""
    import cuma_model

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in cuma_model.cuma_layers(model).values():
            layer.cuma_B.copy_(torch.randn(layer.cuma_B.shape, generator=g) * std)
            layer.cuma_A.copy_(torch.randn(layer.cuma_A.shape, generator=g) * std)


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant{% endif %}")


def word_tokenizer(words, letters=("A", "B", "C", "D"), template=CHAT_TEMPLATE):
    """A word-level fast tokenizer with a chat template, built in code (no files, no hub).

    Bare letters and letters after a space ("▁A") are distinct tokens, as in real tokenizers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = specials + list(words) + ["▁" + w for w in words] + list(letters) + ["▁" + l for l in letters]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = template
    return fast

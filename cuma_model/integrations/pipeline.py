"""Per-prompt z through transformers' text-generation pipeline.

The stock pipeline runs its prompts one at a time (or `batch_size` at a time) and hands the same generate keywords to
every call, so a `demographic_embeds` of one row per prompt cannot follow them. `CuMATextGenerationPipeline` carries
each prompt's row with the prompt through preprocessing and batching; generate gets the rows of its batch:

    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer,
                                 pipeline_class=CuMATextGenerationPipeline)
    pipe(["prompt one", "prompt two"], demographic_embeds=z, batch_size=2)   # z [2, D]: row i conditions prompt i
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import TextGenerationPipeline
from transformers.pipelines.base import Chat, is_valid_message

EMBEDS_KEY = "demographic_embeds"


@dataclass
class _ConditionedPrompt:
    prompt: object  # a str or a transformers Chat
    demographic_embeds: torch.Tensor  # [1, D]


class CuMATextGenerationPipeline(TextGenerationPipeline):
    """The text-generation pipeline with `demographic_embeds=z` [number of prompts, D] per call: row i conditions
    prompt i, at any `batch_size`. Without the keyword it is the stock pipeline (a `conditioning` block still
    applies to its generate calls)."""

    def __call__(self, text_inputs, demographic_embeds=None, **kwargs):
        if demographic_embeds is None:
            return super().__call__(text_inputs, **kwargs)
        prompts, single = _prompts(text_inputs)
        z = torch.as_tensor(demographic_embeds)
        if z.dim() == 1 and single:
            z = z[None]
        if z.dim() != 2 or z.shape[0] != len(prompts):
            raise ValueError(
                f"demographic_embeds must hold one row per prompt: {len(prompts)} prompt(s), got shape "
                f"{tuple(z.shape)}; pass z of shape [{len(prompts)}, D], row i for prompt i")
        outputs = super().__call__([_ConditionedPrompt(p, z[i:i + 1]) for i, p in enumerate(prompts)], **kwargs)
        return outputs[0] if single else outputs

    def preprocess(self, prompt_text, **kwargs):
        if not isinstance(prompt_text, _ConditionedPrompt):
            return super().preprocess(prompt_text, **kwargs)
        inputs = super().preprocess(prompt_text.prompt, **kwargs)
        inputs[EMBEDS_KEY] = prompt_text.demographic_embeds  # batched with the prompt: [1, D] rows are concatenated
        return inputs

    def _forward(self, model_inputs, **generate_kwargs):
        z = model_inputs.pop(EMBEDS_KEY, None)
        if z is not None:
            generate_kwargs[EMBEDS_KEY] = z
        return super()._forward(model_inputs, **generate_kwargs)


def _prompts(text_inputs) -> tuple[list, bool]:
    """(the prompts, whether one prompt was given): a str, a chat (a list of messages), or a list of either."""
    if isinstance(text_inputs, (str, Chat)):
        return [text_inputs], True
    if isinstance(text_inputs, (list, tuple)) and text_inputs:
        if is_valid_message(text_inputs[0]):
            return [Chat(text_inputs)], True
        if all(isinstance(t, (list, tuple)) and t and is_valid_message(t[0]) for t in text_inputs):
            return [Chat(t) for t in text_inputs], False
        if all(isinstance(t, (str, Chat)) for t in text_inputs):
            return list(text_inputs), False
    raise ValueError("with demographic_embeds, pass the prompts as a str, a chat, or a list of either (one z row "
                     f"per prompt); got {type(text_inputs).__name__}")

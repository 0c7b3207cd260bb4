"""Prompts: a `SurveyExample` as chat messages (system: the profile, user: question + lettered choices + "Answer
with one letter.", assistant: the target letter) and as rendered chat-template text."""
from __future__ import annotations

from collections.abc import Sequence

from .example import SurveyExample


GENERIC_SYSTEM_PROMPT = "You are a helpful assistant that answers survey questions honestly."
ANSWER_INSTRUCTION = "Answer with one letter."


def format_question(example: SurveyExample) -> str:
    """The user turn: question, one "A. choice" line per choice, then the answer instruction."""
    lines = [example.question]
    lines += [f"{letter}. {choice}" for letter, choice in zip(example.letters, example.choices)]
    lines.append(ANSWER_INSTRUCTION)
    return "\n".join(lines)


def build_messages(
    example: SurveyExample,
    profile_in_prompt: bool = True,
    with_answer: bool = False,
    system_prompt: str = GENERIC_SYSTEM_PROMPT,
) -> list[dict[str, str]]:
    """Chat messages [system, user] (+ assistant: the target letter when `with_answer`).

    The system turn is the profile text, or `system_prompt` when `profile_in_prompt` is False or the profile is
    empty (the demographics then reach the model only through the routers' z).
    """
    system = example.profile if profile_in_prompt and example.profile else system_prompt
    messages = [{"role": "system", "content": system}, {"role": "user", "content": format_question(example)}]
    if with_answer:
        messages.append({"role": "assistant", "content": example.target_letter})
    return messages


def render_prompt(tokenizer, example: SurveyExample, profile_in_prompt: bool = True,
                  system_prompt: str = GENERIC_SYSTEM_PROMPT) -> str:
    """The prompt string up to the assistant turn (`apply_chat_template(..., add_generation_prompt=True)`)."""
    messages = build_messages(example, profile_in_prompt=profile_in_prompt, system_prompt=system_prompt)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


_SYSTEM_SLOT = "\x00cuma-system\x00"
_USER_SLOT = "\x00cuma-user\x00"


def render_prompts(tokenizer, examples: Sequence[SurveyExample], profile_in_prompt: bool = True,
                   system_prompt: str = GENERIC_SYSTEM_PROMPT) -> list[str]:
    """`render_prompt` for many examples, fast: the chat template runs once on placeholder turns and the texts are
    spliced in. The splice is checked against the full template on the first examples and is only used when it
    agrees (templates that rewrite message contents fall back to one template call per example).
    """
    if not examples:
        return []
    skeleton = tokenizer.apply_chat_template(
        [{"role": "system", "content": _SYSTEM_SLOT}, {"role": "user", "content": _USER_SLOT}],
        tokenize=False, add_generation_prompt=True,
    )
    user_cache: dict[tuple, str] = {}

    def user_text(e: SurveyExample) -> str:
        key = (e.question, e.choices, e.letters)
        text = user_cache.get(key)
        if text is None:
            text = user_cache[key] = format_question(e)
        return text

    splice_ok = skeleton.count(_SYSTEM_SLOT) == 1 and skeleton.count(_USER_SLOT) == 1
    if splice_ok:
        head, rest = skeleton.split(_SYSTEM_SLOT)
        middle, tail = rest.split(_USER_SLOT) if _USER_SLOT in rest else (None, None)
        splice_ok = middle is not None
    if splice_ok:
        def fast(e: SurveyExample) -> str:
            system = e.profile if profile_in_prompt and e.profile else system_prompt
            return head + system + middle + user_text(e) + tail

        checks = examples[:3]
        splice_ok = all(fast(e) == render_prompt(tokenizer, e, profile_in_prompt, system_prompt) for e in checks)
        if splice_ok:
            return [fast(e) for e in examples]
    return [render_prompt(tokenizer, e, profile_in_prompt, system_prompt) for e in examples]

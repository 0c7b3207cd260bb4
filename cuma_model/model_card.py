"""The README.md saved with an adapter: what a CuMA adapter is, what loading it needs, how z is made, its options.

The section carries markers, so a later save replaces the section and nothing else of the card: in a folder written
by `cuma_model.save_pretrained` a README.md without the markers is the user's and is left alone, and one with them
keeps whatever the user added around the section; in one written by PEFT's `save_pretrained` the section goes into
PEFT's card (which PEFT creates or updates first).
"""
from __future__ import annotations

from pathlib import Path

MODEL_CARD_NAME = "README.md"
BEGIN, END = "<!-- cuma adapter card -->", "<!-- end of cuma adapter card -->"


def card_section(config) -> str:
    """The card's CuMA section for `config` (a CuMAConfig), Markdown between the markers."""
    options = {**config.adapter_options(), "aux_loss_coef": config.aux_loss_coef}
    targets = config.target_modules if isinstance(config.target_modules, str) else ", ".join(config.target_modules)
    z = (f"a demographic embedding z of {config.demographic_dim} numbers per sequence, passed as "
         f"`demographic_embeds` [batch, {config.demographic_dim}]" if config.demographic_dim
         else "no demographic embedding (routed on hidden states alone)")
    norm = {"none": "", "center": " The routers centre z on the training profiles' mean (saved with the adapter).",
            "whiten": " The routers whiten z with the training profiles' statistics (saved with the adapter)."}
    base = config.base_model_name_or_path or "the base model it was trained on"
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in options.items())
    return f"""{BEGIN}
## CuMA adapter

A CuMA adapter (Cultural Mixture of Adapters, arXiv 2601.04885) for **{base}**: {config.num_experts} LoRA experts
of rank {config.r} in each adapted layer ({targets}), of which each token uses {config.top_k}, chosen by a router
that reads the token's hidden state and {z}.{norm[config.demographic_norm]}

**Loading needs the `cuma` package** (`pip install cuma`, then `import cuma_model`, which registers the PEFT method
`CUMA`); without it PEFT cannot read this folder (`KeyError: 'CUMA'`).

```python
import cuma_model
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "this-folder")   # or cuma_model.from_pretrained(base_model, ...)
out = model(input_ids, demographic_embeds=z)                   # z: one row per sequence
```

z is made the way it was in training: by default a sentence embedding (all-MiniLM-L6-v2) of a profile text such
as "You are a 34-year-old woman from Ohio, a Democrat." (`cuma_model.survey.encoder.DemographicEncoder`).
Serving engines (vLLM, SGLang, LoRAX, TGI) load plain LoRA adapters: `python -m cuma_model.export` writes one per
demographic group.

| option | value |
|---|---|
{rows}
{END}"""


def write_card(directory: str | Path, config, into_existing: bool) -> None:
    """Put the CuMA section into `directory`'s README.md: replace a section of ours; with `into_existing`, add it
    to a card without one (PEFT's); write a card where there is none. A card of someone else's is otherwise kept."""
    path = Path(directory) / MODEL_CARD_NAME
    section = card_section(config)
    if not path.exists():
        front = "---\nlibrary_name: peft\ntags:\n- cuma\n- lora\n- mixture-of-experts\n"
        if config.base_model_name_or_path:
            front += f"base_model: {config.base_model_name_or_path}\n"
        path.write_text(front + "---\n\n" + section + "\n", encoding="utf-8")
        return
    text = path.read_text(encoding="utf-8")
    if BEGIN in text and END in text:
        start, stop = text.index(BEGIN), text.index(END) + len(END)
        text = text[:start] + section + text[stop:]
    elif into_existing:
        head, body = _front_matter(text)
        text = head + section + "\n\n" + body
    else:
        return
    path.write_text(text, encoding="utf-8")


def _front_matter(text: str) -> tuple[str, str]:
    """(the YAML front matter with its closing line, the rest) of a card; ("", text) without one."""
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end != -1:
            return text[:end + 5] + "\n", text[end + 5:].lstrip("\n")
    return "", text

"""Every save writes a model card that says what the adapter is and what loading it needs; a user's card is kept."""
import pytest
import torch
from peft import PeftModel, get_peft_model

import cuma_model
from cuma_model.model_card import BEGIN
from tiny_models import tiny_decoder


def config(**kw):
    return cuma_model.CuMAConfig(num_experts=4, top_k=2, r=4, demographic_dim=6, router_hidden_dim=8, **kw)


def check_card(text, base):
    assert BEGIN in text and "import cuma_model" in text and "demographic_embeds" in text
    assert f"**{base}**" in text and "| `num_experts` | `4` |" in text and "cuma_model.export" in text


@pytest.mark.parametrize("path", ["cuma", "peft"])
def test_every_save_writes_a_card_naming_the_base_model(tmp_path, path):
    base = tiny_decoder("llama")
    base.config._name_or_path = "org/tiny-llama"
    if path == "cuma":
        model = cuma_model.patch_model(base, config())
        cuma_model.save_pretrained(model, tmp_path)
    else:
        model = get_peft_model(base, config())
        model.save_pretrained(tmp_path)
        assert "library_name: peft" in (tmp_path / "README.md").read_text()  # PEFT's card, with ours inside
    check_card((tmp_path / "README.md").read_text(), "org/tiny-llama")
    assert cuma_model.CuMAConfig.load(tmp_path).base_model_name_or_path == "org/tiny-llama"
    # saved again: one section, not two
    if path == "cuma":
        cuma_model.save_pretrained(model, tmp_path)
    else:
        model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text().count(BEGIN) == 1


def test_text_the_user_adds_around_the_section_is_kept(tmp_path):
    model = cuma_model.patch_model(tiny_decoder("llama"), config())
    cuma_model.save_pretrained(model, tmp_path)
    card = tmp_path / "README.md"
    card.write_text(card.read_text() + "\n## My results\n\n72% on my survey.\n")
    cuma_model.save_pretrained(model, tmp_path)
    text = card.read_text()
    assert "## My results" in text and "72% on my survey." in text and text.count(BEGIN) == 1


def test_a_users_own_readme_in_the_folder_is_kept(tmp_path):
    (tmp_path / "README.md").write_text("# my notes\n")
    model = cuma_model.patch_model(tiny_decoder("llama"), config())
    cuma_model.save_pretrained(model, tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my notes\n"
    loaded = cuma_model.from_pretrained(tiny_decoder("llama"), tmp_path)
    assert cuma_model.is_patched(loaded)

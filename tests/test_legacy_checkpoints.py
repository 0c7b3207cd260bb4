"""Adapters written by earlier releases load under today's tensor names and compute what they computed then.

The folders in tests/data were written by the release before the tensors took the method's prefix (config versions
2 and 4: `lora_A`, `lora_B`, `router`, shared routers on the attention and MLP modules), together with the logits
that release computed for fixed inputs.
"""
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import cuma_model
from tiny_models import tiny_decoder

DATA = Path(__file__).parent / "data"


def expected(folder):
    return load_file(str(folder / "expected_outputs.safetensors"))


@pytest.mark.parametrize("name", ["legacy_adapter_v2", "legacy_adapter_v4_peft"])
@pytest.mark.parametrize("loader", ["cuma", "peft"])
def test_an_adapter_of_an_earlier_release_loads_and_computes_what_it_computed(name, loader, tmp_path):
    folder = DATA / name
    e = expected(folder)
    if loader == "cuma":
        model = cuma_model.from_pretrained(tiny_decoder("llama"), folder)
    else:
        model = PeftModel.from_pretrained(tiny_decoder("llama"), folder)
    model.eval()
    names = [n for n, p in model.named_parameters() if "cuma_" in n]
    assert names and not any("lora_" in n or ".router." in n for n in names)
    with torch.no_grad():
        got = model(input_ids=e["input_ids"], demographic_embeds=e["demographic_embeds"]).logits
    torch.testing.assert_close(got, e["logits"], rtol=1e-5, atol=1e-5)
    # saved again, it is written in today's names and version, and loads to the same outputs
    cuma_model.save_pretrained(model, tmp_path / "again")
    assert cuma_model.CuMAConfig.load(tmp_path / "again").cuma_config_version == cuma_model.config.CONFIG_VERSION
    keys = cuma_model.checkpoint.read_adapter_weights(tmp_path / "again").keys()
    assert all("cuma_" in k for k in keys)
    again = cuma_model.from_pretrained(tiny_decoder("llama"), tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(e["input_ids"], demographic_embeds=e["demographic_embeds"]).logits, got)


def test_saving_over_an_earlier_releases_folder_of_the_same_layout_needs_no_overwrite(tmp_path):
    import shutil

    shutil.copytree(DATA / "legacy_adapter_v2", tmp_path / "a")
    model = cuma_model.from_pretrained(tiny_decoder("llama"), tmp_path / "a")
    cuma_model.save_pretrained(model, tmp_path / "a")  # the same adapter, renamed: not "another layout"
    assert cuma_model.CuMAConfig.load(tmp_path / "a").cuma_config_version == cuma_model.config.CONFIG_VERSION

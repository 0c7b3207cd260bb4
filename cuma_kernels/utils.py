"""Helpers shared by the Triton kernels: interpreter detection, autotune configs, tile sizes."""
from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1, read by triton at decoration time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning() -> bool:
    """Autotuning is on unless CUMA_AUTOTUNE=0 or the interpreter runs (it fails with two or more configs)."""
    return os.environ.get("CUMA_AUTOTUNE", "1") != "0" and not interpreting()


def tune_configs(gpu_configs: list[dict], default: dict, num_warps: int = 4) -> list[triton.Config]:
    """All `gpu_configs` when autotuning, else only `default` (one config: the interpreter's limit)."""
    chosen = gpu_configs if autotuning() else [default]
    configs = []
    for cfg in chosen:
        meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        configs.append(triton.Config(meta, num_warps=cfg.get("num_warps", num_warps),
                                     num_stages=cfg.get("num_stages", 3)))
    return configs


def rank_block(rank: int) -> int:
    """Tile size for the rank dimension: a power of two, at least 16 (tl.dot's minimum on a GPU)."""
    return max(16, triton.next_power_of_2(rank))

"""What the GPU report runs: the correctness cases, the timed shapes and the models, on a GPU and under `--cpu`.

A `Case` is one adapted projection's problem: shapes, dtype, A layout, routing pattern and tile order. The GPU plan
holds the headline shapes (T=16384, K=4096, N=4096 and 1024, r=64, E=8, k=2, bf16) and the shapes that exercise
the tail masks, the pair-major walk, r=128, skewed routing and empty experts; the CPU plan the same kinds of case
at sizes the Triton interpreter runs in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Largest |kernel - fp64 reference| allowed, as a fraction of max |reference| of the same tensor. The kernels round
# up to three times to the dtype on the way (an operand such as g * h cast for the tensor cores, the stored output),
# 2^-8 each in bf16 (measured up to 9e-3 under the interpreter), 2^-11 in fp16; fp32 leaves accumulation order.
# An elementwise bound: a wrong row or a missed tail is off by O(1) and fails it.
TOLERANCE = {"bf16": 2e-2, "fp16": 3e-3, "fp32": 1e-4}


@dataclass(frozen=True)
class Case:
    T: int
    K: int
    N: int
    r: int
    E: int
    k: int
    dtype: str = "bf16"
    shared_A: bool = False
    pattern: str = "random"  # "random"; "skewed": every token's first slot on expert 0; "empty": expert E-1 unused
    walk: str = "auto"  # "tokens" / "pairs": force the shrink and dy pass to walk tokens / expert-sorted pairs
    siblings: int = 1  # > 1: that many projections share one shrink over their concatenated A's (q/k/v)

    @property
    def name(self) -> str:
        parts = [f"T={self.T} K={self.K} N={self.N} r={self.r} E={self.E} k={self.k} {self.dtype}",
                 "shared A" if self.shared_A else "per-expert A"]
        if self.pattern != "random":
            parts.append(self.pattern)
        if self.walk != "auto":
            parts.append(f"walk {self.walk}")
        if self.siblings > 1:
            parts.append(f"{self.siblings} projections, one shrink")
        return ", ".join(parts)


@dataclass(frozen=True)
class Plan:
    device: str
    dtype: str
    headline: tuple[Case, ...]  # precompiled first, then timed
    checks: tuple[Case, ...]  # per-kernel correctness
    config_checks: tuple[Case, ...]  # each autotune config of each kernel, on each of these
    sweep: tuple[Case, ...]  # experts alone, timed
    warmup: int
    iters: int
    models: tuple[tuple[str, dict], ...]
    batch: tuple[int, int]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def gpu_plan() -> Plan:
    head = tuple(Case(16384, 4096, n, 64, 8, 2) for n in (4096, 1024))
    ragged = Case(1000, 1000, 776, 48, 8, 2, pattern="empty")
    checks = (head + tuple(Case(16384, 4096, n, 64, 8, 2, shared_A=True) for n in (4096, 1024))
              + (ragged, Case(1000, 1000, 776, 48, 8, 2, shared_A=True, pattern="empty"),
                 Case(2000, 1000, 776, 48, 8, 2, walk="tokens"),
                 Case(8, 4096, 4096, 64, 8, 2), Case(8, 1000, 776, 48, 8, 2, shared_A=True),
                 Case(16384, 4096, 4096, 64, 8, 2, pattern="skewed"),
                 Case(4096, 4096, 4096, 128, 16, 2), Case(1000, 1000, 776, 128, 16, 2, pattern="skewed"),
                 Case(16384, 4096, 1024, 64, 8, 2, siblings=3), Case(1000, 1000, 776, 48, 8, 2, siblings=3),
                 # other dtypes last: each compiles its own variants of every kernel
                 Case(1000, 1000, 776, 48, 8, 2, "fp16", pattern="empty"),
                 Case(1000, 1000, 776, 48, 8, 2, "fp16", shared_A=True),
                 Case(1000, 1000, 776, 48, 8, 2, "fp32")))
    configs = (Case(2000, 1000, 776, 48, 8, 2, walk="tokens"), Case(1000, 1000, 776, 48, 8, 2, pattern="empty"),
               Case(1000, 1000, 776, 48, 8, 2, shared_A=True))
    sweep = (Case(16384, 4096, 4096, 128, 16, 2), Case(16384, 4096, 4096, 64, 8, 2, pattern="skewed"),
             Case(2048, 4096, 4096, 64, 8, 2), Case(8, 4096, 4096, 64, 8, 2))
    models = (("SmolLM2-135M shape, 6 layers", dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                                   num_key_value_heads=3, num_hidden_layers=6, vocab_size=49152)),
              ("8B shape, 2 layers", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                          num_key_value_heads=8, num_hidden_layers=2, vocab_size=128256)))
    return Plan("cuda", "bf16", head, checks, configs, sweep, 5, 30, models, (4, 1024))


def cpu_plan() -> Plan:
    """The same kinds of case at interpreter sizes (K, N and r not multiples of the tiles, T from 8 to 100), few
    enough that the whole --cpu run stays under 2 minutes on one core."""
    head = (Case(64, 48, 40, 16, 4, 2, "fp32"),)
    checks = (Case(75, 40, 56, 12, 6, 2, "fp32", pattern="empty"),
              Case(75, 40, 56, 12, 6, 2, "fp32", shared_A=True, pattern="empty"),
              Case(75, 40, 56, 12, 6, 2, "bf16", pattern="skewed"),
              Case(75, 40, 56, 12, 6, 2, "fp16", shared_A=True),
              Case(100, 40, 56, 12, 4, 2, "fp32", walk="tokens"),
              Case(8, 40, 56, 16, 8, 2, "fp32"),
              Case(40, 40, 24, 128, 4, 2, "bf16", pattern="empty"),
              Case(40, 40, 24, 8, 6, 2, "fp32", siblings=3))
    configs = (Case(100, 40, 56, 12, 4, 2, "fp32", walk="tokens"), Case(48, 40, 56, 12, 6, 2, "fp32", shared_A=True))
    sweep = ()  # the step is GPU only
    models = (("tiny Llama, 1 layer", dict(hidden_size=32, intermediate_size=48, num_attention_heads=2,
                                           num_key_value_heads=1, num_hidden_layers=1, vocab_size=64)),)
    return Plan("cpu", "fp32", head, checks, configs, sweep, 0, 1, models, (1, 8))

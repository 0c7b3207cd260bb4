"""Public ops and backend choice: CUDA tensors -> Triton, CPU tensors -> the vectorised torch path.

`CUMA_BACKEND=triton|torch|auto` overrides the choice (triton on CPU means the Triton interpreter).
"""
from __future__ import annotations

import os

import torch

from .reference import lora_experts_torch, route_topk_torch


def backend_for(t: torch.Tensor) -> str:
    choice = os.environ.get("CUMA_BACKEND", "auto")
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"CUMA_BACKEND must be auto, triton or torch, got {choice!r}")
    if choice == "auto":
        return "triton" if t.is_cuda else "torch"
    return choice


def route_topk(logits: torch.Tensor, top_k: int, mode: str = "cuma") -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (topk_weights [T, k] float32, topk_idx [T, k] int32)."""
    if logits.dim() != 2:
        raise ValueError(f"route_topk expects logits of shape [T, E], got {tuple(logits.shape)}")
    if not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={logits.shape[1]}]")
    return route_topk_torch(logits, top_k, mode)


def lora_experts(x, lora_A, lora_B, topk_idx, topk_weights, scaling: float, base_out=None) -> torch.Tensor:
    """y = base_out + scaling * sum_j w_tj B_{e_tj} A_{e_tj} x_t. Shapes: see reference.lora_experts_torch."""
    return lora_experts_torch(x, lora_A, lora_B, topk_idx, topk_weights, scaling, base_out)

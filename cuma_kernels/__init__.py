"""Kernels for CuMA: top-k routing and grouped LoRA experts (Triton on CUDA, vectorised torch on CPU)."""
from .ops import lora_experts, route_topk

__all__ = ["lora_experts", "route_topk"]

"""Kernels for CuMA: top-k routing and grouped LoRA experts (Triton on CUDA, vectorised torch on CPU)."""
from .ops import backend_for, lora_expand, lora_experts, lora_shrink, route_topk
from .routing import DispatchMetadata, dispatch_metadata

__all__ = ["DispatchMetadata", "backend_for", "dispatch_metadata", "lora_expand", "lora_experts", "lora_shrink",
           "route_topk"]

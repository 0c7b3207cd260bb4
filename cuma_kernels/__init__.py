"""Kernels for CuMA: top-k routing and grouped LoRA experts (Triton on CUDA, vectorised torch on CPU)."""
from .base_linear import FLOAT_DTYPES, linear_with_experts
from .ops import backend_for, lora_expand, lora_experts, lora_shrink, route_topk
from .routing import DispatchMetadata, dispatch_metadata

__all__ = ["FLOAT_DTYPES", "DispatchMetadata", "backend_for", "dispatch_metadata", "linear_with_experts", "lora_expand", "lora_experts",
           "lora_shrink", "route_topk"]

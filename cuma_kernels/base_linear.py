"""The base linear and its experts as one op that owns both backwards: y = x W^T + b + experts(x).

Forward: the expand writes the expert output (plus the bias) into a fresh [T, N] buffer, then the base GEMM adds
x W^T into that buffer in place (`addmm_`: the GEMM reads it as its C operand, so no [T, N] pass of its own).
Backward: the experts' dx kernel writes the dx buffer, then the base GEMM adds dy W into it in place. There is no
separate experts' dx tensor and no autograd add of two dx terms; dB, dA and the gate gradient are the experts'
usual ones. dW = dy^T x only when the base weight requires grad, d bias = sum_t dy_t when the bias does.

The caller (`cuma_model.layer`) takes this path only for a plain dense `nn.Linear` in the compute dtype;
quantized or wrapped bases keep computing their own output, and the experts add into it (`ops.lora_experts`).
"""
from __future__ import annotations

import torch

from .ops import _check_expert_inputs, _lora_experts_bwd, _lora_experts_fwd, expert_plan
from .routing import DispatchMetadata

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _LinearWithExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, topk_weights, topk_idx, scaling, sort_order, offsets,
                token_order, backend):
        T, n = x.shape[0], weight.shape[0]
        out = x.new_empty(T, n)
        # the bias enters through the expand's base operand, broadcast over tokens (stride 0): no extra pass
        base = bias.expand(T, n) if bias is not None else None
        h = _lora_experts_fwd(x, lora_A, lora_B, topk_idx, topk_weights, scaling, out, base, False, sort_order,
                              offsets, token_order, backend)
        out.addmm_(x, weight.t())
        ctx.scaling, ctx.backend = scaling, backend
        ctx.save_for_backward(x, weight, lora_A, lora_B, topk_idx, topk_weights, h, sort_order, offsets, token_order)
        return out

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, topk_idx, topk_weights, h, sort_order, offsets, token_order = ctx.saved_tensors
        dx, d_a, d_b, d_w = _lora_experts_bwd(grad_y, x, lora_A, lora_B, topk_idx, topk_weights, h, ctx.scaling,
                                              sort_order, offsets, token_order, ctx.backend)
        dx.addmm_(grad_y, weight)  # the base dx, added into the experts' dx buffer in place
        d_weight = grad_y.t() @ x if ctx.needs_input_grad[1] else None
        d_bias = grad_y.sum(0) if ctx.needs_input_grad[2] else None
        return dx, d_weight, d_bias, d_a, d_b, d_w, None, None, None, None, None, None


def linear_with_experts(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    scaling: float,
    dispatch: DispatchMetadata | None = None,
) -> torch.Tensor:
    """y = x W^T + b + scaling * sum_j w_tj * B_{e_tj} A_{e_tj} x_t, [T, N] in x's dtype, with one backward.

    x [T, K]; weight [N, K] and bias [N] (or None) of the base linear, in x's dtype (fp32, bf16 or fp16); the
    expert arguments as in `lora_experts`. Differentiable w.r.t. x, weight, bias, lora_A, lora_B and topk_weights.
    """
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if weight.dim() != 2 or weight.shape != (lora_B.shape[1], x.shape[-1]):
        raise ValueError(f"weight must have shape [N={lora_B.shape[1]}, K={x.shape[-1]}], got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape [N={weight.shape[0]}], got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}; the base linear "
                            "must be in the compute dtype on x's device")
    _check_expert_inputs(x, lora_A, lora_B, topk_idx, topk_weights, None)
    backend, sort_order, offsets, token_order = expert_plan(x, lora_A, lora_B, topk_idx, dispatch)
    return _LinearWithExperts.apply(x, weight, bias, lora_A, lora_B, topk_weights, topk_idx, float(scaling),
                                    sort_order, offsets, token_order, backend)

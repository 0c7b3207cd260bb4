"""The load-balancing loss for callers that compute their own loss from the backbone (TRL's fused LM head).

Such a caller never sees `outputs.aux_loss`, so the aux loss rides on the backbone's hidden states instead: an
identity whose backward also hands the aux loss the gradient `weight`. Whatever loss the caller builds from those
hidden states, its backward then carries `weight * d aux`, as if `weight * aux` had been added to the scalar that
is backpropagated (the same device MoE trainers use for auxiliary losses that never reach the loss tensor): a
scale the caller applies to its loss afterwards (a task weight) does not scale it. The `aux_loss` the backbone
returns is then detached, so adding it as well changes nothing.

`weight` follows TRL's weighting of a MoE model's aux loss: each micro-batch's counts 1 / (gradient accumulation
steps). Only the trainer knows that number, so `CuMACallback` hands it to the model while it trains (a loop of
one's own sets `model.cuma.accumulation_steps`); without either the weight is 1 and a warning says so. A loss that
is scaled before its backward (fp16 `GradScaler`) would shrink the aux gradient by the scale once unscaled, so
under fp16 autocast nothing is attached and a warning says so; bf16 and fp32 need no scaler.
"""
from __future__ import annotations

import warnings

import torch


class _AddAuxGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.weight, dtype=dtype, device=device), None


def attach_aux_loss(hidden: torch.Tensor, aux: torch.Tensor, handle) -> torch.Tensor:
    """`hidden`, unchanged, with `aux / accumulation steps` joining the gradient of any loss computed from it."""
    if not (torch.is_grad_enabled() and aux.requires_grad):
        return hidden
    device = hidden.device.type
    fp16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    if fp16 or handle.accumulation_steps is None:
        _warn_once(handle, "under fp16 autocast: fp16 loss scaling would all but cancel the load-balancing loss, so "
                           "it is left out (it stays in outputs.aux_loss); train in bf16 or fp32 to keep it" if fp16
                   else "without CuMACallback among the trainer's callbacks: the load-balancing loss is weighted as "
                        "for one micro-batch per step (add the callback, or set model.cuma.accumulation_steps in a "
                        "loop of your own, to weight it by the gradient accumulation steps)")
        if fp16:
            return hidden
    return _AddAuxGradient.apply(hidden, aux, 1.0 / (handle.accumulation_steps or 1))


def _warn_once(handle, why: str) -> None:
    if not handle.warned_backbone_aux and not torch.compiler.is_compiling():  # a warning would break the graph
        handle.warned_backbone_aux = True
        warnings.warn(f"the backbone of a CuMA model was called directly (as TRL's fused LM head does) {why}",
                      stacklevel=4)

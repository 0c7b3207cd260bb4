"""CuMALinear: a frozen base nn.Linear plus E routed LoRA experts."""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from torch import nn

import cuma_kernels

from .context import Route, active_state, is_disabled, pending_embeds, recorder, RoutingRecord
from .router import DemographicRouter, load_balancing_loss
from .targets import execution_device, features


class CuMALinear(nn.Module):
    """y = base(x) + (alpha / r) * sum_{j in topk(t)} g_tj B_j A_j dropout(x).

    Wraps the existing `base_layer` (its weight is never copied, so quantized or sharded bases keep working).
    `cuma_A` is [E, r, in] (or [1, r, in] for the shared-A layout), `cuma_B` is [E, out, r].
    The router (`cuma_router`) may be shared with sibling projections (q/k/v, gate/up): it is registered on the
    first of them, so every adapter tensor lives inside an adapted layer, and the others only refer to it.
    Every name carries the method's prefix `cuma_`, which tells its tensors from a LoRA's in one model.
    """

    def __init__(self, base_layer: nn.Linear, router: DemographicRouter, owner, *, owns_router: bool, r: int,
                 lora_alpha: float, shared_A: bool, dropout: float, init_A_std: float, dtype: torch.dtype):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = features(base_layer)
        num_experts = router.num_experts
        device = execution_device(base_layer)
        self.r, self.scaling = r, lora_alpha / r
        self.cuma_A = nn.Parameter(
            torch.randn(1 if shared_A else num_experts, r, self.in_features, dtype=dtype, device=device) * init_A_std
        )
        self.cuma_B = nn.Parameter(torch.zeros(num_experts, self.out_features, r, dtype=dtype, device=device))
        self.cuma_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if owns_router:
            self.cuma_router = router
        else:  # a shared router is registered once, on the first sibling
            self.__dict__["cuma_router"] = router
        self.__dict__["owner"] = owner  # the model's CuMAHandle: not a module

    @property
    def weight(self) -> torch.Tensor:  # so code that inspects proj.weight (dtype, device) keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """-> (A [E or 1, r, in], B [E, out, r], scaling)."""
        return self.cuma_A, self.cuma_B, self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_disabled(self.owner) or getattr(self, "_disable_adapters", False):  # the latter: PEFT's per-layer switch
            return self.base_layer(x)
        owned = self._owns_base(x)
        out = None if owned else self.base_layer(x)
        route = self._route(x)
        # The experts compute in the dtype the base produced: under autocast that is the autocast dtype, whatever
        # x and the (fp32 master) adapter weights are. Autocast is off inside, so the ops' own fp32 accumulation
        # is not cast down again. (The owned path runs only where that dtype is x's own.)
        dtype = x.dtype if owned else out.dtype
        if route.dispatch is None and cuma_kernels.backend_for(x) == "triton":
            route.dispatch = cuma_kernels.dispatch_metadata(route.topk_idx, self.cuma_router.num_experts)
        device = x.device.type
        # Added into `out` in place (this call's own intermediate: nobody else reads it), except under
        # torch.compile: AOT autograd hands an in-place custom function on a view the wrong gradient, and the
        # compiler plans the buffers itself anyway
        in_place = not torch.compiler.is_compiling()
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            h = self._shared_shrink(route, x, dtype)
            if h is not None:  # this projection's slice of the shrink run once for its siblings
                if out is None:
                    out = self.base_layer(x)
                y = cuma_kernels.lora_expand(h, self.cuma_B.to(dtype), route.topk_idx, route.topk_weights,
                                             self.scaling, base_out=out.reshape(-1, self.out_features),
                                             dispatch=route.dispatch, inplace=in_place)
                return y.view(out.shape)
            x2 = self.cuma_dropout(x).reshape(-1, self.in_features).to(dtype)
            if owned:  # one op for the base and the experts, forward and backward
                y = cuma_kernels.linear_with_experts(
                    x2, self.base_layer.weight, self.base_layer.bias, self.cuma_A.to(dtype), self.cuma_B.to(dtype),
                    route.topk_idx, route.topk_weights, self.scaling, dispatch=route.dispatch)
                return y.view(*x.shape[:-1], self.out_features)
            y = cuma_kernels.lora_experts(
                x2,
                self.cuma_A.to(dtype),
                self.cuma_B.to(dtype),
                route.topk_idx,
                route.topk_weights,
                self.scaling,
                base_out=out.reshape(-1, self.out_features),
                dispatch=route.dispatch,
                inplace=in_place,
            )
        return y.view(out.shape)

    def _owns_base(self, x: torch.Tensor) -> bool:
        """True when the experts' op computes the base linear too (`cuma_kernels.linear_with_experts`), so that
        the experts' dx and the base dx share one buffer: for a plain frozen dense nn.Linear (no hooks, not
        quantized or wrapped) in x's float dtype on x's device, with no active dropout on the experts' input
        (then both read the same x), outside autocast and torch.compile. CUMA_OWN_BASE=0 turns it off."""
        base = self.base_layer
        if type(base) is not nn.Linear or os.environ.get("CUMA_OWN_BASE", "1") == "0":
            return False
        if base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"):
            return False
        weight, bias = base.weight, base.bias
        if weight.requires_grad or type(weight) is not nn.Parameter or weight.dtype not in cuma_kernels.FLOAT_DTYPES:
            return False
        if weight.dtype != x.dtype or weight.device != x.device or (bias is not None and bias.dtype != x.dtype):
            return False
        if self._dropping() or torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
            return False
        return True

    def _shared_shrink(self, route: Route, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """This layer's h from the shrink shared by the projections routed by the same route (same router, same
        input tensor), or None: then it runs its own fused shrink + expand.

        The first projection to use the route runs the shrink for every sibling that can share it, in one launch
        over their A's concatenated along r (x read once); the others take their column slice. Siblings are this
        router's layers with the same input width and A layout and no active dropout (each draws its own mask)
        that do not own their base (`_owns_base`: by the roofline model, owning the base per projection costs
        less than sharing the shrink, because it drops a dx add per projection; CUMA_OWN_BASE=0 restores sharing).
        A sibling that then receives a different input computes its own and its slice goes unused. Triton backend
        only (CUMA_SHARED_SHRINK=0 turns it off).
        """
        if route.shrink is None:
            route.shrink = {}
            state = active_state(self.owner)
            routed_alike = state.layers_routed_by(self.cuma_router.key) if state is not None else ()
            group = [layer for layer in routed_alike if layer.in_features == self.in_features
                     and layer.cuma_A.shape[0] == self.cuma_A.shape[0] and layer.cuma_A.device == x.device
                     and not layer._dropping() and not layer._owns_base(x)]
            if (len(group) > 1 and self in group and os.environ.get("CUMA_SHARED_SHRINK", "1") != "0"
                    and cuma_kernels.backend_for(x) == "triton"):
                x2 = x.reshape(-1, self.in_features).to(dtype)
                cuma_A = torch.cat([layer.cuma_A.to(dtype) for layer in group], dim=1)  # [E|1, sum r, in]
                h = cuma_kernels.lora_shrink(x2, cuma_A, route.topk_idx, self.cuma_router.num_experts, route.dispatch)
                route.shrink = dict(zip(group, torch.split(h, [layer.r for layer in group], dim=1)))
        return route.shrink.pop(self, None)

    def _dropping(self) -> bool:
        return self.training and isinstance(self.cuma_dropout, nn.Dropout) and self.cuma_dropout.p > 0

    def _route(self, x: torch.Tensor) -> Route:
        """Route x, once per (router, input): q/k/v sharing a router and an input reuse one decision."""
        state = active_state(self.owner)
        key = self.cuma_router.key
        if state is not None:
            cached = state.cached_route(key, x)
            if cached is not None:
                return cached
            z = state.demographic_embeds
        else:
            z = pending_embeds(self.owner)
        x3 = self._token_view(x, state, z)
        logits = self.cuma_router.logits(x3, z)
        topk_weights, topk_idx = self.cuma_router.route_flat(logits)
        route = Route(topk_weights, topk_idx)
        if state is not None:
            state.store_route(key, x, route)
            if state.compute_aux:
                gates = self.cuma_router.gates(logits, topk_weights, topk_idx)
                mask = state.token_mask(x3.shape[0], x3.shape[1])
                state.aux_terms.append(load_balancing_loss(gates, self.cuma_router.top_k, mask))
        trace = recorder(self.owner)
        if trace is not None:
            shape = (*x3.shape[:2], -1)
            trace.records.append(
                RoutingRecord(key, topk_idx.detach().long().view(shape).cpu(), topk_weights.detach().view(shape).cpu())
            )
        return route

    def _token_view(self, x: torch.Tensor, state, z) -> torch.Tensor:
        """x as [batch, seq, in]: a layer that sees the call's tokens flattened to [batch * seq, in] (a MoE shared
        expert) routes each token with its own row's z. The match is by count: a layer fed some other batch * seq
        rows (a routed expert that happened to get every token) would be mistaken for one; such layers are not
        `nn.Linear` targets in transformers' MoE models. Other shapes cannot be matched to rows of z."""
        if x.dim() == 3:
            if state is not None and state.token_shape is None:
                state.token_shape = tuple(x.shape[:2])
            return x
        if x.dim() == 2 and state is not None and state.token_shape is not None \
                and x.shape[0] == state.token_shape[0] * state.token_shape[1]:
            return x.view(*state.token_shape, x.shape[-1])
        if x.dim() == 2 and z is not None and x.shape[0] == z.shape[0]:  # one token per row
            return x[:, None, :]
        if z is None:  # routed on hidden states alone: any token layout will do
            return x.reshape(1, -1, x.shape[-1])
        raise ValueError(f"the layer routed by {self.cuma_router.key} received input of shape {tuple(x.shape)}, neither "
                         "[batch, seq, hidden] nor the call's tokens flattened: its rows cannot be matched to rows "
                         "of demographic_embeds (a routed MoE expert sees a subset of the tokens); leave it out of "
                         "target_modules")

    def extra_repr(self) -> str:
        shared = ", shared_A" if self.cuma_A.shape[0] == 1 else ""
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}{shared}"

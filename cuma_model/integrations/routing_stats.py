"""Per-expert load and router entropy of a model's training forwards, for a trainer's logs (`CuMACallback`)."""
from __future__ import annotations

import torch

from ..context import active_state


class RoutingStatsMeter:
    """While attached, every routing decision of a training forward (grad enabled) adds to running totals:
    how many of the top-k slots each expert got and the entropy of each token's full router softmax. Padding
    tokens (a 2-D attention mask's zeros) are left out. Totals stay on the device until `pop`."""

    def __init__(self, handle):
        self.handle = handle
        self.wrapped: list = []
        self._reset()

    def _reset(self):
        self.load = self.entropy = self.tokens = None

    def attach(self) -> None:
        for router in self.handle.routers.values():
            router.__dict__.pop("route_flat", None)  # a meter left attached by a run that raised: replaced
            router.route_flat = self._measured(router, router.route_flat)
            self.wrapped.append(router)

    def detach(self) -> None:
        for router in self.wrapped:
            router.__dict__.pop("route_flat", None)
        self.wrapped = []

    def _measured(self, router, route_flat):
        def route_flat_measured(logits):
            out = route_flat(logits)
            if torch.is_grad_enabled():
                self._add(router, logits, out[1])
            return out
        return route_flat_measured

    @torch.no_grad()
    def _add(self, router, logits: torch.Tensor, topk_idx: torch.Tensor) -> None:
        flat = logits.reshape(-1, router.num_experts).float()
        idx = topk_idx.reshape(flat.shape[0], -1).long()
        state = active_state(self.handle)
        mask = state.token_mask(*logits.shape[:2]) if state is not None and logits.dim() == 3 else None
        keep = mask.reshape(-1).bool() if mask is not None else torch.ones(flat.shape[0], dtype=torch.bool,
                                                                              device=flat.device)
        probs = torch.softmax(flat, dim=-1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
        counts = torch.zeros(router.num_experts, device=flat.device)
        counts.index_add_(0, idx[keep].reshape(-1), torch.ones(idx[keep].numel(), device=flat.device))
        total_entropy = entropy[keep].sum()
        tokens = keep.sum()
        if self.load is None:
            self.load, self.entropy, self.tokens = counts, total_entropy, tokens
        else:  # no host sync per call: the totals are read once per log
            self.load = self.load + counts.to(self.load.device)
            self.entropy = self.entropy + total_entropy.to(self.load.device)
            self.tokens = self.tokens + tokens.to(self.load.device)

    def pop(self) -> dict[str, float]:
        """{"router_entropy": mean entropy (nats) per token and router, "expert_load/<e>": expert e's share of the
        top-k slots} since the previous pop; {} when no training forward ran."""
        if self.load is None or not int(self.tokens):
            self._reset()
            return {}
        share = (self.load / self.load.sum().clamp_min(1)).tolist()
        logs = {"router_entropy": float(self.entropy) / int(self.tokens)}
        logs.update({f"expert_load/{e}": s for e, s in enumerate(share)})
        self._reset()
        return logs

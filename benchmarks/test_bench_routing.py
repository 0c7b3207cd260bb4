"""Router tail (softmax -> top-k -> renormalise): cuma_kernels.route_topk against plain torch and the published form.

Rows: `cuma` (route_topk), `torch` (softmax, torch.topk, softmax over the k probabilities, as separate torch ops),
`published` (softmax, top-k, a finfo.min-filled [T, E] gate matrix, a second softmax, then the layer's second top-k).
"""
from __future__ import annotations

import pytest
import torch

import cuma_kernels
from baselines import published_route_topk, torch_route_topk
from harness import leaf, measure

PROVIDERS = {
    "cuma": lambda logits, k: cuma_kernels.route_topk(logits, k),
    "torch": torch_route_topk,
    "published": published_route_topk,
}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_routing(benchmark, problem, budget, provider, mode):
    route, k, train = PROVIDERS[provider], problem.shape.k, mode == "fwd+bwd"

    def fn():
        logits = leaf(problem.logits, train)
        with torch.set_grad_enabled(train):
            weights, _ = route(logits, k)
        if train:
            weights.backward(problem.grad_w)

    measure(benchmark, fn, op="routing", mode=mode, provider=provider, problem=problem, budget=budget)

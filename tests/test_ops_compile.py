"""The custom ops trace under torch.compile(fullgraph=True), pass torch.library.opcheck, and the GPU report's
smoke mode runs on CPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cuma_kernels import lora_experts, route_topk

DEVICE = os.environ.get("CUMA_TEST_DEVICE", "cpu")
ROOT = Path(__file__).resolve().parents[1]


def _layer(x, logits, A, B, base, mode):
    w, idx = route_topk(logits, 2, mode)
    return lora_experts(x, A, B, idx, w, 0.5, base)


def _inputs(shared, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T, K, N, r, E = 11, 24, 20, 4, 5
    tensors = [torch.randn(T, K, generator=gen), torch.randn(T, E, generator=gen),
               torch.randn(1 if shared else E, r, K, generator=gen), torch.randn(E, N, r, generator=gen),
               torch.randn(T, N, generator=gen)]
    return [t.to(DEVICE).requires_grad_() for t in tensors]


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("mode", ["cuma", "soft"])
def test_compile_fullgraph_matches_eager(shared, mode):
    torch._dynamo.reset()
    eager_in = _inputs(shared)
    compiled_in = [t.detach().clone().requires_grad_() for t in eager_in]
    y = _layer(*eager_in, mode)
    y.square().sum().backward()
    compiled = torch.compile(_layer, backend="aot_eager", fullgraph=True)
    yc = compiled(*compiled_in, mode)
    yc.square().sum().backward()
    torch.testing.assert_close(yc, y)
    for a, b in zip(compiled_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad)
    assert eager_in[1].grad.abs().sum() > 0  # the router logits receive a gradient


def test_opcheck_custom_ops(monkeypatch):
    monkeypatch.setenv("CUMA_BACKEND", "torch")
    x, logits, A, B, base = _inputs(False, seed=1)
    w, idx = route_topk(logits.detach(), 2)
    torch.library.opcheck(torch.ops.cuma.route_topk.default, (logits, 2, "sum", "torch"))
    torch.library.opcheck(torch.ops.cuma.lora_experts_fwd.default,
                          (x, A, B, idx, w.requires_grad_(), 0.5, base, None, None, None, "torch"))


def test_gpu_report_smoke_mode():
    env = dict(os.environ, CUMA_BACKEND="torch")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), "--smoke"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for provider in ("cuma", "loop", "dense", "base"):
        assert provider in proc.stdout

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
    from cuma_kernels.routed_cpu import pair_order
    order, offsets = pair_order(idx, B.shape[0])
    torch.library.opcheck(torch.ops.cuma.lora_experts_fwd.default,  # the routed form of the torch path
                          (x, A, B, idx, w, 0.5, base, order, offsets, None, "torch_routed"))


def test_gpu_report_smoke_mode():
    env = dict(os.environ, CUMA_BACKEND="torch")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), "--smoke"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for provider in ("cuma", "loop", "dense", "base"):
        assert provider in proc.stdout


# ---- Compiling the kernels for a Hopper GPU without one ------------------------------------------------------
# The interpreter accepts programs a GPU compiler rejects (mixed dot operand types, tiles under 16, ...), so the
# kernels are also compiled to a cubin for sm_90 here, in a child process without TRITON_INTERPRET.
# `python tests/test_ops_compile.py --all` compiles every dtype and tile variant (minutes).


def _compile_kernels_for_sm90(all_variants: bool) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cuma_kernels import grouped_lora, routing

    target = GPUTarget("cuda", 90, 32)

    def compile_one(fn, pointers, floats, constexprs):
        sig = {name: "constexpr" if name in constexprs else pointers.get(name, "fp32" if name in floats else "i32")
               for name in fn.arg_names}
        triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=target)

    dtypes = ("bf16", "fp16", "fp32") if all_variants else ("bf16",)
    for dt in dtypes:
        ieee = dt == "fp32"
        for k, block_e, block_k in ([(2, 8, 2), (1, 2, 2), (8, 64, 8)] if all_variants else [(2, 8, 2)]):
            compile_one(routing._route_topk_kernel, {"logits_ptr": "*" + dt, "weights_ptr": "*fp32", "idx_ptr": "*i32"},
                        (), dict(TOP_K=k, MODE=0, BLOCK_T=64, BLOCK_E=block_e, BLOCK_K=block_k))
        for grouped, block_r in ([(True, 16), (False, 128), (True, 64)] if all_variants else [(True, 16)]):
            compile_one(grouped_lora._gather_matmul_kernel.fn,
                        {"x_ptr": "*" + dt, "w_ptr": "*" + dt, "out_ptr": "*fp32", "order_ptr": "*i64",
                         "expert_ptr": "*i32"}, ("scale",),
                        dict(TOP_K=2, GROUPED=grouped, UPCAST=False, IEEE=ieee, BLOCK_R=block_r, BLOCK_M=64,
                             BLOCK_K=64))
        for permuted, block_r in ([(True, 16), (False, 128), (True, 64)] if all_variants else [(True, 16)]):
            compile_one(grouped_lora._expand_kernel.fn,
                        {"h_ptr": "*fp32", "b_ptr": "*" + dt, "idx_ptr": "*i32", "gate_ptr": "*fp32",
                         "token_order_ptr": "*i64", "base_ptr": "*" + dt, "out_ptr": "*" + dt}, ("scaling",),
                        dict(TOP_K=2, HAS_BASE=permuted, PERMUTED=permuted, UPCAST=False, IEEE=ieee,
                             BLOCK_R=block_r, BLOCK_T=64, BLOCK_N=64))
        for block_r in ([16, 128] if all_variants else [16]):
            compile_one(grouped_lora._expand_weight_grad_kernel.fn,
                        {"dy_ptr": "*" + dt, "h_ptr": "*fp32", "gate_ptr": "*fp32", "order_ptr": "*i64",
                         "offsets_ptr": "*i64", "db_ptr": "*" + dt}, ("scaling",),
                        dict(TOP_K=2, UPCAST=False, IEEE=ieee, BLOCK_R=block_r, BLOCK_M=64, BLOCK_N=64))
    print("compiled for sm_90")


def test_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "compiled for sm_90" in proc.stdout, proc.stdout + proc.stderr


if __name__ == "__main__":
    _compile_kernels_for_sm90(all_variants="--all" in sys.argv)

"""The custom ops trace under torch.compile(fullgraph=True), pass torch.library.opcheck, and the kernels compile for
sm_90 (the GPU report's --cpu mode is tested in test_gpu_report.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cuma_kernels import dispatch_metadata, lora_expand, lora_experts, lora_shrink, route_topk

DEVICE = os.environ.get("CUMA_TEST_DEVICE", "cpu")
ROOT = Path(__file__).resolve().parents[1]


def _layer(x, logits, A, B, base, mode, inplace=False):
    w, idx = route_topk(logits, 2, mode)
    if inplace:  # into an intermediate, as the model layer does
        return lora_experts(x, A, B, idx, w, 0.5, base * 1.0, inplace=True)
    return lora_experts(x, A, B, idx, w, 0.5, base)


def _inputs(shared, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T, K, N, r, E = 11, 24, 20, 4, 5
    tensors = [torch.randn(T, K, generator=gen), torch.randn(T, E, generator=gen),
               torch.randn(1 if shared else E, r, K, generator=gen), torch.randn(E, N, r, generator=gen),
               torch.randn(T, N, generator=gen)]
    return [t.to(DEVICE).requires_grad_() for t in tensors]


@pytest.mark.parametrize("shared,mode,inplace", [(False, "cuma", False), (True, "cuma", False),
                                                 (False, "soft", False), (True, "soft", True), (False, "cuma", True)])
def test_compile_fullgraph_matches_eager(shared, mode, inplace):
    torch._dynamo.reset()
    eager_in = _inputs(shared)
    compiled_in = [t.detach().clone().requires_grad_() for t in eager_in]
    y = _layer(*eager_in, mode, inplace)
    y.square().sum().backward()
    compiled = torch.compile(_layer, backend="aot_eager", fullgraph=True)
    yc = compiled(*compiled_in, mode, inplace)
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
    # the expert forward mutates its output, so its autograd lives in a Function, outside the op
    x, A, B, base = (t.detach() for t in (x, A, B, base))
    torch.library.opcheck(torch.ops.cuma.lora_experts_fwd.default,
                          (x, A, B, idx, w, 0.5, torch.empty_like(base), base, False, None, None, None, "torch"))
    torch.library.opcheck(torch.ops.cuma.lora_experts_fwd.default,  # added into the base output in place
                          (x, A, B, idx, w, 0.5, base.detach().clone(), None, True, None, None, None, "torch"))
    from cuma_kernels.routed_cpu import pair_order
    order, offsets = pair_order(idx, B.shape[0])
    torch.library.opcheck(torch.ops.cuma.lora_experts_fwd.default,  # the routed form of the torch path
                          (x, A, B, idx, w, 0.5, torch.empty_like(base), base, False, order, offsets, None,
                           "torch_routed"))
    h = torch.ops.cuma.lora_experts_fwd(x, A, B, idx, w, 0.5, torch.empty_like(base), base, False, order, offsets,
                                        None, "torch_routed")
    torch.library.opcheck(torch.ops.cuma.lora_experts_bwd.default,
                          (torch.randn_like(base), x, A, B, idx, w, h, 0.5, order, offsets, None, "torch_routed"))


def _siblings(x, logits, A1, A2, B1, B2, base1, base2):
    """Two projections sharing a route and one shrink over [A1; A2], as CuMALinear runs them."""
    w, idx = route_topk(logits, 2)
    dispatch = dispatch_metadata(idx, B1.shape[0])
    h = lora_shrink(x, torch.cat([A1, A2], dim=1), idx, B1.shape[0], dispatch)
    h1, h2 = torch.split(h, [A1.shape[1], A2.shape[1]], dim=1)
    return (lora_expand(h1, B1, idx, w, 0.5, base1 * 1.0, dispatch, inplace=True),
            lora_expand(h2, B2, idx, w, 0.5, base2, dispatch))


@pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the shared-shrink ops are Triton-only: on CPU they need TRITON_INTERPRET=1")
@pytest.mark.parametrize("shared", [False, True])
def test_shared_shrink_ops_compile_fullgraph_and_pass_opcheck(monkeypatch, shared):
    monkeypatch.setenv("CUMA_BACKEND", "triton")
    torch._dynamo.reset()
    x, logits, A1, B1, base1 = _inputs(shared)
    _, _, A2, B2, base2 = _inputs(shared, seed=1)
    eager_in = [x, logits, A1, A2, B1, B2[:, :7].detach().clone().requires_grad_(),
                base1, base2[:, :7].detach().clone().requires_grad_()]
    compiled_in = [t.detach().clone().requires_grad_() for t in eager_in]
    ys = _siblings(*eager_in)
    sum(y.square().sum() for y in ys).backward()
    ycs = torch.compile(_siblings, backend="aot_eager", fullgraph=True)(*compiled_in)
    sum(y.square().sum() for y in ycs).backward()
    for a, b in zip(ycs, ys):
        torch.testing.assert_close(a, b)
    for a, b in zip(compiled_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad)
    if shared:
        return  # shared A: the shrink is one plain GEMM, no custom op
    w, idx = route_topk(logits.detach(), 2)
    d = dispatch_metadata(idx, B1.shape[0])
    xd, A1d, B1d = (t.detach() for t in (x, A1, B1))
    torch.library.opcheck(torch.ops.cuma.lora_shrink.default, (xd, A1d, idx, d.sort_order, d.offsets, d.token_order))
    h = torch.ops.cuma.lora_shrink(xd, A1d, idx, d.sort_order, d.offsets, d.token_order)
    torch.library.opcheck(torch.ops.cuma.lora_shrink_bwd.default,
                          (torch.randn_like(h), xd, A1d, idx, d.sort_order, d.offsets, d.token_order))
    base = base1.detach()
    torch.library.opcheck(torch.ops.cuma.lora_expand_fwd.default,
                          (h, B1d, idx, w, 0.5, torch.empty_like(base), base, False, d.token_order))
    torch.library.opcheck(torch.ops.cuma.lora_expand_fwd.default,  # added into the base output in place
                          (h, B1d, idx, w, 0.5, base.clone(), None, True, d.token_order))
    torch.library.opcheck(torch.ops.cuma.lora_expand_bwd.default,
                          (torch.randn_like(base1), h, B1d, idx, w, 0.5, d.sort_order, d.offsets, d.token_order))


# ---- Compiling the kernels for a Hopper GPU without one ------------------------------------------------------
# The interpreter accepts programs a GPU compiler rejects (mixed dot operand types, tiles under 16, ...), so the
# kernels are also compiled to a cubin for sm_90 here, in a child process without TRITON_INTERPRET, where
# `tune_configs` returns every autotune config: each one is compiled (bf16), the flag variants on one config, and
# one variant of each kernel in fp16 and fp32. `python tests/test_ops_compile.py --all` compiles every config in
# every variant.


def _lora_kernel_specs(dt):
    """(kernel, pointer types, float args, fixed constexprs) of every grouped-LoRA kernel, for dtype dt."""
    from cuma_kernels import grouped_lora as g

    flags = dict(UPCAST=False, IEEE=dt == "fp32")
    specs = []
    orders = {"token_order_ptr": "*i64", "sort_order_ptr": "*i64"}
    for block_r, by_pairs in ((64, False), (16, True), (128, False)):
        specs.append((g._shrink_kernel, {"x_ptr": "*" + dt, "a_ptr": "*" + dt, "h_ptr": "*" + dt, "idx_ptr": "*i32",
                                         **orders}, (), dict(TOP_K=2, PAIR_MAJOR=by_pairs, BLOCK_R=block_r, **flags)))
    expand_ptrs = {"h_ptr": "*" + dt, "w_ptr": "*" + dt, "idx_ptr": "*i32", "gate_ptr": "*fp32",
                   "token_order_ptr": "*i64", "base_ptr": "*" + dt, "out_ptr": "*" + dt, "hsum_ptr": "*" + dt}
    for gated, shared, base, hsum, block_r in [(True, False, True, False, 64), (True, False, False, False, 16),
                                               (False, True, False, True, 128), (False, False, False, False, 64)]:
        specs.append((g._expand_kernel, expand_ptrs, ("scaling",),
                      dict(TOP_K=2, GATED=gated, SHARED_W=shared, HAS_BASE=base, STORE_HSUM=hsum, BLOCK_R=block_r,
                           **flags)))
    for block_r, by_pairs in ((64, False), (16, True), (128, True)):
        specs.append((g._dy_pass_kernel, {"dy_ptr": "*" + dt, "b_ptr": "*" + dt, "h_ptr": "*" + dt, "idx_ptr": "*i32",
                                          "gate_ptr": "*fp32", **orders, "dgate_ptr": "*fp32", "dhg_ptr": "*" + dt},
                      ("scaling",), dict(TOP_K=2, PAIR_MAJOR=by_pairs, BLOCK_R=block_r, **flags)))
    for gated, block_r in ((True, 64), (False, 128), (True, 16)):
        specs.append((g._segment_partial_kernel, {"x_ptr": "*" + dt, "h_ptr": "*" + dt, "gate_ptr": "*fp32",
                                                  "order_ptr": "*i64", "piece_start_ptr": "*i64",
                                                  "piece_end_ptr": "*i64", "part_ptr": "*fp32"}, ("scale",),
                      dict(TOP_K=2, GATED=gated, BLOCK_R=block_r, **flags)))
    specs.append((g._sum_pieces_kernel, {"part_ptr": "*fp32", "first_piece_ptr": "*i64", "out_ptr": "*" + dt}, (),
                  dict(BLOCK_R=64, BLOCK_C=64)))
    for gated, block_r, top_k, block_kr in ((True, 64, 2, 128), (False, 64, 2, 128), (True, 16, 3, 64)):
        specs.append((g._set_partial_kernel, {"x_ptr": "*" + dt, "h_ptr": "*" + dt, "gate_ptr": "*fp32",
                                              "ranked_slot_ptr": "*i32", "token_order_ptr": "*i64",
                                              "piece_start_ptr": "*i64", "piece_end_ptr": "*i64", "part_ptr": "*fp32"},
                      ("scale",), dict(TOP_K=top_k, GATED=gated, BLOCK_R=block_r, BLOCK_KR=block_kr, **flags)))
    specs.append((g._sum_set_pieces_kernel, {"part_ptr": "*fp32", "entries_ptr": "*i64", "first_ptr": "*i64",
                                             "out_ptr": "*" + dt}, (), dict(TOP_K=2, BLOCK_R=64, BLOCK_KR=128,
                                                                           BLOCK_C=64)))
    return specs


def _compile_kernels_for_sm90(all_variants: bool) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cuma_kernels import routing

    target = GPUTarget("cuda", 90, 32)
    compiled = 0

    def compile_one(fn, pointers, floats, constexprs, num_warps=4, num_stages=3):
        nonlocal compiled
        sig = {name: "constexpr" if name in constexprs else pointers.get(name, "fp32" if name in floats else "i32")
               for name in fn.arg_names}
        triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=target,
                       options={"num_warps": num_warps, "num_stages": num_stages})
        compiled += 1

    for dt in ("bf16", "fp16", "fp32"):
        everything = all_variants or dt == "bf16"
        for k, block_e, block_k in [(2, 8, 2), (1, 2, 2), (8, 64, 8)][:3 if everything else 1]:
            compile_one(routing._route_topk_kernel, {"logits_ptr": "*" + dt, "weights_ptr": "*fp32",
                                                     "idx_ptr": "*i32"},
                        (), dict(TOP_K=k, MODE=0, BLOCK_T=64, BLOCK_E=block_e, BLOCK_K=block_k))
        seen = set()
        for kernel, pointers, floats, fixed in _lora_kernel_specs(dt):
            if not everything and kernel in seen:
                continue  # other dtypes: one variant per kernel
            configs = kernel.configs if isinstance(kernel, triton.runtime.Autotuner) else [None]
            if kernel not in seen and configs[0] is not None:
                assert len(configs) > 1, "the child process must see every autotune config"
            for cfg in (configs if all_variants or (everything and kernel not in seen) else configs[:1]):
                if cfg is None:
                    compile_one(kernel, pointers, floats, fixed)
                else:
                    compile_one(kernel.fn, pointers, floats, {**fixed, **cfg.kwargs}, cfg.num_warps, cfg.num_stages)
            seen.add(kernel)
    print(f"compiled {compiled} kernels for sm_90")


def test_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUMA_AUTOTUNE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])  # this checkout's kernels
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "kernels for sm_90" in proc.stdout, proc.stdout + proc.stderr


if __name__ == "__main__":
    _compile_kernels_for_sm90(all_variants="--all" in sys.argv)

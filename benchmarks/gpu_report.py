"""GPU report for the CuMA kernels: run the kernel tests on the GPU, then time the headline shapes.

    python benchmarks/gpu_report.py            # on a CUDA machine (H100/H200): tests + timings, a few minutes
    python benchmarks/gpu_report.py --smoke    # tiny shapes on CPU, torch backend: checks the script itself
    python benchmarks/gpu_report.py --cpu      # the CPU target shape (T=4096, K=N=1024, r=16, E=8, k=2, fp32)

Timed (bf16, T=16384, K=4096, N in {4096, 1024}, r=64, E=8, k=2), forward and forward+backward, the expert
computation alone (routing and its dispatch metadata are computed once, outside the timed region, as one router
serves several projections):
  cuma        cuma_kernels.lora_experts (Triton on CUDA)
  loop        the published per-(slot, expert) loop
  dense       the dense gated torch form (every expert's rank-r product, masked by the gates)
  grouped_mm  torch._grouped_mm over the tokens sorted by expert (when this torch build has it)
  base        the frozen base linear x @ W^T alone (backward: dx only)
"ratio" divides each time by the base linear's time in the same mode.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cuma_kernels import dispatch_metadata, lora_experts, route_topk  # noqa: E402
from cuma_kernels.reference import lora_experts_loop, lora_experts_torch  # noqa: E402

TEST_FILES = ["tests/test_routing_kernels.py", "tests/test_lora_expert_kernels.py", "tests/test_ops_compile.py"]


def run_gpu_tests() -> int:
    # one config per kernel: the tests compile many specialisations, autotuning each would take minutes
    env = dict(os.environ, CUMA_TEST_DEVICE="cuda", CUMA_AUTOTUNE="0")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", *TEST_FILES, "-q", "-p", "no:cacheprovider"]
    print("$ CUMA_TEST_DEVICE=cuda CUMA_AUTOTUNE=0 " + " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of fn() in milliseconds (synchronised around each call)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def grouped_mm_experts(x, lora_A, lora_B, topk_idx, topk_weights, scaling, dispatch):
    """Sorted-token baseline on torch._grouped_mm: gather, shrink, gate, expand, scatter-add back."""
    top_k = topk_idx.shape[1]
    order = dispatch.sort_order
    tok = order // top_k
    offs = dispatch.offsets[1:].to(torch.int32)
    xs = x.index_select(0, tok)
    h = torch._grouped_mm(xs, lora_A.transpose(1, 2), offs=offs)  # [T*k, r]
    h = h * topk_weights.reshape(-1).index_select(0, order)[:, None].to(h.dtype)
    ys = torch._grouped_mm(h, lora_B.transpose(1, 2), offs=offs)  # [T*k, N]
    out = torch.zeros(x.shape[0], lora_B.shape[1], dtype=ys.dtype, device=x.device)
    return out.index_add_(0, tok, ys, alpha=scaling)


def bench_shape(T, K, N, r, E, k, dtype, device, warmup, iters):
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(T, K, generator=gen).to(device, dtype).requires_grad_()
    W = (torch.randn(N, K, generator=gen) / K ** 0.5).to(device, dtype)
    A = (torch.randn(E, r, K, generator=gen) * 0.01).to(device, dtype).requires_grad_()
    B = (torch.randn(E, N, r, generator=gen) * 0.01).to(device, dtype).requires_grad_()
    logits = torch.randn(T, E, generator=gen).to(device)
    w, idx = route_topk(logits, k, "cuma")
    w = w.requires_grad_()
    dispatch = dispatch_metadata(idx, E)
    grad = torch.randn(T, N, generator=gen).to(device, dtype)
    scaling = 2.0

    providers = {
        "cuma": lambda: lora_experts(x, A, B, idx, w, scaling, None, dispatch=dispatch),
        "loop": lambda: lora_experts_loop(x, A, B, idx, w, scaling),
        "dense": lambda: lora_experts_torch(x, A, B, idx, w, scaling),
        "base": lambda: x @ W.t(),
    }
    if hasattr(torch, "_grouped_mm") and device.type == "cuda":
        providers["grouped_mm"] = lambda: grouped_mm_experts(x, A, B, idx, w, scaling, dispatch)

    rows = []
    for mode in ("fwd", "fwd+bwd"):
        for name, fn in providers.items():
            if mode == "fwd":
                def step(fn=fn):
                    with torch.no_grad():
                        fn()
            else:
                def step(fn=fn):
                    for t in (x, A, B, w):
                        t.grad = None
                    fn().backward(grad)
            try:
                ms = time_ms(step, device, warmup, iters)
            except Exception as exc:  # a baseline this build or card cannot run is reported, not fatal
                print(f"  {name} {mode}: unavailable ({type(exc).__name__}: {str(exc)[:120]})", flush=True)
                ms = float("nan")
            for t in (x, A, B, w):
                t.grad = None
            rows.append((name, mode, ms))
    base = {mode: ms for name, mode, ms in rows if name == "base"}
    return [(T, K, N, name, mode, ms, T / ms * 1e3, ms / base[mode]) for name, mode, ms in rows]


def print_table(rows, header):
    print(header)
    print(f"{'T':>6} {'K':>5} {'N':>5} {'provider':<11} {'mode':<8} {'ms':>9} {'tokens/s':>12} {'ratio':>7}")
    for T, K, N, name, mode, ms, tps, ratio in rows:
        print(f"{T:>6} {K:>5} {N:>5} {name:<11} {mode:<8} {ms:>9.3f} {tps:>12.0f} {ratio:>7.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU with the torch backend")
    parser.add_argument("--cpu", action="store_true", help="the CPU target shape, fp32, torch backend")
    parser.add_argument("--skip-tests", action="store_true", help="only the timings")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)

    if args.smoke:
        os.environ.setdefault("CUMA_BACKEND", "torch")
        device, dtype = torch.device("cpu"), torch.float32
        shapes = [(64, 48, n, 8, 4, 2) for n in (64, 32)]
        warmup, iters = 1, 2
        card = "CPU (smoke)"
    elif args.cpu:
        os.environ.setdefault("CUMA_BACKEND", "torch")
        device, dtype = torch.device("cpu"), torch.float32
        shapes = [(4096, 1024, 1024, 16, 8, 2)]
        warmup, iters = 1, args.iters
        card = f"CPU ({torch.get_num_threads()} threads)"
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke on CPU", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        shapes = [(16384, 4096, n, 64, 8, 2) for n in (4096, 1024)]
        warmup, iters = 3, args.iters
        card = torch.cuda.get_device_name(device)

    status = 0
    if not (args.smoke or args.cpu or args.skip_tests):
        status = run_gpu_tests()
        print(f"kernel tests on {card}: {'passed' if status == 0 else 'FAILED'}", flush=True)

    rows = []
    for T, K, N, r, E, k in shapes:
        rows += bench_shape(T, K, N, r, E, k, dtype, device, warmup, iters)
    print_table(rows, f"\n{card} | torch {torch.__version__} | {dtype} | r={shapes[0][3]} E={shapes[0][4]} "
                      f"k={shapes[0][5]} | backend {os.environ.get('CUMA_BACKEND', 'auto')}")
    return status


if __name__ == "__main__":
    sys.exit(main())

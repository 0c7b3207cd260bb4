"""The expert-computation target, measured interleaved: cuma_kernels.lora_experts vs the published loop and the rest.

    python benchmarks/targets.py [--repeats 7] [--threads 1] [--T 4096 --K 1024 --N 1024 --r 16 --E 8 --k 2]

pytest-benchmark times one row after another, so on a shared machine a burst of load can land on one row only.
This script runs every row once per round (A B C ... A B C ...), reports medians of wall-clock and of this process's
CPU time, and checks the CPU target: the expert computation forward+backward at T=4096, K=N=1024, r=16, E=8, k=2,
fp32 at least 8x faster than the published per-expert loop.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cuma_kernels  # noqa: E402
from baselines import grouped_mm_experts, grouped_mm_unsupported, peft_delta  # noqa: E402
from cuma_kernels.reference import lora_experts_loop, lora_experts_torch  # noqa: E402
from harness import Problem, Shape  # noqa: E402

TARGET_SPEEDUP = 8.0


def rows(p: Problem):
    """provider -> (forward(x, a, b, w) -> y); every row gets the same leaves and the same output gradient."""
    idx, s = p.topk_idx, p.scaling
    out = {
        "cuma": lambda x, a, b, w: cuma_kernels.lora_experts(x, a, b, idx, w, s),
        "loop": lambda x, a, b, w: lora_experts_loop(x, a, b, idx, w, s),
        "dense": lambda x, a, b, w: lora_experts_torch(x, a, b, idx, w, s),
        "grouped_mm": lambda x, a, b, w: grouped_mm_experts(x, a, b, idx, w, s),
        "peft": lambda x, a, b, w: peft_delta(p.peft, x),
        "base": lambda x, a, b, w: F.linear(x, p.weight),
    }
    if grouped_mm_unsupported(p.device.type, p.shape.torch_dtype):
        del out["grouped_mm"]
    return out


def one_call(p: Problem, forward, train: bool) -> tuple[float, float]:
    leaves = [t.detach().requires_grad_(train) for t in (p.x, p.lora_A, p.lora_B, p.topk_weights)]
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.set_grad_enabled(train):
        y = forward(*leaves)
    if train:
        y.backward(p.grad_y)
    if p.device.type == "cuda":
        torch.cuda.synchronize(p.device)
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads; default 1 on CPU (see e2e.py --help), torch's default on CUDA")
    for name, default in (("T", 4096), ("K", 1024), ("N", 1024), ("r", 16), ("E", 8), ("k", 2)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = Shape(args.T, args.K, args.N, args.r, args.E, args.k, args.dtype)
    p = Problem(shape, device)
    providers = rows(p)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{os.cpu_count()}-core {platform.machine().replace('_', '-')} CPU, no GPU")
    results = {}
    for mode in ("fwd", "fwd+bwd"):
        train = mode == "fwd+bwd"
        times = {name: [] for name in providers}
        for f in providers.values():
            one_call(p, f, train)
        for _ in range(args.repeats):
            for name, f in providers.items():
                times[name].append(one_call(p, f, train))
        results[mode] = {name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
                         for name, ts in times.items()}

    print(f"Expert computation {shape.id}: medians of {args.repeats} interleaved repeats; {machine}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'mode':8} {'row':11} {'wall ms':>9} {'loop / row':>10} {'row / base':>10} {'CPU ms':>9} "
          f"{'loop / row':>10} {'row / base':>10}")
    for mode, res in results.items():
        loop, base = res["loop"], res["base"]
        for name, (wall, cpu) in sorted(res.items(), key=lambda kv: kv[1][0]):
            print(f"{mode:8} {name:11} {wall * 1e3:9.1f} {loop[0] / wall:10.2f} {wall / base[0]:10.2f} "
                  f"{cpu * 1e3:9.1f} {loop[1] / cpu:10.2f} {cpu / base[1]:10.2f}")
    fb = results["fwd+bwd"]
    speedup = fb["loop"][0] / fb["cuma"][0]
    met = speedup >= TARGET_SPEEDUP
    print(f"\nTarget: lora_experts forward+backward >= {TARGET_SPEEDUP:g}x faster than the published loop: "
          f"{speedup:.1f}x wall ({fb['loop'][1] / fb['cuma'][1]:.1f}x CPU time) -> {'met' if met else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps(dict(
            machine=machine, torch=torch.__version__, threads=torch.get_num_threads(), shape=shape.id,
            repeats=args.repeats, medians_s={m: {n: dict(wall=v[0], cpu=v[1]) for n, v in r.items()}
                                             for m, r in results.items()},
            target=dict(speedup_wall=speedup, limit=TARGET_SPEEDUP, met=met)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

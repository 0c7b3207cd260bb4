"""Roofline model of one adapted projection: bytes and FLOPs of every launch, expected times on H100 and H200.

    python benchmarks/roofline.py            # markdown tables for the headline shapes (docs/benchmarks.md)

Each launch takes max(FLOPs / peak, bytes / bandwidth): a lower bound that assumes full overlap and peak
efficiency, so real kernels will be slower; the ratios to the base linear are the point. Bytes count each HBM
read and write once, with the access pattern of the kernels in cuma_kernels/grouped_lora.py (token-major kernels
read a row once, relying on L2 for the k rank programs of a tile; segment kernels gather a row once per pair).
The last table measures, on the CPU, how many rank-r slices the token-major kernels run per tile of tokens in
`token_order` for uniformly random routing: 1.0 means exactly the routed work. The expand and dx always pay it;
the shrink and the dy pass walk the expert-sorted pairs instead where it grows (`grouped_lora.pair_major`).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CARDS = {  # bf16 dense tensor-core FLOP/s, HBM bytes/s
    "H100 SXM": (990e12, 3.35e12),  # nominal peak
    "H200": (790e12, 4.8e12),  # dense bf16 matrix work as measured on the H200 (design.md)
}
BF16, FP32, IDX = 2, 4, 8


@dataclass(frozen=True)
class Launch:
    name: str
    phase: str  # "fwd" or "bwd"
    flops: float
    bytes: float
    part: str  # "base", "experts" or "glue"


def launches(T, K, N, r, E, k, pieces_per_expert_total=None) -> list[Launch]:
    """Every launch of the base linear plus the per-expert-A experts, forward and backward (bf16)."""
    P = T * k
    pieces = pieces_per_expert_total if pieces_per_expert_total is not None else 16 + E
    return [
        Launch("base linear x @ W^T", "fwd", 2 * T * K * N, BF16 * (T * K + N * K + T * N), "base"),
        Launch("shrink (token-major)", "fwd", 2 * P * r * K, BF16 * (T * K + E * r * K + P * r) + 4 * P + IDX * T,
               "experts"),
        Launch("expand, added into base in place", "fwd", 2 * P * r * N,
               BF16 * (P * r + E * N * r + 2 * T * N) + 8 * P + IDX * T, "experts"),
        Launch("base dx = dy @ W", "bwd", 2 * T * K * N, BF16 * (T * N + N * K + T * K), "base"),
        Launch("dy pass: dh, d gates, g*dh", "bwd", 2 * P * N * r, BF16 * (T * N + E * N * r + 2 * P * r) + 12 * P,
               "experts"),
        Launch("dB: segment partials + fixed-order sum", "bwd", 2 * P * N * r,
               BF16 * (P * N + P * r + E * N * r) + FP32 * 2 * pieces * N * r + 12 * P, "experts"),
        Launch("dx = expand of g*dh through A^T", "bwd", 2 * P * r * K, BF16 * (P * r + E * r * K + T * K) + 4 * P,
               "experts"),
        Launch("dA: segment partials + fixed-order sum", "bwd", 2 * P * K * r,
               BF16 * (P * K + P * r + E * r * K) + FP32 * 2 * pieces * K * r + 8 * P, "experts"),
        Launch("autograd: dx(base) + dx(experts)", "bwd", T * K, BF16 * 3 * T * K, "glue"),
    ]


def seconds(launch: Launch, card: str) -> float:
    flops, bandwidth = CARDS[card]
    return max(launch.flops / flops, launch.bytes / bandwidth)


def bound(launch: Launch, card: str) -> str:
    flops, bandwidth = CARDS[card]
    return "compute" if launch.flops / flops >= launch.bytes / bandwidth else "memory"


def launch_table(T, K, N, r, E, k) -> str:
    rows = launches(T, K, N, r, E, k)
    lines = [f"T={T}, K={K}, N={N}, r={r}, E={E}, k={k}, bf16, per-expert A:", "",
             "| launch | phase | GFLOP | MB | H100 us | H200 us | bound (H200) |", "|---|---|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x.name} | {x.phase} | {x.flops / 1e9:.1f} | {x.bytes / 1e6:.0f} | "
                     f"{seconds(x, 'H100 SXM') * 1e6:.0f} | {seconds(x, 'H200') * 1e6:.0f} | {bound(x, 'H200')} |")
    return "\n".join(lines)


def summary_table(shapes) -> str:
    lines = ["| shape | card | base fwd us | layer fwd us (x base) | base fwd+bwd us | layer fwd+bwd us (x base) |",
             "|---|---|---|---|---|---|"]
    for T, K, N, r, E, k in shapes:
        rows = launches(T, K, N, r, E, k)
        for card in CARDS:
            def total(phases, parts):
                return sum(seconds(x, card) for x in rows if x.phase in phases and x.part in parts) * 1e6
            base_f = total(("fwd",), ("base",))
            layer_f = total(("fwd",), ("base", "experts", "glue"))
            base_fb = total(("fwd", "bwd"), ("base",))
            layer_fb = total(("fwd", "bwd"), ("base", "experts", "glue"))
            lines.append(f"| N={N} | {card} | {base_f:.0f} | {layer_f:.0f} ({layer_f / base_f:.2f}) | {base_fb:.0f} | "
                         f"{layer_fb:.0f} ({layer_fb / base_fb:.2f}) |")
    return "\n".join(lines)


def slices_per_tile(T: int, E: int, k: int, block_t: int, seed: int = 0) -> list[float]:
    """Mean rank-r slices per tile for each rank q (1.0 = one expert per tile and rank), random routing."""
    from cuma_kernels import dispatch_metadata
    from cuma_kernels.reference import route_topk_torch

    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed))
    _, idx = route_topk_torch(logits, k)
    order = dispatch_metadata(idx, E).token_order
    ranked = torch.sort(idx.long(), dim=1).values[order]  # [T, k]: each token's experts by rank, in token order
    pad = (-T) % block_t
    tiles = torch.cat([ranked, ranked[-1:].expand(pad, k)]).view(-1, block_t, k)
    return [float(sum(len(torch.unique(t[:, q])) for t in tiles)) / tiles.shape[0] for q in range(k)]


def slices_table(T: int) -> str:
    from cuma_kernels.grouped_lora import pair_major

    lines = [f"T={T}, uniformly random routing, tokens in `token_order`:", "",
             "| E | k | tile | slices per tile, by rank | work / routed work | shrink and dy pass walk |",
             "|---|---|---|---|---|---|"]
    for E, k in ((8, 2), (16, 2), (16, 4), (64, 8)):
        walk = "sorted pairs" if pair_major(T, E, k) else "tokens"
        for block_t in (64, 128):
            per_rank = slices_per_tile(T, E, k, block_t)
            lines.append(f"| {E} | {k} | {block_t} | {', '.join(f'{v:.2f}' for v in per_rank)} | "
                         f"{sum(per_rank) / k:.2f} | {walk} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    args = parser.parse_args(argv)
    shapes = [(args.tokens, 4096, n, 64, 8, 2) for n in (4096, 1024)]
    for shape in shapes:
        print(launch_table(*shape), end="\n\n")
    print(summary_table(shapes), end="\n\n")
    print(slices_table(args.tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())

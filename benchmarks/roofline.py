"""Roofline model of one adapted projection: bytes and FLOPs of every launch, expected times on H100 and H200.

    python benchmarks/roofline.py            # markdown tables for the headline shapes (docs/benchmarks.md)

Each launch takes max(FLOPs / peak, bytes / bandwidth): a lower bound that assumes full overlap and peak
efficiency, so real kernels will be slower; the ratios to the base linear are the point. Bytes count each HBM
read and write once, with the access pattern of the kernels in cuma_kernels/grouped_lora.py (token-major kernels
read a row once, relying on L2 for the k rank programs of a tile; segment kernels gather a row once per pair).
The last table measures, on the CPU, how many rank-r slices the token-major kernels run per tile of tokens in
`token_order` for uniformly random routing: 1.0 means exactly the routed work. The expand and dx always pay it;
the shrink and the dy pass walk the expert-sorted pairs instead where it grows (`grouped_lora.pair_major`).

Two designs are modelled launch by launch: "v2" (`launches`: the base nn.Linear runs on its own, the experts add
into its output, autograd adds the base and the experts' dx; dA and dB per expert segment) and "v3"
(`launches_v3`: `linear_with_experts`, the base GEMMs add into the experts' outputs through their C operand, one
dx buffer, no autograd add; dA and dB per expert-set piece, each x and dy row read once). Rows marked "not built"
(`launches_v3_no_partials`) model a dA / dB without the fp32 partials' round trip; no kernel here does that.
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


def uniform_set_pieces(T, E, k, columns, seed=0) -> int:
    """Pieces `grouped_lora.set_pieces` makes for uniformly random routing (runs of one expert set, cut into chunks)."""
    from cuma_kernels import dispatch_metadata
    from cuma_kernels.grouped_lora import set_pieces
    from cuma_kernels.reference import route_topk_torch

    _, idx = route_topk_torch(torch.randn(T, E, generator=torch.Generator().manual_seed(seed)), k)
    pieces = set_pieces(idx, dispatch_metadata(idx, E).token_order, E, columns)
    return int((pieces.piece_start < T).sum())


def set_piece_launches(T, K, N, r, E, k, pieces, label="per expert-set piece", partials=True) -> dict[str, Launch]:
    """dB and dA per expert-set piece: each dy / x row read once, k fp32 [C, r] partials per piece written and read
    back by the fixed-order sum (none with partials=False)."""
    P = T * k
    part = FP32 * 2 * pieces * k * r if partials else 0
    return {
        "dB": Launch(f"dB: each dy row read once, {label}", "bwd", 2 * P * N * r,
                     BF16 * (T * N + P * r + E * N * r) + part * N + 12 * P + 4 * P, "experts"),
        "dA": Launch(f"dA: each x row read once, {label}", "bwd", 2 * P * K * r,
                     BF16 * (T * K + P * r + E * r * K) + part * K + 8 * P + 4 * P, "experts"),
    }


def launches_v3(T, K, N, r, E, k, pieces_per_expert_total=None, set_pieces_total=None) -> list[Launch]:
    """Every launch of `linear_with_experts` (the base linear owned by the op), forward and backward (bf16).

    The expand writes a fresh [T, N] buffer (no read of a base output) and the base GEMM adds x W^T into it as its
    C operand (cuBLAS beta=1: it reads C in its epilogue, T*N more bytes, still compute-bound); the experts' dx
    kernel writes the dx buffer and the base dx GEMM adds dy W into it the same way. dB and dA run per expert-set
    piece where `grouped_lora.reads_once` picks it (the headline shapes), with the pieces uniform routing makes;
    elsewhere per expert segment, as in v2. The shrink and the dy pass are v2's. A frozen bias is read by the
    expand (N elements: not counted).
    """
    from cuma_kernels.grouped_lora import reads_once

    v2 = {x.name: x for x in launches(T, K, N, r, E, k, pieces_per_expert_total)}
    P = T * k
    dB, dA = v2["dB: segment partials + fixed-order sum"], v2["dA: segment partials + fixed-order sum"]
    if reads_once(T, max(N, K), r, E, k, torch.device("cpu")):
        pieces = set_pieces_total if set_pieces_total is not None else uniform_set_pieces(T, E, k, max(N, K))
        by_set = set_piece_launches(T, K, N, r, E, k, pieces)
        dB, dA = by_set["dB"], by_set["dA"]
    return [
        Launch("base x @ W^T, added into the expert output (C operand)", "fwd", 2 * T * K * N,
               BF16 * (T * K + N * K + 2 * T * N), "base"),
        v2["shrink (token-major)"],
        Launch("expand into a fresh buffer", "fwd", 2 * P * r * N, BF16 * (P * r + E * N * r + T * N) + 8 * P + IDX * T,
               "experts"),
        Launch("base dx = dy @ W, added into the experts' dx (C operand)", "bwd", 2 * T * K * N,
               BF16 * (T * N + N * K + 2 * T * K), "base"),
        v2["dy pass: dh, d gates, g*dh"],
        dB,
        Launch("experts' dx = expand of g*dh through A^T, into the dx buffer", "bwd", 2 * P * r * K,
               BF16 * (P * r + E * r * K + T * K) + 4 * P, "experts"),
        dA,
    ]


def launches_v3_no_partials(T, K, N, r, E, k) -> list[Launch]:
    """NOT BUILT: v3 whose dA and dB also keep their sums on chip (no fp32 partial written and read back): the floor
    of this design; a deterministic kernel would need an in-order reduction across programs, which none here does."""
    by_set = set_piece_launches(T, K, N, r, E, k, 0, "no fp32 partials (not built)", partials=False)
    return [by_set[x.name[:2]] if x.name.startswith(("dA", "dB")) else x for x in launches_v3(T, K, N, r, E, k)]


def experts_op_launches(T, K, N, r, E, k, pieces_per_expert_total=None, set_pieces_total=None) -> list[Launch]:
    """The launches of the base linear plus `lora_experts` (the op the GPU report times): v2's, with dB and dA in
    the form `grouped_lora.reads_once` picks for these shapes."""
    from cuma_kernels.grouped_lora import reads_once

    rows = launches(T, K, N, r, E, k, pieces_per_expert_total)
    if not reads_once(T, max(N, K), r, E, k, torch.device("cpu")):
        return rows
    pieces = set_pieces_total if set_pieces_total is not None else uniform_set_pieces(T, E, k, max(N, K))
    by_set = set_piece_launches(T, K, N, r, E, k, pieces)
    return [by_set[x.name[:2]] if x.name.startswith(("dA", "dB")) else x for x in rows]


DESIGNS = {  # name -> (launches function, built)
    "v2": (launches, True),
    "v3": (launches_v3, True),
    "v3, dA/dB without partials (not built)": (launches_v3_no_partials, False),
}


def overhead(rows: list[Launch], base_rows: list[Launch], card: str, phases=("fwd", "bwd")) -> tuple[float, float]:
    """(layer us, layer / base): every launch of `rows` in `phases` against the plain base linear's launches."""
    layer = sum(seconds(x, card) for x in rows if x.phase in phases) * 1e6
    base = sum(seconds(x, card) for x in base_rows if x.phase in phases and x.part == "base") * 1e6
    return layer, layer / base


def design_table(shapes) -> str:
    lines = ["| shape | card | base fwd / fwd+bwd us | " + " | ".join(f"{d}: fwd / fwd+bwd us (x base)" for d in DESIGNS)
             + " |", "|---|---|---|" + "---|" * len(DESIGNS)]
    for T, K, N, r, E, k in shapes:
        base_rows = launches(T, K, N, r, E, k)
        for card in CARDS:
            base = [sum(seconds(x, card) for x in base_rows if x.part == "base" and x.phase in phases) * 1e6
                    for phases in (("fwd",), ("fwd", "bwd"))]
            cells = []
            for fn, _ in DESIGNS.values():
                rows = fn(T, K, N, r, E, k)
                (f_us, f_x), (fb_us, fb_x) = (overhead(rows, base_rows, card, ph) for ph in (("fwd",), ("fwd", "bwd")))
                cells.append(f"{f_us:.0f} ({f_x:.2f}) / {fb_us:.0f} ({fb_x:.2f})")
            lines.append(f"| N={N} | {card} | {base[0]:.0f} / {base[1]:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The Triton kernels behind each experts' launch of `launches`, as (kernel, occurrence) in the order one forward +
# backward of `lora_experts` runs them: the expand kernel serves the forward expand and dx, the segment kernels dB
# (first: the dy side runs before the x side) and dA. The base and glue launches are timed by the report itself.
KERNELS = {
    "shrink (token-major)": (("_shrink_kernel", 0),),
    "expand, added into base in place": (("_expand_kernel", 0),),
    "dy pass: dh, d gates, g*dh": (("_dy_pass_kernel", 0),),
    "dB: segment partials + fixed-order sum": (("_segment_partial_kernel", 0), ("_sum_pieces_kernel", 0)),
    "dx = expand of g*dh through A^T": (("_expand_kernel", 1),),
    "dA: segment partials + fixed-order sum": (("_segment_partial_kernel", 1), ("_sum_pieces_kernel", 1)),
    "dB: each dy row read once, per expert-set piece": (("_set_partial_kernel", 0), ("_sum_set_pieces_kernel", 0)),
    "dA: each x row read once, per expert-set piece": (("_set_partial_kernel", 1), ("_sum_set_pieces_kernel", 1)),
}


def measured_per_launch(spans: list[tuple[str, float]]) -> dict[str, float]:
    """Timed spans [(kernel or launch name, us)] in launch order -> {launch name of `launches`: us}.

    Kernels are matched to launches through KERNELS by occurrence; a span already named after a launch (the base
    GEMMs, the glue add) is taken as it is. A launch with a missing kernel is left out, never guessed."""
    seen: dict[str, list[float]] = {}
    for name, us in spans:
        seen.setdefault(name, []).append(us)
    out = {name: times[0] for name, times in seen.items() if name not in {k for ks in KERNELS.values() for k, _ in ks}}
    for launch, parts in KERNELS.items():
        if all(len(seen.get(kernel, ())) > i for kernel, i in parts):
            out[launch] = sum(seen[kernel][i] for kernel, i in parts)
    return out


def seconds(launch: Launch, card: str) -> float:
    flops, bandwidth = CARDS[card]
    return max(launch.flops / flops, launch.bytes / bandwidth)


def bound(launch: Launch, card: str) -> str:
    flops, bandwidth = CARDS[card]
    return "compute" if launch.flops / flops >= launch.bytes / bandwidth else "memory"


def launch_table(T, K, N, r, E, k, design="v2") -> str:
    rows = DESIGNS[design][0](T, K, N, r, E, k)
    lines = [f"{design}: T={T}, K={K}, N={N}, r={r}, E={E}, k={k}, bf16, per-expert A:", "",
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


def shrink_side_launches(T, K, r, E, k, siblings, shared, pieces_per_expert_total=None) -> list[Launch]:
    """The K-side launches (shrink, dx, dA, dx adds) of `siblings` projections routed alike on one x (bf16).

    shared=False: each projection runs its own shrink, dx and dA, and autograd adds 2*siblings dx terms (one base and
    one expert term per projection). shared=True: one shrink over the A's concatenated along r (R = siblings * r),
    one dx and one dA in ceil(R / 128) rank chunks (the first dx chunk writes dx, the others add into it), the
    concatenation of the A's and of the siblings' dh, and siblings + 1 dx terms.
    """
    from cuma_kernels.grouped_lora import MAX_RANK_BLOCK

    P = T * k
    pieces = pieces_per_expert_total if pieces_per_expert_total is not None else 16 + E
    if not shared:
        one = [x for x in launches(T, K, 0, r, E, k, pieces) if x.name.startswith(("shrink", "dx =", "dA"))]
        adds = Launch("autograd: dx adds", "bwd", (2 * siblings - 1) * T * K, BF16 * 3 * (2 * siblings - 1) * T * K,
                      "glue")
        return [Launch(f"{x.name} x{siblings}", x.phase, siblings * x.flops, siblings * x.bytes, x.part)
                for x in one] + [adds]
    R = siblings * r
    chunks = -(-R // MAX_RANK_BLOCK)
    return [
        Launch("concatenate the A's", "fwd", 0, BF16 * 2 * E * R * K, "glue"),
        Launch("shared shrink over [A_1; ...; A_s]", "fwd", 2 * P * R * K,
               BF16 * (T * K + E * R * K + P * R) + 4 * P + IDX * T, "experts"),
        Launch("concatenate the siblings' dh", "bwd", 0, BF16 * 2 * P * R, "glue"),
        Launch(f"dx = expand of dh through A^T ({chunks} rank chunk{'s' * (chunks > 1)})", "bwd", 2 * P * R * K,
               BF16 * (P * R + E * R * K + (2 * chunks - 1) * T * K) + 4 * P * chunks, "experts"),
        Launch(f"dA: segment partials + sum ({chunks} rank chunk{'s' * (chunks > 1)})", "bwd", 2 * P * K * R,
               BF16 * (chunks * P * K + P * R + E * R * K) + FP32 * 2 * pieces * K * R + 8 * P * chunks, "experts"),
        Launch("autograd: dx adds", "bwd", siblings * T * K, BF16 * 3 * siblings * T * K, "glue"),
    ]


def owned_side_launches(T, K, r, E, k, siblings) -> list[Launch]:
    """The K-side launches of `siblings` projections on one x that each own their base (v3, no shared shrink): a
    shrink, an experts' dx (written into the projection's dx buffer, which its base dx GEMM adds into: compute-bound,
    not counted here) and a dA each, and autograd adds the siblings' siblings - 1 dx terms."""
    rows = [x for x in launches_v3(T, K, 1, r, E, k) if x.name.startswith(("shrink", "experts' dx", "dA"))]
    adds = Launch("autograd: dx adds", "bwd", (siblings - 1) * T * K, BF16 * 3 * (siblings - 1) * T * K, "glue")
    return [Launch(f"{x.name} x{siblings}", x.phase, siblings * x.flops, siblings * x.bytes, x.part)
            for x in rows] + [adds]


def shared_shrink_table(T, K, r, E, k, siblings) -> str:
    lines = [f"T={T}, K={K}, r={r}, E={E}, k={k}, bf16, per-expert A, {siblings} projections on one x "
             "(the K side only: the expand side is unchanged):", "",
             "| path | K-side launch | phase | GFLOP | MB | H200 us |", "|---|---|---|---|---|---|"]
    totals = {}
    paths = {
        "per projection": lambda: shrink_side_launches(T, K, r, E, k, siblings, False),
        "shared": lambda: shrink_side_launches(T, K, r, E, k, siblings, True),
        "v3: base owned, per projection": lambda: owned_side_launches(T, K, r, E, k, siblings),
        # every sibling's base dx GEMM would add into the shared shrink's dx buffer: no dx adds left
        "shared, bases owned (not built)": lambda: [x for x in shrink_side_launches(T, K, r, E, k, siblings, True)
                                                    if x.part != "glue" or "adds" not in x.name],
    }
    for path, make in paths.items():
        rows = make()
        for x in rows:
            lines.append(f"| {path} | {x.name} | {x.phase} | {x.flops / 1e9:.1f} | {x.bytes / 1e6:.0f} | "
                         f"{seconds(x, 'H200') * 1e6:.0f} |")
        totals[path] = {ph: sum(seconds(x, "H200") for x in rows if x.phase == ph) * 1e6 for ph in ("fwd", "bwd")}
    lines.append("")
    lines.append("| path | fwd us (H200) | bwd us (H200) | fwd+bwd us (H200) |")
    lines.append("|---|---|---|---|")
    for path, t in totals.items():
        lines.append(f"| {path} | {t['fwd']:.0f} | {t['bwd']:.0f} | {t['fwd'] + t['bwd']:.0f} |")
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
    for design in DESIGNS:
        for shape in shapes:
            print(launch_table(*shape, design=design), end="\n\n")
    print(summary_table(shapes), end="\n\n")
    print(design_table(shapes), end="\n\n")
    for siblings in (3, 2):  # q/k/v, gate/up
        print(shared_shrink_table(args.tokens, 4096, 64, 8, 2, siblings), end="\n\n")
    print(slices_table(args.tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-kernel correctness for the GPU report: each Triton launch against an fp64 reference, with the worst row named.

Each kernel is checked on its own inputs (the reference of the expand takes the kernel's own h, that of dx and dA
the kernel's own g * dh), so an error points at one launch, not at the chain. Errors are elementwise: max |got -
ref| and that over max |ref|, with the row and expert where it is largest, so a few wrong rows cannot hide in a norm.
"""
from __future__ import annotations

import contextlib
import time

import torch

from report_plan import DTYPES, TOLERANCE, Case


# ------------------------------------------------------------------------------------------------ inputs


class Inputs:
    """x, A, B, routing, base output and output gradient of one case, in the case's dtype on `device`."""

    def __init__(self, case: Case, device: torch.device, seed: int = 0):
        from cuma_kernels import dispatch_metadata
        from cuma_kernels.reference import route_topk_torch

        c, dt = case, DTYPES[case.dtype]
        gen = torch.Generator().manual_seed(seed)
        R = c.r * c.siblings
        self.case, self.scaling = c, 2.0
        self.x = torch.randn(c.T, c.K, generator=gen).to(device, dt)
        self.A = (torch.randn(1 if c.shared_A else c.E, R, c.K, generator=gen) / c.K ** 0.5).to(device, dt)
        self.B = [(torch.randn(c.E, c.N, c.r, generator=gen) / c.r ** 0.5).to(device, dt) for _ in range(c.siblings)]
        logits = torch.randn(c.T, c.E, generator=gen)
        if c.pattern == "skewed":
            logits[:, 0] += 100.0
        elif c.pattern == "empty":
            logits[:, -1] = -1e4
        elif c.pattern != "random":
            raise ValueError(f"unknown routing pattern {c.pattern!r}: use random, skewed or empty")
        w, idx = route_topk_torch(logits, c.k)
        self.idx, self.w = idx.to(device), w.to(device)
        self.dispatch = dispatch_metadata(self.idx, c.E)
        self.base = torch.randn(c.T, c.N, generator=gen).to(device, dt)
        self.dy = [torch.randn(c.T, c.N, generator=gen).to(device, dt) for _ in range(c.siblings)]


@contextlib.contextmanager
def walk(order: str):
    """Force the shrink and the dy pass to walk tokens or expert-sorted pairs ("auto": the rule decides)."""
    from cuma_kernels import grouped_lora

    saved = grouped_lora.TOKENS_PER_EXPERT_SET
    if order != "auto":
        grouped_lora.TOKENS_PER_EXPERT_SET = 0 if order == "tokens" else 10 ** 9
    try:
        yield
    finally:
        grouped_lora.TOKENS_PER_EXPERT_SET = saved


# --------------------------------------------------------------------------------------------- reference


def _pairs(idx: torch.Tensor):
    """(token of each pair [P], expert of each pair [P], {expert: its pair indices}) for topk_idx [T, k]."""
    k = idx.shape[1]
    experts = idx.reshape(-1).long()
    tokens = torch.arange(experts.numel(), device=idx.device) // k
    groups = {int(e): (experts == e).nonzero().squeeze(1) for e in torch.unique(experts).tolist()}
    return tokens, experts, groups


def reference(p: Inputs, B: torch.Tensor, dy: torch.Tensor, h_k: torch.Tensor, dhg_k: torch.Tensor) -> dict:
    """fp64 results of each launch, expert by expert over the routed pairs (no [P, r, K] gather, so it fits at
    the headline shapes). h_k and dhg_k: the kernels' own h and g * dh, the inputs of the later launches."""
    f = torch.float64
    x, A, B, dy = p.x.to(f), p.A.to(f), B.to(f), dy.to(f)
    T, K = x.shape
    E, N, r = B.shape
    tokens, experts, groups = _pairs(p.idx)
    g = p.w.reshape(-1).to(f)
    P = tokens.numel()
    h_pairs = h_k.to(f) if h_k.shape[0] == P else h_k.to(f)[tokens]  # shared A: the token's h for every slot
    dhg_in = dhg_k.to(f)
    out = {"h": x @ A[0].t() if A.shape[0] == 1 else x.new_zeros(P, r),
           "y - base": x.new_zeros(T, N), "dy pass (g*dh)": x.new_zeros(P, r), "gate gradient": x.new_zeros(P),
           "dx": x.new_zeros(T, K), "dA": torch.zeros_like(A), "dB": torch.zeros_like(B)}
    for e, rows in groups.items():
        t = tokens[rows]
        a = A[0] if A.shape[0] == 1 else A[e]
        if A.shape[0] > 1:
            out["h"][rows] = x[t] @ a.t()
        out["y - base"].index_add_(0, t, p.scaling * (g[rows, None] * h_pairs[rows]) @ B[e].t())
        dh = p.scaling * dy[t] @ B[e]
        out["gate gradient"][rows] = (dh * h_pairs[rows]).sum(1)
        out["dy pass (g*dh)"][rows] = g[rows, None] * dh
        out["dB"][e] = p.scaling * dy[t].t() @ (g[rows, None] * h_pairs[rows])
        out["dx"].index_add_(0, t, dhg_in[rows] @ a)
        out["dA"][0 if A.shape[0] == 1 else e] += dhg_in[rows].t() @ x[t]
    return out


# ----------------------------------------------------------------------------------------------- kernels


def run_kernels(p: Inputs) -> dict:
    """Every launch of one projection's forward and backward, as `lora_experts` composes them, plus the dy pass
    alone (its g * dh feeds dx and dA). Results in the kernels' dtypes."""
    from cuma_kernels import grouped_lora as gl

    c, md = p.case, p.dispatch
    B, dy = p.B[0], p.dy[0]
    idx = p.idx.to(torch.int32).contiguous()
    gates = p.w.float().contiguous()
    h = gl.lora_shrink(p.x, p.A, idx, md.token_order, md.sort_order)
    delta = torch.empty(c.T, c.N, dtype=p.x.dtype, device=p.x.device)
    gl.lora_expand(h, B, idx, gates, p.scaling, delta, md.token_order)
    y = p.base.clone()
    gl.lora_expand(h, B, idx, gates, p.scaling, y, md.token_order, accumulate=True)  # the layer's in-place add
    pieces = gl.segment_pieces(md.offsets, c.T * c.k, c.N)
    dhg, _, _ = gl._output_side_backward(dy, h, B, idx, gates, p.scaling, md.sort_order, md.token_order, pieces)
    dx, dA, dB, dgates = gl.lora_experts_triton_backward(dy, p.x, p.A, B, idx, p.w, h, p.scaling, md.sort_order,
                                                         md.offsets, md.token_order)
    return {"h": h, "y - base": delta, "y (added into base in place)": y, "dy pass (g*dh)": dhg,
            "gate gradient": dgates.reshape(-1), "dx": dx, "dA": dA, "dB": dB}


def run_shared_shrink(p: Inputs) -> tuple[dict, dict]:
    """Projections on one x through one shrink over their concatenated A's (the q/k/v path), through autograd;
    against an fp64 chain (reference h, then each expand and the summed backward)."""
    from cuma_kernels import lora_expand, lora_shrink

    c, r = p.case, p.case.r
    x, A = p.x.detach().requires_grad_(), p.A.detach().requires_grad_()
    Bs = [b.detach().requires_grad_() for b in p.B]
    h = lora_shrink(x, A, p.idx, c.E, p.dispatch)
    ys = [lora_expand(h[:, i * r:(i + 1) * r], b, p.idx, p.w, p.scaling, dispatch=p.dispatch)
          for i, b in enumerate(Bs)]
    torch.autograd.backward(ys, p.dy)
    got = {"h": h.detach(), **{f"y{i} - base": y.detach() for i, y in enumerate(ys)}, "dx": x.grad, "dA": A.grad,
           **{f"dB{i}": b.grad for i, b in enumerate(Bs)}}

    f = torch.float64
    ref_x, ref_A = p.x.to(f).requires_grad_(), p.A.to(f).requires_grad_()
    ref_B = [b.to(f).requires_grad_() for b in p.B]
    tokens, experts, groups = _pairs(p.idx)
    g = p.w.reshape(-1).to(f)
    ref_h = torch.zeros(tokens.numel(), A.shape[1], dtype=f, device=x.device)
    for e, rows in groups.items():
        ref_h = ref_h.index_put((rows,), ref_x[tokens[rows]] @ ref_A[e].t())
    ref_ys = []
    for i, b in enumerate(ref_B):
        hi = ref_h[:, i * r:(i + 1) * r] * g[:, None]
        y = torch.zeros(c.T, c.N, dtype=f, device=x.device)
        for e, rows in groups.items():
            y = y.index_add(0, tokens[rows], p.scaling * hi[rows] @ b[e].t())
        ref_ys.append(y)
    torch.autograd.backward(ref_ys, [d.to(f) for d in p.dy])
    ref = {"h": ref_h.detach(), **{f"y{i} - base": y.detach() for i, y in enumerate(ref_ys)}, "dx": ref_x.grad,
           "dA": ref_A.grad, **{f"dB{i}": b.grad for i, b in enumerate(ref_B)}}
    return got, ref


# ---------------------------------------------------------------------------------------------- compare


def worst_place(name: str, row: int, p: Inputs) -> str:
    """Which token / pair / expert a row of a result is, for the report."""
    T, k = p.idx.shape
    if name.startswith(("dA", "dB")):
        return f"expert {row}" + (" (the shared A)" if name == "dA" and p.A.shape[0] == 1 else "")
    if name in ("dy pass (g*dh)", "gate gradient") or (name == "h" and p.A.shape[0] > 1):
        t, j = divmod(row, k)
        return f"token {t} slot {j} (expert {int(p.idx[t, j])})"
    return f"token {row} (experts {', '.join(str(int(e)) for e in p.idx[row])})" if row < T else f"row {row}"


def compare(name: str, got: torch.Tensor, ref: torch.Tensor, p: Inputs, tolerance: float) -> dict:
    """max |got - ref|, that over max |ref|, the place of the worst element, and whether it is within tolerance.
    A NaN or inf anywhere counts as an infinite error at its first row."""
    got, ref = got.detach().to(torch.float64), ref.detach().to(torch.float64)
    if got.shape != ref.shape:
        return {"ok": False, "error": f"shape {tuple(got.shape)}, expected {tuple(ref.shape)}"}
    if got.numel() == 0:
        return {"ok": True, "max_abs": 0.0, "max_rel": 0.0, "tolerance": tolerance, "worst": "empty"}
    diff = (got - ref).abs().reshape(got.shape[0], -1)
    bad = ~torch.isfinite(got).reshape(got.shape[0], -1)
    if bad.any():
        row, max_abs = int(bad.any(1).nonzero()[0]), float("inf")
    else:
        row, max_abs = int(diff.amax(1).argmax()), float(diff.max())
    scale = float(ref.abs().max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return {"ok": max_rel <= tolerance, "max_abs": max_abs, "max_rel": max_rel, "tolerance": tolerance,
            "worst": worst_place(name, row, p)}


def check_case(case: Case, device: torch.device, seed: int = 0) -> dict:
    """One case's per-kernel comparison: {"case", "checks": {result: compare(...)}, "ok", "seconds"}."""
    t0 = time.perf_counter()
    p = Inputs(case, device, seed)
    tolerance = TOLERANCE[case.dtype]
    with walk(case.walk):
        if case.siblings > 1:
            got, ref = run_shared_shrink(p)
            tolerance *= 2  # a chain: each result also carries the rounding of h and dh in the case's dtype
        else:
            got = run_kernels(p)
            ref = reference(p, p.B[0], p.dy[0], got["h"], got["dy pass (g*dh)"])
            ref["y (added into base in place)"] = p.base.to(torch.float64) + ref["y - base"]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    checks = {name: compare(name, got[name], ref[name], p, tolerance) for name in got}
    return {"case": case.name, "checks": checks, "ok": all(c["ok"] for c in checks.values()),
            "seconds": time.perf_counter() - t0}


def summary_line(row: dict) -> str:
    fails = [f"{n} {c.get('max_rel', float('nan')):.1e} at {c.get('worst', c.get('error'))}"
             for n, c in row["checks"].items() if not c["ok"]]
    worst = max((c.get("max_rel", 0.0) for c in row["checks"].values()), default=0.0)
    return f"  {row['case']}: " + ("ok" if row["ok"] else "FAIL " + "; ".join(fails)) + \
        f" (worst max-rel {worst:.1e}, {row['seconds']:.1f} s)"

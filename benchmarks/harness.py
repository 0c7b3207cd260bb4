"""Shapes, inputs, timing and the ratio table shared by the CuMA microbenchmarks (see conftest.py)."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Shape:
    T: int
    K: int
    N: int
    r: int
    E: int
    k: int
    dtype: str = "fp32"
    routing: str = "uniform"  # uniform | zipf | one (every token's first slot on expert 0) | half-empty

    @property
    def id(self) -> str:
        tail = "" if self.routing == "uniform" else f"-{self.routing}"
        return f"T{self.T}-K{self.K}-N{self.N}-r{self.r}-E{self.E}-k{self.k}-{self.dtype}{tail}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# The CPU target shape (docs/benchmarks.md): the expert computation at T=4096, K=N=1024, r=16, E=8, k=2, fp32.
CPU_DEFAULT = [Shape(4096, 1024, 1024, 16, 8, 2)]
CPU_SWEEP = (
    [Shape(2048, 1024, 1024, r, 8, 2) for r in (8, 32, 64)]
    + [Shape(2048, 1024, 1024, 16, e, k) for e, k in ((4, 1), (16, 2), (16, 4))]
    + [Shape(2048, 1024, 1024, 16, 8, 2, routing=s) for s in ("zipf", "one", "half-empty")]
)
# design.md "Benchmark shapes": the headline (q_proj and v_proj of an 8B model) and the sweeps.
GPU_DEFAULT = [Shape(16384, 4096, 4096, 64, 8, 2, "bf16"), Shape(16384, 4096, 1024, 64, 8, 2, "bf16")]
GPU_SWEEP = (
    [Shape(t, 4096, 4096, 64, 8, 2, "bf16") for t in (2048, 4096, 8192, 32768)]
    + [Shape(16384, 4096, 4096, r, 8, 2, "bf16") for r in (8, 16, 32, 128)]
    + [Shape(16384, 4096, 4096, 64, e, k, "bf16") for e in (4, 8, 16) for k in (1, 2, 4) if (e, k) != (8, 2)]
    + [Shape(16384, 4096, 4096, 64, 8, 2, "bf16", routing=s) for s in ("zipf", "one", "half-empty")]
    + [Shape(16383, 4096, 4096, 64, 8, 2, "bf16")]  # ragged T
)


def shapes_for(device: torch.device, choice: str) -> list[Shape]:
    default, sweep = (GPU_DEFAULT, GPU_SWEEP) if device.type == "cuda" else (CPU_DEFAULT, CPU_SWEEP)
    return {"default": default, "sweep": sweep, "all": default + sweep}[choice]


def routing_logits(shape: Shape, device, seed: int = 0) -> torch.Tensor:
    """Router logits [T, E] (fp32) with the shape's routing pattern."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape.T, shape.E, generator=g)
    if shape.routing == "zipf":  # expert e is favoured in proportion to 1 / (e + 1)^1.2, sharpened
        logits = logits - 3.6 * torch.log(torch.arange(1, shape.E + 1, dtype=torch.float32))[None]
    elif shape.routing == "one":
        logits[:, 0] += 30.0
    elif shape.routing == "half-empty":
        logits[:, shape.E // 2:] -= 30.0
    elif shape.routing != "uniform":
        raise ValueError(f"unknown routing pattern {shape.routing!r}")
    return logits.to(device)


class Problem:
    """Every input the benchmarks of one shape need, built once per shape."""

    def __init__(self, shape: Shape, device: torch.device, seed: int = 0):
        import cuma_kernels

        from baselines import peft_linear

        g = torch.Generator().manual_seed(seed)
        dt = shape.torch_dtype
        T, K, N, r, E = shape.T, shape.K, shape.N, shape.r, shape.E

        def rnd(*s, scale=1.0):
            return (torch.randn(*s, generator=g) * scale).to(device, dt)

        self.shape, self.device, self.scaling = shape, device, 2.0
        self.x = rnd(T, K)
        self.weight = rnd(N, K, scale=K ** -0.5)
        self.lora_A = rnd(E, r, K, scale=K ** -0.5)
        self.lora_B = rnd(E, N, r, scale=r ** -0.5)
        self.logits = routing_logits(shape, device, seed)
        w, idx = cuma_kernels.route_topk(self.logits, shape.k)
        self.topk_weights, self.topk_idx = w.detach(), idx.detach()
        self.gates = torch.zeros(T, E, device=device).scatter_add(1, idx.long(), self.topk_weights)
        self.grad_y = rnd(T, N)
        self.grad_w = torch.randn(T, shape.k, generator=g).to(device)
        self.peft = peft_linear(self.weight, r, self.scaling, seed)


def leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    """A fresh leaf sharing t's storage (so .grad never accumulates across calls), requiring grad when asked."""
    return t.detach().requires_grad_(grad)


# ---------------------------------------------------------------------------------------------- measuring

RESULTS: list[dict] = []


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(benchmark, fn, *, op: str, mode: str, provider: str, problem: Problem, budget: float):
    """Time fn() with pytest-benchmark: one warm-up call, then as many rounds as fit `budget` seconds (3 to 200)."""
    device = problem.device
    benchmark.group = f"{op} {mode} | {problem.shape.id}"
    benchmark.extra_info.update(op=op, mode=mode, provider=provider, shape=asdict(problem.shape),
                                device=str(device), torch=torch.__version__)

    def call():
        fn()
        sync(device)

    call()
    t0 = time.perf_counter()
    call()
    once = max(time.perf_counter() - t0, 1e-6)
    iterations = max(1, math.ceil(2e-3 / once))  # at least ~2 ms per round, so timer resolution never matters
    rounds = int(min(200, max(3, budget / (once * iterations))))
    benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=0)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None:
        RESULTS.append(dict(op=op, mode=mode, provider=provider, shape=problem.shape.id, median_s=stats.median,
                            tokens_per_s=problem.shape.T / stats.median if stats.median else float("nan")))


# Each group's reference row: the published form of that operation.
REFERENCE = {"routing": "published"}
DEFAULT_REFERENCE = "loop"


def ratio_rows(results: list[dict] | None = None) -> list[dict]:
    """The results with speed-up over the group's published reference and time over the base linear."""
    rows, groups = [], {}
    for r in RESULTS if results is None else results:
        groups.setdefault((r["op"], r["mode"], r["shape"]), []).append(r)
    for (op, _, _), items in groups.items():
        ref_name = REFERENCE.get(op, DEFAULT_REFERENCE)
        times = {r["provider"]: r["median_s"] for r in items}
        ref, base = times.get(ref_name), times.get("base")
        for r in sorted(items, key=lambda r: r["median_s"]):
            rows.append(dict(r, reference=ref_name,
                             speedup_vs_reference=(ref / r["median_s"]) if ref else None,
                             time_vs_base=(r["median_s"] / base) if base else None))
    return rows

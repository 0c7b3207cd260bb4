"""GPU report for the CuMA kernels: the one script to run on a CUDA machine (about 8 minutes on one H100/H200).

    python benchmarks/gpu_report.py [--out DIR]          # CUDA: headline shapes, bf16, autotuning on
    python benchmarks/gpu_report.py --cpu [--out DIR]    # the same steps on tiny shapes on the CPU (a smoke test;
                                                         # Triton through its interpreter when TRITON_INTERPRET=1)

Steps, in order, each under its own time limit (a step past its limit is recorded as such and the report goes on;
steps left when --budget-s, default 480, is spent are skipped):
  1. correctness at the headline shapes (T=16384, K=4096, N=4096 and 1024, r=64, E=8, k=2, bf16; per-expert and
     shared A, added in place into the base output as the model layer does): y, dx, dA, dB and the gate gradient
     against the torch path in fp32; the first call's time (compile + autotune) is kept. A failure stops the report.
  2. timings, CUDA events, median / p10 / p90 of 30 calls, forward and forward+backward: base linear, whole layer
     (base + experts), experts alone, PEFT LoRA r=64 layer, the dense gated form in bf16, torch._grouped_mm on the
     sorted tokens, and the published loop (at N=4096 only).
  3. a sweep of the experts alone: E=16 r=128; every token's first slot on one expert; T=2048; T=8.
  4. one torch.profiler pass over the whole layer's forward+backward (top kernels by device time).
  5. the configs autotuning chose, per kernel and key.
  6. end-to-end training steps (forward + backward + AdamW) of random-weight Llama models of SmolLM2-135M and 8B
     shapes (a few layers), CuMA (E=8, k=2, r=64 on q_proj, v_proj) against PEFT LoRA r=64 on the same targets.
  7. with the time left, the kernel test files on the GPU (CUMA_TEST_DEVICE=cuda, one config per kernel).
Results: DIR/report.json and DIR/report.md (DIR defaults to gpu_report_<time>/ in the working directory).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


@dataclass(frozen=True)
class Shape:
    T: int
    K: int
    N: int
    r: int
    E: int
    k: int
    pattern: str = "random"  # or "one": every token's first slot on expert 0

    @property
    def name(self) -> str:
        tail = "" if self.pattern == "random" else f" {self.pattern}"
        return f"T={self.T} K={self.K} N={self.N} r={self.r} E={self.E} k={self.k}{tail}"


@dataclass(frozen=True)
class Plan:
    device: torch.device
    dtype: torch.dtype
    headline: tuple[Shape, ...]
    sweep: tuple[Shape, ...]
    warmup: int
    iters: int
    step_timeout_s: int
    models: tuple[tuple[str, dict], ...]
    batch: tuple[int, int]


def gpu_plan() -> Plan:
    head = tuple(Shape(16384, 4096, n, 64, 8, 2) for n in (4096, 1024))
    sweep = (Shape(16384, 4096, 4096, 128, 16, 2), Shape(16384, 4096, 4096, 64, 8, 2, "one"),
             Shape(2048, 4096, 4096, 64, 8, 2), Shape(8, 4096, 4096, 64, 8, 2))
    models = (("SmolLM2-135M shape, 6 layers", dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                                   num_key_value_heads=3, num_hidden_layers=6, vocab_size=49152)),
              ("8B shape, 2 layers", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                          num_key_value_heads=8, num_hidden_layers=2, vocab_size=128256)))
    return Plan(torch.device("cuda"), torch.bfloat16, head, sweep, 5, 30, 180, models, (4, 1024))


def cpu_plan() -> Plan:
    head = tuple(Shape(96, 64, n, 16, 8, 2) for n in (64, 32))
    sweep = (Shape(48, 32, 32, 32, 16, 2), Shape(48, 32, 32, 16, 8, 2, "one"), Shape(24, 32, 32, 16, 8, 2),
             Shape(8, 32, 32, 16, 8, 2))
    models = (("tiny Llama, 2 layers", dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                            num_key_value_heads=2, num_hidden_layers=2, vocab_size=128)),)
    return Plan(torch.device("cpu"), torch.float32, head, sweep, 0, 2, 120, models, (2, 16))


# ----------------------------------------------------------------------------------------------- helpers


class StepTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise StepTimeout in the main thread after `seconds` (checked whenever Python code runs)."""
    def on_alarm(signum, frame):
        raise StepTimeout(f"step ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int, iters: int) -> dict:
    """median / p10 / p90 milliseconds of fn() over `iters` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()

    def pct(p):
        return times[min(len(times) - 1, round(p * (len(times) - 1)))]

    return {"median_ms": statistics.median(times), "p10_ms": pct(0.1), "p90_ms": pct(0.9), "n": len(times)}


def make_routing(shape: Shape, device, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_idx [T, k] int32, router logits [T, E]) for the shape's routing pattern."""
    from cuma_kernels import route_topk

    logits = torch.randn(shape.T, shape.E, generator=gen)
    if shape.pattern == "one":
        logits[:, 0] += 100.0
    weights, idx = route_topk(logits.to(device), shape.k, "cuma")
    return idx, weights


class Problem:
    """Inputs of one adapted projection: x, the frozen W, experts A/B, routing, dispatch, an output gradient."""

    def __init__(self, shape: Shape, plan: Plan, shared_A: bool = False, seed: int = 0):
        from cuma_kernels import dispatch_metadata

        gen = torch.Generator().manual_seed(seed)
        s, dev, dt = shape, plan.device, plan.dtype
        self.shape, self.scaling = s, 2.0
        self.x = torch.randn(s.T, s.K, generator=gen).to(dev, dt)
        self.W = (torch.randn(s.N, s.K, generator=gen) / s.K ** 0.5).to(dev, dt)
        self.A = (torch.randn(1 if shared_A else s.E, s.r, s.K, generator=gen) / s.K ** 0.5).to(dev, dt)
        self.B = (torch.randn(s.E, s.N, s.r, generator=gen) / s.r ** 0.5).to(dev, dt)
        self.idx, self.w = make_routing(s, dev, gen)
        self.dispatch = dispatch_metadata(self.idx, s.E)
        self.grad = torch.randn(s.T, s.N, generator=gen).to(dev, dt)


def cuma_layer(p: Problem, x, A, B, w):
    """The model layer's computation: base linear, then the experts added into its output in place."""
    from cuma_kernels import lora_experts

    base = x @ p.W.t()
    return lora_experts(x, A, B, p.idx, w, p.scaling, base, dispatch=p.dispatch, inplace=True)


def dense_gated_bf16(x, A, B, idx, w, scaling):
    """The dense gated form in the input dtype (every expert for every token, masked by the [T, E] gates)."""
    E, N, r = B.shape
    gates = torch.zeros(x.shape[0], E, device=x.device, dtype=x.dtype).scatter_add(1, idx.long(), w.to(x.dtype))
    h = x @ A.reshape(E * r, -1).t()
    return (h * gates.repeat_interleave(r, dim=1)) @ (B.permute(1, 0, 2).reshape(N, E * r).t() * scaling)


# -------------------------------------------------------------------------------------------------- steps


def compare(got: dict, ref: dict) -> dict:
    """y: max|got - ref| / max|ref| (limit 1e-2); gradients: ||got - ref|| / ||ref|| (limit 1e-2)."""
    out = {}
    for name, r in ref.items():
        g = got[name].float()
        if name == "y":
            err = ((g - r).abs().max() / r.abs().max().clamp_min(1e-12)).item()
        else:
            err = ((g - r).norm() / r.norm().clamp_min(1e-12)).item()
        out[name] = {"error": err, "ok": err <= 1e-2}
    return out


def step_correctness(plan: Plan, report: dict) -> bool:
    from cuma_kernels.reference import lora_experts_torch

    rows, ok = [], True
    for shape in plan.headline:
        for shared in (False, True):
            p = Problem(shape, plan, shared_A=shared)
            leaves = [t.clone().requires_grad_() for t in (p.x, p.A, p.B, p.w)]
            sync(plan.device)
            t0 = time.perf_counter()
            y = cuma_layer(p, *leaves)
            y.backward(p.grad)
            sync(plan.device)
            first_call_s = time.perf_counter() - t0
            got = {"y": y.detach(), "dx": leaves[0].grad, "dA": leaves[1].grad, "dB": leaves[2].grad,
                   "d gates": leaves[3].grad}
            ref_leaves = [t.float().clone().requires_grad_() for t in (p.x, p.A, p.B, p.w)]
            base_ref = ref_leaves[0] @ p.W.float().t()
            y_ref = lora_experts_torch(*ref_leaves[:3], p.idx, ref_leaves[3], p.scaling, base_ref)
            y_ref.backward(p.grad.float())
            ref = {"y": y_ref.detach(), "dx": ref_leaves[0].grad, "dA": ref_leaves[1].grad,
                   "dB": ref_leaves[2].grad, "d gates": ref_leaves[3].grad}
            checks = compare(got, ref)
            ok = ok and all(c["ok"] for c in checks.values())
            rows.append({"shape": shape.name, "A": "shared" if shared else "per-expert", "checks": checks,
                         "first_call_s": first_call_s})
            print(f"  {shape.name} {'shared' if shared else 'per-expert'} A: "
                  + ", ".join(f"{n} {c['error']:.1e}{'' if c['ok'] else ' FAIL'}" for n, c in checks.items())
                  + f" (first call {first_call_s:.1f} s)", flush=True)
            del p, leaves, ref_leaves, got, ref, y, y_ref
    report["correctness"] = rows
    return ok


def providers(p: Problem, with_loop: bool) -> dict:
    from baselines import grouped_mm_experts, grouped_mm_unsupported, peft_delta, peft_linear, published_expert_loop
    from cuma_kernels import lora_experts

    s = p.shape
    x, A, B, w = (t.clone().requires_grad_() for t in (p.x, p.A, p.B, p.w))
    leaves = [x, A, B, w]
    peft = peft_linear(p.W, s.r, p.scaling)
    for prm in peft.parameters():
        if prm.requires_grad:
            leaves.append(prm)
    rows = {
        "base linear": lambda: x @ p.W.t(),
        "whole layer": lambda: cuma_layer(p, x, A, B, w),
        "experts alone": lambda: lora_experts(x, A, B, p.idx, w, p.scaling, dispatch=p.dispatch),
        "PEFT LoRA layer": lambda: peft(x),
        "PEFT adapter alone": lambda: peft_delta(peft, x),
        "dense gated (input dtype)": lambda: dense_gated_bf16(x, A, B, p.idx, w, p.scaling),
    }
    if grouped_mm_unsupported(p.x.device.type, p.x.dtype) is None:
        rows["torch._grouped_mm"] = lambda: grouped_mm_experts(x, A, B, p.idx, w, p.scaling)
    if with_loop:
        rows["published loop"] = lambda: published_expert_loop(x, A, B, p.idx, w, p.scaling)
    return rows, leaves


def time_providers(p: Problem, plan: Plan, rows: dict, leaves: list) -> list[dict]:
    out = []
    for mode in ("fwd", "fwd+bwd"):
        for name, fn in rows.items():
            def call(fn=fn):
                if mode == "fwd":
                    with torch.no_grad():
                        fn()
                else:
                    for t in leaves:
                        t.grad = None
                    fn().backward(p.grad)
            try:
                stats = time_ms(call, plan.device, plan.warmup, plan.iters)
            except StepTimeout:
                raise
            except Exception as exc:  # a baseline this build or card cannot run is reported, not fatal
                stats = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
            out.append({"shape": p.shape.name, "provider": name, "mode": mode, **stats})
    base = {r["mode"]: r.get("median_ms") for r in out if r["provider"] == "base linear"}
    for r in out:
        if "median_ms" in r and base.get(r["mode"]):
            r["x base"] = r["median_ms"] / base[r["mode"]]
            r["tokens_per_s"] = p.shape.T / r["median_ms"] * 1e3
    return out


def step_timings(plan: Plan, report: dict) -> None:
    rows = []
    for i, shape in enumerate(plan.headline):
        p = Problem(shape, plan)
        fns, leaves = providers(p, with_loop=i == 0)
        rows += time_providers(p, plan, fns, leaves)
        del p, fns, leaves
    report["timings"] = rows


def step_sweep(plan: Plan, report: dict) -> None:
    from cuma_kernels import lora_experts

    rows = []
    for shape in plan.sweep:
        p = Problem(shape, plan)
        x, A, B, w = (t.clone().requires_grad_() for t in (p.x, p.A, p.B, p.w))
        fns = {"base linear": lambda: x @ p.W.t(),
               "experts alone": lambda: lora_experts(x, A, B, p.idx, w, p.scaling, dispatch=p.dispatch)}
        rows += time_providers(p, plan, fns, [x, A, B, w])
        del p
    report["sweep"] = rows


def step_profile(plan: Plan, report: dict, out_dir: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    p = Problem(plan.headline[0], plan)
    x, A, B, w = (t.clone().requires_grad_() for t in (p.x, p.A, p.B, p.w))
    for _ in range(2):
        cuma_layer(p, x, A, B, w).backward(p.grad)
    sync(plan.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if plan.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        cuma_layer(p, x, A, B, w).backward(p.grad)
        sync(plan.device)
    sort = "device_time_total" if plan.device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=20)
    (out_dir / "profile.txt").write_text(table)
    report["profile"] = {"shape": p.shape.name, "file": "profile.txt", "sorted_by": sort}


def step_configs(report: dict) -> None:
    import triton

    from cuma_kernels import grouped_lora

    chosen = {}
    for name in dir(grouped_lora):
        kernel = getattr(grouped_lora, name)
        if isinstance(kernel, triton.runtime.Autotuner):
            chosen[name] = {str(key): str(cfg) for key, cfg in kernel.cache.items()}
    report["autotune_choices"] = chosen


def step_end_to_end(plan: Plan, report: dict) -> None:
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import cuma_model

    rows = []
    batch, seq = plan.batch
    for label, dims in plan.models:
        torch.manual_seed(0)
        config = LlamaConfig(max_position_embeddings=max(2048, seq), pad_token_id=0, **dims)
        with plan.device:  # initialise on the device: an 8B-shaped embedding is slow to fill on the host
            base = LlamaForCausalLM(config).to(plan.dtype)
        ids = torch.randint(3, dims["vocab_size"], (batch, seq), device=plan.device)
        z = torch.randn(batch, 64, device=plan.device, dtype=plan.dtype)
        results = {}
        for name in ("CuMA E=8 k=2 r=64", "PEFT LoRA r=64"):
            model = copy.deepcopy(base)
            if name.startswith("CuMA"):
                cuma_model.patch_model(model, num_experts=8, top_k=2, r=64, lora_alpha=128, demographic_dim=64,
                                       target_modules=["q_proj", "v_proj"])
                kwargs = {"demographic_embeds": z}
            else:
                model = get_peft_model(model, LoraConfig(r=64, lora_alpha=128, target_modules=["q_proj", "v_proj"],
                                                         lora_dropout=0.0))
                kwargs = {}
            model.train()
            params = [q for q in model.parameters() if q.requires_grad]
            optim = torch.optim.AdamW(params, lr=1e-5)

            def train_step(model=model, kwargs=kwargs, optim=optim):
                loss = model(input_ids=ids, labels=ids, **kwargs).loss
                loss.backward()
                optim.step()
                optim.zero_grad(set_to_none=True)

            if plan.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(plan.device)
            stats = time_ms(train_step, plan.device, min(2, plan.warmup), max(2, plan.iters // 3))
            if plan.device.type == "cuda":
                stats["peak_memory_GB"] = torch.cuda.max_memory_allocated(plan.device) / 1e9
            stats["trainable_params"] = sum(q.numel() for q in params)
            results[name] = stats
            del model, optim, params
        peft_ms = results["PEFT LoRA r=64"]["median_ms"]
        for name, stats in results.items():
            rows.append({"model": label, "tokens": batch * seq, "config": name, **stats,
                         "x PEFT": stats["median_ms"] / peft_ms})
        del base
    report["end_to_end"] = rows


def step_kernel_tests(plan: Plan, report: dict, seconds_left: float) -> bool | str:
    """The kernel test files on the GPU (one config per kernel: they compile many specialisations)."""
    if plan.device.type != "cuda":
        report["kernel_tests"] = "skipped on the CPU (the test suite runs them through the interpreter)"
        return "skipped"
    env = dict(os.environ, CUMA_TEST_DEVICE="cuda", CUMA_AUTOTUNE="0")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "tests/test_routing_kernels.py", "tests/test_lora_expert_kernels.py", "-q",
           "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(10, seconds_left - 5))
    report["kernel_tests"] = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    print(f"  {report['kernel_tests']}", flush=True)
    return proc.returncode == 0


# ------------------------------------------------------------------------------------------------- output


def markdown(report: dict) -> str:
    lines = [f"# CuMA GPU report: {report['machine']['card']}", "",
             "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in report["machine"].items()]
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']:.1f} |" for s in report["steps"]]
    if report.get("correctness"):
        lines += ["", "## Correctness (against the torch path in fp32)", "",
                  "| shape | A | y | dx | dA | dB | d gates | first call s |", "|---|---|---|---|---|---|---|---|"]
        for r in report["correctness"]:
            c = r["checks"]
            cells = " | ".join(f"{c[n]['error']:.1e}{'' if c[n]['ok'] else ' FAIL'}"
                               for n in ("y", "dx", "dA", "dB", "d gates"))
            lines.append(f"| {r['shape']} | {r['A']} | {cells} | {r['first_call_s']:.1f} |")
    for key, title in (("timings", "Timings"), ("sweep", "Sweep (experts alone)")):
        if report.get(key):
            lines += ["", f"## {title}: median ms (p10-p90), x base linear", "",
                      "| shape | provider | mode | median ms | p10-p90 | x base |", "|---|---|---|---|---|---|"]
            for r in report[key]:
                if "median_ms" in r:
                    lines.append(f"| {r['shape']} | {r['provider']} | {r['mode']} | {r['median_ms']:.3f} | "
                                 f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f} | {r.get('x base', float('nan')):.2f} |")
                else:
                    lines.append(f"| {r['shape']} | {r['provider']} | {r['mode']} | {r['error']} | | |")
    if report.get("end_to_end"):
        lines += ["", "## Training step (forward + backward + AdamW), random weights", "",
                  "| model | tokens | config | median ms | x PEFT | trainable params |", "|---|---|---|---|---|---|"]
        for r in report["end_to_end"]:
            lines.append(f"| {r['model']} | {r['tokens']} | {r['config']} | {r['median_ms']:.2f} | "
                         f"{r['x PEFT']:.2f} | {r['trainable_params']:,} |")
    return "\n".join(lines) + "\n"


def machine(plan: Plan) -> dict:
    import triton

    card = torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else f"CPU ({platform.machine()})"
    return {"card": card, "torch": torch.__version__, "triton": triton.__version__, "dtype": str(plan.dtype),
            "backend": os.environ.get("CUMA_BACKEND", "auto"), "autotune": os.environ.get("CUMA_AUTOTUNE", "1"),
            "interpreter": os.environ.get("TRITON_INTERPRET", "0")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU: checks the script itself")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default gpu_report_<time>/)")
    parser.add_argument("--budget-s", type=int, default=480, help="steps that would start later are skipped")
    args = parser.parse_args(argv)
    if args.cpu:
        os.environ.setdefault("CUMA_BACKEND", "triton" if os.environ.get("TRITON_INTERPRET") == "1" else "torch")
        plan = cpu_plan()
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu for the smoke mode", file=sys.stderr)
            return 2
        plan = gpu_plan()
    out_dir = args.out or Path(f"gpu_report_{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"results go to {out_dir}/", flush=True)
    report = {"machine": machine(plan), "steps": []}
    steps = [("correctness", lambda: step_correctness(plan, report)),
             ("timings", lambda: step_timings(plan, report)),
             ("sweep", lambda: step_sweep(plan, report)),
             ("profile", lambda: step_profile(plan, report, out_dir)),
             ("autotune choices", lambda: step_configs(report)),
             ("end to end", lambda: step_end_to_end(plan, report)),
             ("kernel tests on the device", lambda: step_kernel_tests(plan, report, left))]
    status, started = 0, time.perf_counter()
    for name, run in steps:
        left = args.budget_s - (time.perf_counter() - started)
        if left < 10:
            report["steps"].append({"step": name, "status": "skipped (time budget spent)", "seconds": 0.0})
            status = 1
            continue
        print(f"[{name}]", flush=True)
        t0 = time.perf_counter()
        try:
            with time_limit(int(min(plan.step_timeout_s, left))):
                result = run()
            state = "failed" if result is False else "skipped" if result == "skipped" else "ok"
        except (StepTimeout, subprocess.TimeoutExpired) as exc:
            state = f"timeout ({exc})"
        except Exception as exc:  # recorded, and the report goes on
            state = f"error: {type(exc).__name__}: {str(exc)[:200]}"
            traceback.print_exc()
        report["steps"].append({"step": name, "status": state, "seconds": time.perf_counter() - t0})
        print(f"  -> {state}", flush=True)
        if name == "correctness" and state != "ok":
            status = 1
            break  # timings of wrong kernels mean nothing
        if state not in ("ok", "skipped"):
            status = 1
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out_dir / "report.md").write_text(markdown(report))
    print(markdown(report))
    print(f"results in {out_dir}/report.json and report.md", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

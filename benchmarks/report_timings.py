"""Timings for the GPU report: providers per call and back to back, per-launch device times joined to the roofline,
and end-to-end training steps. Every baseline is built and timed on its own: one that cannot run here (PEFT not
installed, torch._grouped_mm missing) becomes an error row and the others go on.
"""
from __future__ import annotations

import contextlib
import statistics
import time

import torch

from report_checks import Inputs
from report_plan import Case, Plan


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, warmup: int, iters: int) -> dict:
    """Per call: median / p10 / p90 ms, each call between its own CUDA events (host wait included between calls).
    Back to back: `iters` calls between one pair of events, per call (launch overhead hidden by queueing)."""
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
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        back_to_back = start.elapsed_time(end) / iters
    else:
        back_to_back = statistics.median(times)

    def pct(q):
        return times[min(len(times) - 1, round(q * (len(times) - 1)))]

    return {"median_ms": statistics.median(times), "p10_ms": pct(0.1), "p90_ms": pct(0.9), "n": len(times),
            "back_to_back_ms": back_to_back}


def layer(p: Inputs, W, x, A, B, w):
    """The model layer's computation: base linear, then the experts added into its output in place."""
    from cuma_kernels import lora_experts

    return lora_experts(x, A, B, p.idx, w, p.scaling, x @ W.t(), dispatch=p.dispatch, inplace=True)


def dense_gated(x, A, B, idx, w, scaling):
    """The dense gated form in the input dtype (every expert for every token, masked by the [T, E] gates)."""
    E, N, r = B.shape
    gates = torch.zeros(x.shape[0], E, device=x.device, dtype=x.dtype).scatter_add(1, idx.long(), w.to(x.dtype))
    h = x @ A.reshape(E * r, -1).t()
    return (h * gates.repeat_interleave(r, dim=1)) @ (B.permute(1, 0, 2).reshape(N, E * r).t() * scaling)


def _weight(case: Case, p: Inputs) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(case.N, case.K, generator=gen) / case.K ** 0.5).to(p.x.device, p.x.dtype)


def providers(case: Case, p: Inputs, W, full: bool) -> tuple[dict, list]:
    """name -> (callable or the reason it cannot run), and the leaves whose gradients each call clears.
    "whole layer" is the base linear with the experts added into its output (v2); "whole layer, base owned" the
    one op that computes both (`linear_with_experts`, what the model runs for a plain frozen nn.Linear)."""
    from cuma_kernels import linear_with_experts, lora_experts

    x, A, B, w = (t.detach().clone().requires_grad_() for t in (p.x, p.A, p.B[0], p.w))
    leaves = [x, A, B, w]
    rows = {"base linear": lambda: x @ W.t(), "whole layer": lambda: layer(p, W, x, A, B, w),
            "whole layer, base owned": lambda: linear_with_experts(x, W, None, A, B, p.idx, w, p.scaling,
                                                                   dispatch=p.dispatch),
            "experts alone": lambda: lora_experts(x, A, B, p.idx, w, p.scaling, dispatch=p.dispatch)}
    if not full:
        return rows, leaves

    def peft_rows():
        from baselines import peft_delta, peft_linear

        peft = peft_linear(W, case.r, p.scaling)
        leaves.extend(q for q in peft.parameters() if q.requires_grad)
        return {"PEFT LoRA layer": lambda: peft(x), "PEFT adapter alone": lambda: peft_delta(peft, x)}

    def grouped_mm_rows():
        from baselines import grouped_mm_experts, grouped_mm_unsupported

        why = grouped_mm_unsupported(x.device.type, x.dtype)
        if why:
            raise RuntimeError(why)
        return {"torch._grouped_mm": lambda: grouped_mm_experts(x, A, B, p.idx, w, p.scaling)}

    def loop_rows():
        from baselines import published_expert_loop

        return {"published loop": lambda: published_expert_loop(x, A, B, p.idx, w, p.scaling)}

    rows["dense gated (input dtype)"] = lambda: dense_gated(x, A, B, p.idx, w, p.scaling)
    for label, make in (("PEFT", peft_rows), ("torch._grouped_mm", grouped_mm_rows), ("published loop", loop_rows)):
        try:
            rows.update(make())
        except Exception as exc:  # that baseline alone is dropped, with the reason
            rows[label] = f"unavailable: {type(exc).__name__}: {str(exc)[:160]}"
    return rows, leaves


def time_case(case: Case, plan: Plan, full: bool, emit) -> None:
    """emit(row) for every provider and mode of one case; 'x base' is the ratio to the base linear's median."""
    p = Inputs(case, plan.torch_device)
    W = _weight(case, p)
    rows, leaves = providers(case, p, W, full)
    dy = p.dy[0]
    base = {}
    for mode in ("fwd", "fwd+bwd"):
        for name, fn in rows.items():
            row = {"shape": case.name, "provider": name, "mode": mode}
            if isinstance(fn, str):
                emit({**row, "error": fn})
                continue

            def call(fn=fn, mode=mode):
                if mode == "fwd":
                    with torch.no_grad():
                        fn()
                else:
                    for t in leaves:
                        t.grad = None
                    fn().backward(dy)
            try:
                stats = time_calls(call, plan.torch_device, plan.warmup, plan.iters)
            except Exception as exc:  # a provider this build or card cannot run is reported, not fatal
                emit({**row, "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
                continue
            if name == "base linear":
                base[mode] = stats["median_ms"]
            if base.get(mode):
                stats["x base"] = stats["median_ms"] / base[mode]
            stats["tokens_per_s"] = case.T / stats["median_ms"] * 1e3
            emit({**row, **stats})


# --------------------------------------------------------------------------- per-launch times x roofline


class LaunchTimer:
    """Device time of each Triton launch, in launch order: the kernels' `run` is wrapped with CUDA events (host
    time under the interpreter). On a GPU the stream is first held busy, so every launch is queued before it runs
    and the events measure the kernels, not the host's launch overhead."""

    def __init__(self, device: torch.device):
        self.device, self.spans = device, []

    @contextlib.contextmanager
    def span(self, name: str):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.spans.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.spans.append((name, t0, time.perf_counter()))

    @contextlib.contextmanager
    def kernels(self, names: tuple[str, ...]):
        from cuma_kernels import grouped_lora

        wrapped = [getattr(grouped_lora, n) for n in names]
        for name, kernel in zip(names, wrapped):
            def timed(*args, _run=kernel.run, _name=name, **kwargs):
                with self.span(_name):
                    return _run(*args, **kwargs)
            kernel.run = timed
        try:
            yield
        finally:
            for kernel in wrapped:
                del kernel.run

    def hold_stream(self) -> None:
        if self.device.type == "cuda":
            torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU clock cycles: the launches that follow queue up

    def times_us(self) -> list[tuple[str, float]]:
        sync(self.device)
        if self.device.type == "cuda":
            return [(n, s.elapsed_time(e) * 1e3) for n, s, e in self.spans]
        return [(n, (e - s) * 1e6) for n, s, e in self.spans]


def launch_times(case: Case, plan: Plan) -> list[dict]:
    """Median device time of each launch of the layer's forward+backward, beside roofline.py's bytes and FLOPs of
    that launch: achieved TB/s and TFLOP/s, and the roofline floor over the measured time."""
    import roofline
    from cuma_kernels import grouped_lora as gl
    from cuma_kernels import lora_experts

    p = Inputs(case, plan.torch_device)
    W = _weight(case, p)
    x, A, B, w = (t.detach().clone().requires_grad_() for t in (p.x, p.A, p.B[0], p.w))
    dy = p.dy[0]
    for _ in range(max(1, plan.warmup)):  # compile and autotune outside the timed runs
        layer(p, W, x, A, B, w).backward(dy)
    sync(plan.torch_device)
    runs = []
    for _ in range(max(1, plan.iters // 3)):
        timer = LaunchTimer(plan.torch_device)
        timer.hold_stream()
        with timer.kernels(tuple({k for ks in roofline.KERNELS.values() for k, _ in ks})):
            with timer.span("base linear x @ W^T"):
                base = x @ W.t()
            y = lora_experts(x, A, B, p.idx, w, p.scaling, base, dispatch=p.dispatch, inplace=True)
            y.backward(dy)
            with timer.span("base dx = dy @ W"):
                base_dx = dy @ W
            with timer.span("autograd: dx(base) + dx(experts)"):
                base_dx + x.grad
        runs.append(timer.times_us())
        for t in (x, A, B, w):
            t.grad = None
    pieces = gl.segment_pieces(p.dispatch.offsets, case.T * case.k, max(case.N, case.K))[0].shape[0]
    set_pieces = gl.set_pieces(p.idx, p.dispatch.token_order, case.E, max(case.N, case.K))
    set_count = int((set_pieces.piece_start < case.T).sum())
    model = roofline.experts_op_launches(case.T, case.K, case.N, case.r, case.E, case.k, pieces, set_count)
    measured = [roofline.measured_per_launch(run) for run in runs]
    rows = []
    for launch in model:
        values = [m[launch.name] for m in measured if launch.name in m]
        row = {"shape": case.name, "launch": launch.name, "phase": launch.phase, "GFLOP": launch.flops / 1e9,
               "MB": launch.bytes / 1e6}
        for card in roofline.CARDS:
            row[f"floor us ({card})"] = roofline.seconds(launch, card) * 1e6
        if values:
            us = statistics.median(values)
            row.update({"measured us": us, "TB/s": launch.bytes / us / 1e6, "TFLOP/s": launch.flops / us / 1e6})
        else:
            row["measured us"] = None
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ end to end


def end_to_end(plan: Plan, emit) -> None:
    """Training steps (forward + backward + AdamW) of random-weight Llama models: CuMA on q_proj and v_proj
    against PEFT LoRA at the same rank; each configuration guarded on its own."""
    from transformers import LlamaConfig, LlamaForCausalLM

    batch, seq = plan.batch
    dt, dev = plan.torch_dtype, plan.torch_device
    r = 64 if dev.type == "cuda" else 8
    for label, dims in plan.models:
        torch.manual_seed(0)
        config = LlamaConfig(max_position_embeddings=max(2048, seq), pad_token_id=0, **dims)
        with dev:  # initialise on the device: an 8B-shaped embedding is slow to fill on the host
            base = LlamaForCausalLM(config).to(dt)
        ids = torch.randint(3, dims["vocab_size"], (batch, seq), device=dev)
        z = torch.randn(batch, 64, device=dev, dtype=dt)
        results = {}
        for name in (f"CuMA E=8 k=2 r={r}", f"PEFT LoRA r={r}"):
            try:
                results[name] = train_step_stats(plan, base, name, r, ids, z)
            except Exception as exc:  # that configuration alone is dropped, with the reason
                results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
        peft_ms = results[f"PEFT LoRA r={r}"].get("median_ms")
        for name, stats in results.items():
            if peft_ms and "median_ms" in stats:
                stats["x PEFT"] = stats["median_ms"] / peft_ms
            emit({"model": label, "tokens": batch * seq, "config": name, **stats})
        del base


def train_step_stats(plan: Plan, base, name: str, r: int, ids, z) -> dict:
    import copy

    import cuma_model

    dev = plan.torch_device
    model = copy.deepcopy(base)
    if name.startswith("CuMA"):
        cuma_model.patch_model(model, num_experts=8, top_k=2, r=r, lora_alpha=2 * r, demographic_dim=64,
                               target_modules=["q_proj", "v_proj"])
        kwargs = {"demographic_embeds": z}
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"]))
        kwargs = {}
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-5)

    def train_step():
        model(input_ids=ids, labels=ids, **kwargs).loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    stats = time_calls(train_step, dev, min(2, plan.warmup), max(1, plan.iters // 3))
    if dev.type == "cuda":
        stats["peak_memory_GB"] = torch.cuda.max_memory_allocated(dev) / 1e9
    stats["trainable_params"] = sum(q.numel() for q in params)
    return stats

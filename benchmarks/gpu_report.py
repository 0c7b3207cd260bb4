"""GPU report for the CuMA kernels: the one command to run on a lent CUDA machine (about 8 minutes on an H100/H200).

    python benchmarks/gpu_report.py [--out DIR] [--budget-s 480]   # CUDA: headline shapes, bf16, autotuning on
    python benchmarks/gpu_report.py --cpu [--out DIR]              # the same steps at tiny shapes, the Triton
                                                                   # kernels through the interpreter (CI runs it)

Each step runs in a child process under a hard time limit (a hung compile or kernel is killed with its process, and
the rows it finished stay), and DIR/report.json and DIR/report.md are rewritten after every step. A step that fails
or times out is recorded and the run goes on; results of later steps that need it are marked UNVERIFIED.
Steps, in order (limits on a GPU; each is cut to the budget left, less what the later steps marked "keeps"
are promised):
  1. precompile (150 s): the first forward+backward at the headline shapes (T=16384, K=4096, N=4096 and 1024, r=64,
     E=8, k=2, bf16, both A layouts), compile and autotune time per shape; autotune results are cached on disk
     (TRITON_CACHE_AUTOTUNING) for the later steps.
  2. correctness (150 s): every launch (h, y - base, y added into base in place, the dy pass, the gate gradient,
     dx, dA, dB) against an fp64 reference, max abs and max rel error and the worst row and expert named; headline
     shapes, ragged T=1000 K=1000 N=776 r=48 with an empty expert, T=8, skewed routing, r=128, the shared q/k/v
     shrink, both A layouts and both tile walks, bf16, fp16 and fp32.
  3. autotune configs (100 s): every autotune config of every kernel, each against the reference.
  4. kernel tests (90 s; GPU only): tests/test_routing_kernels.py, test_lora_expert_kernels.py,
     test_base_linear_kernels.py and test_set_piece_kernels.py on the GPU (CUMA_AUTOTUNE=0: each kernel's first
     GPU config).
  5. timings (90 s, keeps 45 s, needs 2): per call and back to back: base linear, whole layer (and with the base
     owned by the op), experts alone, PEFT LoRA, the dense gated form, torch._grouped_mm, the published loop; each
     baseline guarded on its own.
  6. launches (60 s, keeps 30 s, needs 2): the device time of each launch of the layer's forward+backward next to
     roofline.py's bytes and FLOPs (achieved TB/s, TFLOP/s, share of the roofline floor); the autotune choices.
  7. sweep (45 s, needs 2; GPU only): the experts alone at E=16 r=128, skewed routing, T=2048, T=8.
  8. end to end (75 s, keeps 30 s, needs 2): training steps of random-weight Llama models, CuMA against PEFT LoRA.
A step whose needed step did not pass still runs; its results are marked UNVERIFIED. Exit status 0 when every step
passed, 1 otherwise. Logs of each step: DIR/logs/; each step's rows as they came: DIR/steps/.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CHECKS_FAILED = 3  # a child's exit status when it ran to the end and some check failed


@dataclass(frozen=True)
class Step:
    name: str
    gpu_limit_s: int
    cpu_limit_s: int
    needs: tuple[str, ...] = ()
    cpu_skip: str = ""  # why --cpu skips it (it runs on a GPU only)
    reserve_s: int = 0  # seconds of the budget that the steps before it leave to it


STEPS = (
    Step("precompile", 150, 30),
    Step("correctness", 150, 60),
    Step("autotune configs", 100, 60),
    Step("kernel tests", 90, 0, cpu_skip="the test suite runs these files through the interpreter"),
    Step("timings", 90, 60, needs=("correctness",), reserve_s=45),
    Step("launches", 60, 30, needs=("correctness",), reserve_s=30),
    Step("sweep", 45, 0, needs=("correctness",), cpu_skip="timings runs its code; it keeps --cpu under 2 minutes"),
    Step("end to end", 75, 60, needs=("correctness",), reserve_s=30),
)


# ---------------------------------------------------------------------------------- child: one step's work


class StepOutput:
    """The rows of one step, rewritten to DIR/steps/<step>.json after every row, so a killed step keeps them."""

    def __init__(self, out_dir: Path, step: str):
        self.path = out_dir / "steps" / f"{step.replace(' ', '_')}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data = {"rows": []}
        self.save()

    def emit(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def step_precompile(plan, out: StepOutput) -> bool:
    import torch

    from report_checks import Inputs
    from report_timings import _weight, layer, sync

    for case in plan.headline:
        for shared in (False, True):
            c = dataclasses.replace(case, shared_A=shared)
            p = Inputs(c, plan.torch_device)
            x, A, B, w = (t.detach().clone().requires_grad_() for t in (p.x, p.A, p.B[0], p.w))
            sync(plan.torch_device)
            t0 = time.perf_counter()
            layer(p, _weight(c, p), x, A, B, w).backward(p.dy[0])
            sync(plan.torch_device)
            out.emit({"shape": c.name, "first_call_s": time.perf_counter() - t0})
            print(f"  {c.name}: first call {time.perf_counter() - t0:.1f} s", flush=True)
            del p, x, A, B, w
            if plan.device == "cuda":
                torch.cuda.empty_cache()
    return True


def step_correctness(plan, out: StepOutput) -> bool:
    from report_checks import check_case, summary_line

    ok = True
    for case in plan.checks:
        try:
            row = check_case(case, plan.torch_device)
        except Exception as exc:  # recorded against its case; the next case runs
            row = {"case": case.name, "checks": {}, "ok": False, "seconds": 0.0,
                   "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            traceback.print_exc()
        out.emit(row)
        print(summary_line(row) + (f" {row['error']}" if "error" in row else ""), flush=True)
        ok = ok and row["ok"]
    return ok


def step_autotune_configs(plan, out: StepOutput) -> bool:
    """Each kernel's i-th GPU config (all kernels at once, so len(configs) runs cover them all) on every case."""
    import triton

    from cuma_kernels import grouped_lora as gl
    from report_checks import check_case, summary_line

    tuned = {"_shrink_kernel": gl.SHRINK_CONFIGS, "_expand_kernel": gl.EXPAND_CONFIGS,
             "_dy_pass_kernel": gl.DY_PASS_CONFIGS, "_segment_partial_kernel": gl.SEGMENT_CONFIGS,
             "_set_partial_kernel": gl.SET_PIECE_CONFIGS}
    ok = True
    for i in range(max(len(c[0]) for c in tuned.values())):
        chosen = {}
        for name, (gpu_configs, _) in tuned.items():
            cfg = dict(gpu_configs[min(i, len(gpu_configs) - 1)])
            meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
            getattr(gl, name).configs = [triton.Config(meta, num_warps=cfg.get("num_warps", 4),
                                                       num_stages=cfg.get("num_stages", 3))]
            chosen[name] = cfg
        label = f"config {i}: " + "; ".join(f"{n.strip('_').removesuffix('_kernel')} "
                                            + " ".join(f"{k}={v}" for k, v in c.items()) for n, c in chosen.items())
        for case in plan.config_checks:
            try:
                row = check_case(case, plan.torch_device, seed=i + 1)
            except Exception as exc:
                row = {"case": case.name, "checks": {}, "ok": False, "seconds": 0.0,
                       "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            row["config"] = label
            out.emit(row)
            print(f"  [{label}]" + summary_line(row), flush=True)
            ok = ok and row["ok"]
    return ok


def step_kernel_tests(plan, out: StepOutput, limit_s: float) -> bool:
    env = dict(os.environ, CUMA_TEST_DEVICE="cuda", CUMA_AUTOTUNE="0")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "tests/test_routing_kernels.py", "tests/test_lora_expert_kernels.py",
           "tests/test_base_linear_kernels.py", "tests/test_set_piece_kernels.py", "-v", "-p", "no:cacheprovider"]  # -v: a line per test as it ends, so a timeout keeps the names
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(10.0, limit_s - 10))
        stdout, passed = proc.stdout, proc.returncode == 0
    except subprocess.TimeoutExpired as exc:  # the lines it printed are kept
        stdout = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        stdout, passed = stdout + f"\ntimeout after {exc.timeout:.0f} s", False
    lines = stdout.strip().splitlines()
    out.emit({"summary": lines[-1] if lines else "no output",
              "passed": sum(" PASSED" in line for line in lines),
              "failures": sorted({line.split(" ")[0] for line in lines if " FAILED" in line or " ERROR" in line})[:30]})
    print("\n".join(lines[-30:]), flush=True)
    return passed


def step_timings(plan, out: StepOutput) -> bool:
    from report_timings import time_case

    for case in plan.headline:
        time_case(case, plan, full=True, emit=out.emit)
    return True


def step_sweep(plan, out: StepOutput) -> bool:
    from report_timings import time_case

    for case in plan.sweep:
        time_case(case, plan, full=False, emit=out.emit)
    return True


def step_launches(plan, out: StepOutput) -> bool:
    from report_timings import launch_times

    for case in plan.headline:
        for row in launch_times(case, plan):
            out.emit(row)
    out.data["autotune choices"] = autotune_choices()
    out.save()
    return True


def autotune_choices() -> dict:
    import triton

    from cuma_kernels import grouped_lora

    return {name: {str(key): str(cfg) for key, cfg in kernel.cache.items()}
            for name, kernel in vars(grouped_lora).items() if isinstance(kernel, triton.runtime.Autotuner)}


def step_end_to_end(plan, out: StepOutput) -> bool:
    from report_timings import end_to_end

    end_to_end(plan, out.emit)
    return True


def run_step_here(name: str, cpu: bool, out_dir: Path, limit_s: float) -> int:
    """The child's side: run one step, its rows saved as they come. Exit status 0, CHECKS_FAILED or 1 (error)."""
    import torch

    from report_plan import cpu_plan, gpu_plan

    if cpu:
        torch.set_num_threads(1)
    plan = cpu_plan() if cpu else gpu_plan()
    out = StepOutput(out_dir, name)
    work = {"precompile": step_precompile, "correctness": step_correctness, "autotune configs": step_autotune_configs,
            "timings": step_timings, "sweep": step_sweep, "launches": step_launches, "end to end": step_end_to_end}
    if name == "kernel tests":
        ok = step_kernel_tests(plan, out, limit_s)
    else:
        ok = work[name](plan, out)
    return 0 if ok else CHECKS_FAILED


# --------------------------------------------------------------------------- parent: steps, limits, report


def child_env(cpu: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cpu:  # read by triton when it is imported: the child imports it only after this is set
        env.update(TRITON_INTERPRET="1", CUMA_BACKEND="triton", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    else:
        env.pop("TRITON_INTERPRET", None)
        env["TRITON_CACHE_AUTOTUNING"] = "1"  # each step is a new process: keep the autotune results on disk
    return env


def run_child(step: Step, cpu: bool, out_dir: Path, limit_s: float) -> tuple[str, float]:
    """Run one step in its own process group under a hard limit; its output goes to DIR/logs and the console."""
    log = out_dir / "logs" / f"{step.name.replace(' ', '_')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", step.name, "--out", str(out_dir),
           "--step-limit-s", str(limit_s)] + (["--cpu"] if cpu else [])
    t0 = time.perf_counter()
    with open(log, "w") as sink, open(log) as source:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(cpu), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        status = None
        while status is None:
            time.sleep(0.5)
            sys.stdout.write(source.read())
            sys.stdout.flush()
            if proc.poll() is not None:
                status = {0: "ok", CHECKS_FAILED: "failed"}.get(proc.returncode, f"error (exit {proc.returncode})")
            elif time.perf_counter() - t0 > limit_s:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: a pytest or compiler under it too
                proc.wait()
                status = f"timeout after {limit_s:.0f} s"
        sys.stdout.write(source.read())
    if status.startswith("error"):
        tail = log.read_text().strip().splitlines()[-3:]
        status += ": " + " | ".join(tail)[-300:]
    return status, time.perf_counter() - t0


def machine(cpu: bool) -> dict:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    if cpu:  # torch is not imported here: the steps' processes do that
        card = f"CPU ({platform.machine()}), Triton interpreter"
    else:
        import torch

        card = torch.cuda.get_device_name(0)
    return {"card": card, "torch": version("torch"), "triton": version("triton"), "python": platform.python_version(),
            "autotune": os.environ.get("CUMA_AUTOTUNE", "1"), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def write_report(report: dict, out_dir: Path) -> None:
    from report_render import markdown

    for name, text in (("report.json", json.dumps(report, indent=1, default=str)), ("report.md", markdown(report))):
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out_dir / name)


def collect(report: dict, step: Step, out_dir: Path) -> None:
    path = out_dir / "steps" / f"{step.name.replace(' ', '_')}.json"
    if path.exists():
        try:
            report["results"][step.name] = json.loads(path.read_text())
        except json.JSONDecodeError as exc:  # a half-written file of a killed step: said so, not dropped silently
            report["results"][step.name] = {"rows": [], "error": f"unreadable results: {exc}"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU, Triton through its interpreter")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default gpu_report_<time>/)")
    parser.add_argument("--budget-s", type=float, default=480, help="the whole run's limit; steps are cut to it")
    parser.add_argument("--max-step-s", type=float, default=None, help="cap every step's limit at this many seconds")
    parser.add_argument("--steps", default=None, help="comma-separated subset of the steps, in their usual order")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)  # a child: run this one step
    parser.add_argument("--step-limit-s", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out_dir = args.out or Path(f"gpu_report_{time.strftime('%Y%m%d-%H%M%S')}")
    if args.step:
        return run_step_here(args.step, args.cpu, out_dir, args.step_limit_s)

    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu for the interpreter smoke run", file=sys.stderr)
            return 2
    known = {s.name for s in STEPS}
    wanted = [s.strip() for s in args.steps.split(",")] if args.steps else list(known)
    if set(wanted) - known:
        print(f"unknown steps {sorted(set(wanted) - known)}; the steps are: {', '.join(s.name for s in STEPS)}",
              file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"results go to {out_dir}/report.json and report.md (rewritten after every step)", flush=True)
    report = {"machine": machine(args.cpu), "mode": "cpu (interpreter)" if args.cpu else "gpu", "steps": [],
              "results": {}}
    steps = [s for s in STEPS if s.name in wanted]
    for s in steps:
        report["steps"].append({"step": s.name, "status": "pending", "seconds": 0.0, "needs": list(s.needs)})
    write_report(report, out_dir)
    started, status = time.perf_counter(), 0
    for entry, step in zip(report["steps"], steps):
        later = steps[steps.index(step) + 1:]
        left = args.budget_s - (time.perf_counter() - started) - sum(s.reserve_s for s in later if not args.cpu)
        limit = min(step.cpu_limit_s if args.cpu else step.gpu_limit_s, left, args.max_step_s or math.inf)
        if step.cpu_skip and args.cpu:
            entry["status"] = f"skipped on the CPU ({step.cpu_skip})"
        elif limit < 10:
            entry["status"], status = "skipped (time budget spent)", 1
        else:
            print(f"[{step.name}] (limit {limit:.0f} s)", flush=True)
            entry["status"], entry["seconds"] = run_child(step, args.cpu, out_dir, limit)
            collect(report, step, out_dir)
            print(f"  -> {entry['status']} ({entry['seconds']:.1f} s)", flush=True)
            if entry["status"] != "ok":
                status = 1
        failed_needs = [n for n in step.needs if any(e["step"] == n and e["status"] != "ok" for e in report["steps"])]
        if failed_needs:
            entry["unverified"] = f"{', '.join(failed_needs)} did not pass: these numbers may be of wrong kernels"
        write_report(report, out_dir)
    print(f"results in {out_dir}/report.json and report.md", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

"""The GPU report (benchmarks/gpu_report.py): its --cpu run through the Triton interpreter, a step past its limit,
the per-kernel error report, the roofline join and the kernels' config without autotuning."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import roofline  # noqa: E402
from report_checks import Inputs, compare, reference  # noqa: E402
from report_plan import Case, cpu_plan  # noqa: E402

REPORT = [sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), "--cpu"]
CHECKED = {"h", "y - base", "y (added into base in place)", "dy pass (g*dh)", "gate gradient", "dx", "dA", "dB"}


def run_report(out: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUMA_BACKEND")}
    return subprocess.run(REPORT + ["--out", str(out), *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_cpu_run_goes_through_every_step_with_the_triton_kernels(tmp_path):
    """Without TRITON_INTERPRET in the caller's environment, --cpu still runs the Triton kernels (interpreter)."""
    t0 = time.perf_counter()
    proc = run_report(tmp_path)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    status = {s["step"]: s["status"] for s in report["steps"]}
    assert status.pop("kernel tests").startswith("skipped on the CPU")
    assert status.pop("sweep").startswith("skipped on the CPU")
    assert set(status.values()) == {"ok"}, report["steps"]
    results = report["results"]

    checks = results["correctness"]["rows"]
    assert len(checks) == len(cpu_plan().checks) and all(r["ok"] for r in checks)
    single = [r for r in checks if "projections" not in r["case"]]
    assert all(set(r["checks"]) == CHECKED for r in single)
    shared_shrink = [r for r in checks if "projections" in r["case"]]
    assert len(shared_shrink) == 1 and {"dy0 - base", "dB2"} & set(shared_shrink[0]["checks"]) == {"dB2"}
    assert {c["worst"].split()[0] for r in single for c in r["checks"].values()} == {"token", "expert"}

    configs = results["autotune configs"]["rows"]
    assert len({r["config"] for r in configs}) == 3 and all(r["ok"] for r in configs)
    assert "BLOCK_T=128" in configs[-1]["config"]  # a GPU config, not the interpreter's 32x32

    timed = {(r["provider"], r["mode"]) for r in results["timings"]["rows"] if "median_ms" in r}
    for provider in ("base linear", "whole layer", "whole layer, base owned", "experts alone", "PEFT LoRA layer",
                     "dense gated (input dtype)", "published loop"):
        assert (provider, "fwd+bwd") in timed, provider
    assert all("back_to_back_ms" in r for r in results["timings"]["rows"] if "median_ms" in r)

    launches = results["launches"]["rows"]
    assert [r["launch"] for r in launches] == [x.name for x in roofline.launches(64, 48, 40, 16, 4, 2)]
    assert all(r["measured us"] > 0 and r["TB/s"] >= 0 for r in launches)

    assert {r["config"] for r in results["end to end"]["rows"]} == {"CuMA E=8 k=2 r=8", "PEFT LoRA r=8"}
    assert all("median_ms" in r for r in results["end to end"]["rows"])
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# CuMA GPU report") and "UNVERIFIED" not in md and "| dA: segment partials" in md
    assert seconds < 240, f"--cpu took {seconds:.0f} s: keep it under 2 minutes on one core"


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the step's process through /proc")
def test_a_hung_step_is_killed_and_the_run_goes_on(tmp_path):
    """The correctness step's process is frozen after its first case (a hung kernel, as far as the report can
    tell): it is killed at its limit with that case kept, the step that needs it still runs and is marked
    unverified, and both files are written."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUMA_BACKEND")}
    proc = subprocess.Popen(REPORT + ["--out", str(tmp_path), "--steps", "correctness,launches", "--max-step-s", "30"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rows = tmp_path / "steps" / "correctness.json"
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline and not (rows.exists() and json.loads(rows.read_text() or "{}").get("rows")):
        time.sleep(0.1)
    (step,) = _children(proc.pid)
    os.kill(step, signal.SIGSTOP)
    output, _ = proc.communicate(timeout=200)
    assert proc.returncode == 1, output[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    first, second = report["steps"]
    assert first["status"] == "timeout after 30 s" and 29 < first["seconds"] < 45
    assert 1 <= len(report["results"]["correctness"]["rows"]) < len(cpu_plan().checks)
    assert second["step"] == "launches" and second["status"] == "ok"
    assert "correctness did not pass" in second["unverified"]
    md = (tmp_path / "report.md").read_text()
    assert "timeout after 30 s" in md and "**UNVERIFIED**" in md


def test_errors_name_the_worst_row_and_expert():
    case = Case(20, 12, 10, 4, 5, 2, "fp32")
    p = Inputs(case, torch.device("cpu"))
    h = torch.randn(20 * 2, 4, generator=torch.Generator().manual_seed(0))
    ref = reference(p, p.B[0], p.dy[0], h, h)
    got = ref["y - base"].clone()
    got[13] += 1.0
    row = compare("y - base", got, ref["y - base"], p, 1e-4)
    experts = ", ".join(str(int(e)) for e in p.idx[13])
    assert not row["ok"] and row["max_abs"] == pytest.approx(1.0) and row["worst"] == f"token 13 (experts {experts})"
    dB = ref["dB"].clone()
    dB[3, 0, 0] = float("nan")
    row = compare("dB", dB, ref["dB"], p, 1e-4)
    assert not row["ok"] and row["max_abs"] == float("inf") and row["worst"] == "expert 3"
    gate = ref["gate gradient"].clone()
    gate[7] += 1e-3
    row = compare("gate gradient", gate, ref["gate gradient"], p, 1.0)
    assert row["ok"] and row["worst"] == f"token 3 slot 1 (expert {int(p.idx[3, 1])})"


def test_roofline_join_matches_kernels_by_occurrence():
    spans = [("base linear x @ W^T", 5.0), ("_shrink_kernel", 1.0), ("_expand_kernel", 2.0),
             ("_dy_pass_kernel", 3.0), ("_segment_partial_kernel", 4.0), ("_sum_pieces_kernel", 0.5),
             ("_expand_kernel", 6.0), ("_segment_partial_kernel", 7.0)]
    got = roofline.measured_per_launch(spans)
    assert got == {"base linear x @ W^T": 5.0, "shrink (token-major)": 1.0, "expand, added into base in place": 2.0,
                   "dy pass: dh, d gates, g*dh": 3.0, "dB: segment partials + fixed-order sum": 4.5,
                   "dx = expand of g*dh through A^T": 6.0}  # dA's sum is missing: left out, not guessed
    names = {x.name for x in roofline.launches(64, 32, 32, 8, 4, 2)}
    names |= {x.name for x in roofline.set_piece_launches(64, 32, 32, 8, 4, 2, 1).values()}  # dA / dB read once
    assert set(roofline.KERNELS) <= names


def test_without_autotuning_a_gpu_gets_a_gpu_config(monkeypatch):
    from cuma_kernels import grouped_lora
    from cuma_kernels.utils import tune_configs

    monkeypatch.setenv("CUMA_AUTOTUNE", "0")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for gpu, interp in (grouped_lora.SHRINK_CONFIGS, grouped_lora.EXPAND_CONFIGS, grouped_lora.DY_PASS_CONFIGS,
                        grouped_lora.SEGMENT_CONFIGS):
        (cfg,) = tune_configs(gpu, interp)
        assert cfg.kwargs == {k: v for k, v in gpu[0].items() if k != "num_warps"} and cfg.kwargs != interp
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        (cfg,) = tune_configs(gpu, interp)
        assert cfg.kwargs == interp
        monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("CUMA_AUTOTUNE", "1")
    assert len(tune_configs(*grouped_lora.SHRINK_CONFIGS)) == 3

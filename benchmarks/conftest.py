"""pytest options, fixtures and the ratio summary for the CuMA microbenchmarks.

Run: pytest benchmarks/ --benchmark-only  (the plain `pytest` run never collects this folder).
On CPU the run uses one torch thread unless --cuma-threads says otherwise (see the option's help).

Without CUDA the default shape is sized for a small CPU: the CPU target shape T=4096, K=N=1024, r=16, E=8, k=2,
fp32. With CUDA the defaults are design.md's headline shapes (T=16384, K=4096, N=4096 and 1024, r=64, E=8, k=2,
bf16); `--cuma-shapes=sweep` runs the sweeps (T, r, E x k, skewed routing, ragged T), `--cuma-shapes=all` both.
Each benchmark's group names the operation, the mode and the shape, so the default `--benchmark-group-by=group`
prints one comparison table per (operation, mode, shape). At the end a ratio table (speed-up over the published
form, time over the frozen base linear) is printed from this run's medians.
"""
from __future__ import annotations

import json

import pytest
import torch

from harness import Problem, ratio_rows, shapes_for


def pytest_addoption(parser):
    group = parser.getgroup("cuma", "CuMA microbenchmarks")
    group.addoption("--cuma-shapes", default="default", choices=("default", "sweep", "all"),
                    help="shape set: the device's default shapes, its sweeps, or both")
    group.addoption("--cuma-device", default=None, help="device to benchmark on (default: cuda when available)")
    group.addoption("--cuma-budget", type=float, default=None,
                    help="seconds of timed calls per benchmark (default 1.0 on CPU, 0.5 on CUDA)")
    group.addoption("--cuma-threads", type=int, default=None,
                    help="torch CPU threads; default 1 on CPU (two OpenMP threads on a shared 2-core machine stall "
                         "whenever the other core is busy), torch's default on CUDA; 0 = torch's default")
    group.addoption("--cuma-ratios-json", default=None, help="also write the ratio table to this JSON file")


def _device(config) -> torch.device:
    name = config.getoption("--cuma-device")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def pytest_configure(config):
    threads = config.getoption("--cuma-threads")
    if threads is None:
        threads = 0 if _device(config).type == "cuda" else 1
    if threads:
        torch.set_num_threads(threads)


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        shapes = shapes_for(_device(metafunc.config), metafunc.config.getoption("--cuma-shapes"))
        metafunc.parametrize("shape", shapes, ids=[s.id for s in shapes], scope="module")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    return _device(request.config)


@pytest.fixture(scope="session")
def budget(request, device) -> float:
    return request.config.getoption("--cuma-budget") or (0.5 if device.type == "cuda" else 1.0)


_PROBLEMS: dict = {}


@pytest.fixture(scope="module")
def problem(shape, device) -> Problem:
    key = (shape, str(device))
    if key not in _PROBLEMS:
        _PROBLEMS.clear()  # hold one shape's tensors at a time
        _PROBLEMS[key] = Problem(shape, device)
    return _PROBLEMS[key]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = ratio_rows()
    if not rows:
        return
    tr = terminalreporter
    tr.write_sep("-", f"CuMA ratios from this run (medians; torch {torch.__version__}, {_device(config)}, "
                      f"{torch.get_num_threads()} threads)")
    tr.write_line(f"{'op':8} {'mode':8} {'shape':34} {'provider':11} {'median ms':>10} {'x faster than ref':>20} "
                  f"{'time / base':>12}")
    for r in rows:
        sp = f"{r['speedup_vs_reference']:.2f} ({r['reference']})" if r["speedup_vs_reference"] else "-"
        tb = f"{r['time_vs_base']:.2f}" if r["time_vs_base"] else "-"
        tr.write_line(f"{r['op']:8} {r['mode']:8} {r['shape']:34} {r['provider']:11} {r['median_s'] * 1e3:10.3f} "
                      f"{sp:>20} {tb:>12}")
    path = config.getoption("--cuma-ratios-json")
    if path:
        with open(path, "w") as f:
            json.dump({"torch": torch.__version__, "device": str(_device(config)), "threads": torch.get_num_threads(),
                       "rows": rows}, f, indent=2)

"""The roofline model behind docs/benchmarks.md: its counts follow the routed-only design and the script runs."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import roofline  # noqa: E402


def test_expert_flops_grow_with_tokens_times_k_not_experts():
    def expert_flops(T, E, k):
        return sum(x.flops for x in roofline.launches(T, 4096, 1024, 64, E, k) if x.part == "experts")

    assert expert_flops(16384, 8, 2) == expert_flops(16384, 64, 2)
    assert expert_flops(16384, 8, 4) == 2 * expert_flops(16384, 8, 2) == 2 * expert_flops(8192, 8, 4)
    # six rank-r GEMMs per pair: shrink, dx and dA over K; expand, dh and dB over N
    assert expert_flops(100, 8, 2) == 2 * 200 * 64 * (3 * 4096 + 3 * 1024)


def test_shared_shrink_does_the_same_flops_in_fewer_bytes():
    for siblings in (2, 3):
        per, shared = (roofline.shrink_side_launches(16384, 4096, 64, 8, 2, siblings, s) for s in (False, True))
        experts = [sum(x.flops for x in rows if x.part == "experts") for rows in (per, shared)]
        assert experts[0] == experts[1]
        assert sum(x.bytes for x in shared) < sum(x.bytes for x in per)


def test_script_prints_the_tables():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "roofline.py"), "--tokens", "2048"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("| launch | phase |") == 2 and proc.stdout.count("projections on one x") == 2 and "H200" in proc.stdout and "slices per tile" in proc.stdout

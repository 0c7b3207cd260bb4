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
    assert proc.stdout.count("| launch | phase |") == 6 and "v3: fwd / fwd+bwd us (x base)" in proc.stdout and proc.stdout.count("projections on one x") == 2 and "H200" in proc.stdout and "slices per tile" in proc.stdout


def test_v3_owns_the_base_and_does_the_same_expert_work_in_fewer_bytes():
    shape = (16384, 4096, 1024, 64, 8, 2)
    v2, v3 = roofline.launches(*shape), roofline.launches_v3(*shape)
    assert not [x for x in v3 if x.part == "glue"]  # no autograd add of two dx
    assert sum(x.flops for x in v2 if x.part == "experts") == sum(x.flops for x in v3 if x.part == "experts")
    assert sum(x.flops for x in v2 if x.part == "base") == sum(x.flops for x in v3 if x.part == "base")
    assert sum(x.bytes for x in v3) < sum(x.bytes for x in v2)
    # the base GEMMs read the expert output / the experts' dx as their C operand: T*N and T*K more bytes
    base2, base3 = (sum(x.bytes for x in rows if x.part == "base") for rows in (v2, v3))
    assert base3 - base2 == roofline.BF16 * (16384 * 1024 + 16384 * 4096)


def test_headline_ratios_and_the_not_built_rows_are_labelled():
    ratios = {}
    for n in (4096, 1024):
        shape = (16384, 4096, n, 64, 8, 2)
        base_rows = roofline.launches(*shape)
        for design, (fn, built) in roofline.DESIGNS.items():
            rows = fn(*shape)
            assert built == (not any("not built" in x.name for x in rows)), design
            ratios[design, n] = round(roofline.overhead(rows, base_rows, "H100 SXM")[1], 2)
    assert ratios["v2", 4096] == 1.48 and ratios["v2", 1024] == 2.31
    assert ratios["v3", 4096] == 1.29 and ratios["v3", 1024] == 1.75


def test_set_pieces_read_x_once_and_are_counted_from_the_built_code():
    T, K, N, r, E, k = 16384, 4096, 4096, 64, 8, 2
    assert roofline.uniform_set_pieces(T, E, k, K) == 28  # one piece per set of 2 of 8 experts
    rows = {x.name[:2]: x for x in roofline.launches_v3(T, K, N, r, E, k) if x.name.startswith(("dA", "dB"))}
    v2 = {x.name[:2]: x for x in roofline.launches(T, K, N, r, E, k) if x.name.startswith(("dA", "dB"))}
    assert "read once" in rows["dA"].name and rows["dA"].flops == v2["dA"].flops
    # x once (not once per pair) plus k fp32 [K, r] partials per piece, written and read back
    x_bytes, partials = roofline.BF16 * T * K, roofline.FP32 * 2 * 28 * k * K * r
    small = roofline.BF16 * (T * k * r + E * r * K) + 12 * T * k  # g*dh rows, A's shape of dA, indices
    assert rows["dA"].bytes == x_bytes + partials + small
    assert rows["dA"].bytes < v2["dA"].bytes
    # where the rule keeps the expert segments (E=16: 120 sets), v3 keeps v2's dA and dB
    assert [x.name for x in roofline.launches_v3(T, K, N, r, 16, k) if x.name.startswith("dA")] == [
        "dA: segment partials + fixed-order sum"]

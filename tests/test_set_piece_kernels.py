"""dA and dB per expert-set piece (each routed token's x and dy row read once): every gradient against the fp64
reference with the set form forced (CUMA_OUTER=sets), the pieces' invariants, and the rule that picks the form."""
import pytest
import torch

import cuma_kernels.grouped_lora as grouped_lora
from cuma_kernels import dispatch_metadata, linear_with_experts
from test_lora_expert_kernels import DEVICE, _gpu_config, check_fp32, check_low_precision, run_case


@pytest.fixture
def sets(monkeypatch):
    import os

    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    monkeypatch.setenv("CUMA_BACKEND", "triton")
    monkeypatch.setenv("CUMA_OUTER", "sets")
    calls = []
    real = grouped_lora.set_piece_outer
    monkeypatch.setattr(grouped_lora, "set_piece_outer", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    yield calls
    assert calls, "the set form never ran"


# (T, K, N, r, E, k, shared A, pattern): odd sizes, an empty expert, skewed routing, k=3, a shared A (dB only)
CASES = [
    (37, 67, 45, 5, 4, 2, False, "random"),
    (37, 67, 45, 5, 4, 2, False, "skewed"),
    (45, 40, 56, 16, 6, 2, False, "empty"),
    (40, 24, 40, 8, 5, 3, False, "one"),
    (23, 40, 24, 16, 6, 3, True, "random"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}_K{}_N{}_r{}_E{}_k{}_{}_{}".format(*c[:6], "AB"[c[6]], c[7]))
def test_fp32_matches_reference(sets, case):
    *shape, pattern = case
    check_fp32(run_case(*shape, torch.float32, pattern=pattern, seed=51))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_reference(sets, dtype):
    check_low_precision(run_case(37, 67, 45, 5, 4, 2, False, dtype, pattern="skewed", seed=53))


def test_long_runs_split_into_pieces(sets, monkeypatch):
    """Runs longer than a piece (every token on one set) are cut; the pieces of one expert add up in order."""
    monkeypatch.setattr(grouped_lora, "_set_chunk", lambda T, columns, device: 64)
    first = run_case(200, 40, 72, 16, 5, 2, False, torch.float32, pattern="skewed", seed=55)
    check_fp32(first)
    second = run_case(200, 40, 72, 16, 5, 2, False, torch.float32, pattern="skewed", seed=55)
    for name in first:  # deterministic: the same bits on every run
        assert torch.equal(first[name][0], second[name][0]), name


def test_a_token_that_names_one_expert_twice(sets):
    """Both ranks of the set go to the same expert: the sum takes both entries."""
    gen = torch.Generator().manual_seed(57)
    T, K, N, r, E = 30, 24, 40, 8, 4
    x, W = torch.randn(T, K, generator=gen), torch.randn(N, K, generator=gen)
    A, B = torch.randn(E, r, K, generator=gen), torch.randn(E, N, r, generator=gen)
    idx = torch.randint(0, E, (T, 1), generator=gen).expand(T, 2).contiguous().to(torch.int32)
    idx[::3, 1] = (idx[::3, 0] + 1) % E
    w = torch.rand(T, 2, generator=gen) + 0.1
    grad = torch.randn(T, N, generator=gen)
    got = [t.clone().to(DEVICE).requires_grad_() for t in (x, A, B, w)]
    linear_with_experts(got[0], W.to(DEVICE), None, *got[1:3], idx.to(DEVICE), got[3], 0.5).backward(grad.to(DEVICE))
    ref = [t.detach().double().requires_grad_() for t in (x, A, B, w)]
    il = idx.long()
    y = ref[0] @ W.double().t() + 0.5 * torch.einsum("tj,tjnr,tjrk,tk->tn", ref[3], ref[2][il], ref[1][il], ref[0])
    y.backward(grad.double())
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.grad.cpu().double(), b.grad, rtol=1e-4, atol=1e-4 * b.grad.abs().max().item())


@pytest.mark.parametrize("i", [0, 1, 2])
def test_every_autotune_config(sets, i, monkeypatch):
    monkeypatch.setattr(grouped_lora._set_partial_kernel, "configs", [_gpu_config(grouped_lora.SET_PIECE_CONFIGS, i)])
    check_fp32(run_case(150, 140, 136, 32, 6, 2, False, torch.float32, seed=59 + i))


def test_pieces_cover_token_order_one_set_each(monkeypatch):
    monkeypatch.setattr(grouped_lora, "_set_chunk", lambda T, columns, device: 64)
    gen = torch.Generator().manual_seed(61)
    T, E, k = 500, 6, 3
    idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(torch.int32)
    idx[:300] = idx[0]  # one long run
    md = dispatch_metadata(idx, E)
    p = grouped_lora.set_pieces(idx, md.token_order, E, 64)
    start, end = p.piece_start, p.piece_end
    used = start < T
    assert torch.equal(start[used][1:], end[used][:-1]) and start[0] == 0 and end[used][-1] == T
    assert ((end - start)[used] <= 64).all() and ((end - start)[~used] == 0).all()
    by_rank = torch.sort(idx.long(), 1).values[md.token_order]
    experts = []
    for s, e in zip(start[used].tolist(), end[used].tolist()):
        assert (by_rank[s:e] == by_rank[s]).all()  # one set per piece
        experts.append(by_rank[s])
    assert torch.equal(torch.sort(idx.long(), 1).indices.to(torch.int32), p.ranked_slot)
    for e in range(E):  # expert e's entries: every (piece, rank) that holds e, in piece order
        want = [pc * k + q for pc, ex in enumerate(experts) for q in range(k) if ex[q] == e]
        assert p.entries[p.first[e]:p.first[e + 1]].tolist() == want


def test_rule_reads_once_at_the_headline_shapes_only(monkeypatch):
    monkeypatch.delenv("CUMA_OUTER", raising=False)
    cpu = torch.device("cpu")
    assert grouped_lora.reads_once(16384, 4096, 64, 8, 2, cpu)  # q_proj dA, dB
    assert grouped_lora.reads_once(16384, 1024, 64, 8, 2, cpu)  # v_proj dB
    assert not grouped_lora.reads_once(16384, 4096, 64, 16, 2, cpu)  # 120 sets: their partials outweigh x
    assert not grouped_lora.reads_once(1000, 4096, 64, 8, 2, cpu)  # pair-major: tokens do not walk in set order
    assert not grouped_lora.reads_once(16384, 4096, 128, 8, 2, cpu)  # k rank tiles past one accumulator
    monkeypatch.setenv("CUMA_OUTER", "segments")
    assert not grouped_lora.reads_once(16384, 4096, 64, 8, 2, cpu)
    monkeypatch.setenv("CUMA_OUTER", "sets")
    assert grouped_lora.reads_once(1000, 4096, 64, 16, 2, cpu)
    assert not grouped_lora.reads_once(1000, 4096, 64, 2 ** 31, 2, cpu)  # set keys would wrap: never
    assert not grouped_lora.reads_once(1000, 4096, 128, 8, 2, cpu)  # nor past one accumulator
    monkeypatch.setenv("CUMA_OUTER", "fast")
    with pytest.raises(ValueError, match="CUMA_OUTER must be auto, sets or segments, got 'fast'"):
        grouped_lora.reads_once(1000, 4096, 64, 8, 2, cpu)

"""Shared-prefix packing: the layout, and the same losses, gradients, scores and training as today's padded rows."""
import numpy as np
import pytest
import torch
from test_train import curve, options, parts, survey
from tiny_models import randomize_experts, tiny_decoder

import cuma_model
from cuma_model.survey import data as D
from cuma_model.survey import evaluate as E
from cuma_model.survey import train as T
from cuma_model.survey.packing import (
    common_prefix_length,
    indices_by_key,
    pack,
    prefix_groups,
)


def test_pack_layout():
    b = pack([[[5, 6, 7, 8], [5, 6, 9]], [[4, 3]]], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [4, 3, 0, 0, 0]]
    # the remainders continue the prefix's positions; the prefix stands for both of its sequences
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 0, 0, 0]]
    assert b.token_weights.tolist() == [[2, 2, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert b.ends.tolist() == [[0, 3], [0, 4], [1, 1]]
    seen = b.attention_mask[0, 0]
    assert seen[4].tolist() == [True, True, False, False, True]  # the second remainder: prefix and itself
    assert seen[3].tolist() == [True, True, True, True, False]
    assert not b.attention_mask[0, 0].triu(1).any()  # causal
    assert b.attention_mask[1, 0].diagonal().all()  # padding sees itself: no empty softmax row
    columns, index = b.logit_columns(offset=-1)
    assert columns.tolist() == [0, 2, 3] and columns[index].tolist() == [2, 3, 0]
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 5]]) == 1
    assert indices_by_key(["a", "b", "a"]) == [[0, 2], [1]]
    # a sequence whose next-to-last token is read keeps two tokens of its own
    b = pack([[[5, 6, 7], [5, 6]]], pad_id=0, own_tokens=2)
    assert b.input_ids.tolist() == [[5, 6, 7, 5, 6]] and b.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    with pytest.raises(ValueError, match="empty"):
        pack([[[1, 2], []]], pad_id=0)
    with pytest.raises(ValueError, match="own_tokens"):
        pack([[[1]]], pad_id=0, own_tokens=2)


def random_groups(rng, sizes, vocab=90):
    """Groups of token rows that share a prefix of random length, with remainders of random lengths."""
    groups = []
    for size in sizes:
        prefix = rng.integers(3, vocab, size=int(rng.integers(2, 9))).tolist()
        groups.append([prefix + rng.integers(3, vocab, size=int(rng.integers(1, 7))).tolist() for _ in range(size)])
    return groups


def adapted(method, dtype=torch.float64, **config):
    # float64: the top-k choice is discontinuous, and fp32 rounding (which differs between the two layouts' matmul
    # shapes) can flip a near tie between two experts
    model = tiny_decoder("llama", seed=0, dtype=dtype, **config)
    assert model.config._attn_implementation == config.get("attn_implementation", "sdpa")
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    else:
        cuma_model.patch_model(model, num_experts=4, top_k=2, r=4, router_hidden_dim=16,
                               demographic_dim=4 if method == "cuma" else 0, shared_A=False)
        randomize_experts(model)
    return model.train()


@pytest.mark.parametrize("method, attention", [("cuma", "sdpa"), ("mixlora", "sdpa"), ("lora", "sdpa"),
                                               ("lora", "eager")])
def test_packed_batch_gives_the_padded_losses_and_gradients(method, attention):
    rng = np.random.default_rng(0)
    groups = random_groups(rng, [3, 1, 4, 2])
    z_table = torch.randn(len(groups), 4, dtype=torch.float64)  # (lora: unused)
    rows = [(seq, int(rng.integers(3, 90)), g, g) for g, seqs in enumerate(groups) for seq in seqs]
    # eager attention's padded rows are NaN in float64 (a fully masked padding row), so that one runs in float32
    dtype = torch.float64 if attention == "sdpa" else torch.float32
    model = adapted(method, dtype, attn_implementation=attention)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for pack_rows in (False, True):
        batch = T.make_collate(0, packed_for=model if pack_rows else None)(rows)
        ce, aux = T._forward_loss(model, batch, z_table, {"logits_to_keep": 2}, method == "cuma", method != "lora")
        loss = ce + aux if aux is not None else ce
        results[pack_rows] = (ce.detach(), aux, torch.autograd.grad(loss, params))
    assert results[True][0].item() > 0
    torch.testing.assert_close(results[True][0], results[False][0], **tol)
    # the load-balancing loss counts a shared prefix once per sequence, as the padded rows do (its gates are fp32)
    if method != "lora":
        torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-6, atol=1e-9)
    for packed, padded in zip(results[True][2], results[False][2]):
        assert padded.abs().sum() > 0
        torch.testing.assert_close(packed, padded, rtol=1e-6, atol=1e-9 if dtype == torch.float64 else 1e-6)


def test_load_balancing_weights_count_a_token_as_often_as_its_weight():
    gates = torch.softmax(torch.randn(5, 4), -1)
    gates = gates * (gates >= gates.topk(2, -1).values[:, -1:])  # top-2 of 4, zeros elsewhere
    weights = torch.tensor([3.0, 1.0, 0.0, 2.0, 1.0])
    repeated = gates.repeat_interleave(weights.long(), dim=0)
    torch.testing.assert_close(cuma_model.load_balancing_loss(gates, 2, weights),
                               cuma_model.load_balancing_loss(repeated, 2))


def test_scoring_with_prefix_groups_gives_the_padded_scores():
    p = parts()
    model, tok = p["model"], p["tokenizer"]
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=4, router_hidden_dim=16, demographic_dim=4)
    randomize_experts(model)
    ev = survey(n_resp=7, seed=3)[1:]  # respondents with 2 and 3 questions
    table, index = p["encoder"].encode_unique([e.profile for e in ev])
    z = table[index] + 0.1 * torch.tensor([float(e.respondent_id) for e in ev])[:, None]  # one z per respondent
    prompts = D.render_prompts(tok, ev)
    letters = [e.letters for e in ev]
    padded = E.score_choices(model, tok, prompts, letters, demographic_embeds=z, batch_size=4, progress=False)
    seen = []
    packed = E.score_choices(model, tok, prompts, letters, demographic_embeds=z, batch_size=4, progress=False,
                             prefix_groups=[e.respondent_id for e in ev],
                             on_batch=lambda rows, w: seen.append((rows, w.sum(1).tolist())))
    for a, b in zip(packed, padded):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert sorted(i for rows, _ in seen for row in rows for i in row) == list(range(len(ev)))
    assert all(len({ev[i].respondent_id for i in row}) == 1 for rows, _ in seen for row in rows)
    lengths = [len(tok.encode(x, add_special_tokens=False)) for x in prompts]
    # every token counted as often as the padded rows hold it
    assert sum(w for _, ws in seen for w in ws) == sum(lengths)
    with pytest.raises(ValueError, match="demographic_embeds"):
        E.score_choices(model, tok, prompts, letters, demographic_embeds=torch.randn(len(ev), 4), progress=False,
                        prefix_groups=[e.respondent_id for e in ev])


def test_grouped_sampler_keeps_groups_together_and_is_a_function_of_seed_and_epoch():
    groups = [[0, 1, 2], [3], [4, 5], [6, 7, 8, 9], [10, 11]]
    sampler = T.EpochBatchSampler(12, 4, seed=3, groups=groups)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 and all(len(b) == 4 for b in batches)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(12))
    starts = [flat.index(g[0]) for g in groups]
    assert all(flat[s: s + len(g)] == g for s, g in zip(starts, groups))  # each group's indices in a run
    assert list(T.EpochBatchSampler(12, 4, seed=3, groups=groups)) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    # each index alone is the plain shuffle
    assert list(T.EpochBatchSampler(12, 4, 3, [[i] for i in range(12)])) == list(T.EpochBatchSampler(12, 4, 3))
    with pytest.raises(ValueError, match="once"):
        T.EpochBatchSampler(4, 2, 0, groups=[[0, 1], [1, 2, 3]])


def test_questions_of_respondents_subset():
    examples = survey(n_resp=40)
    picked = D.subsample_questions_of_respondents(examples, 30, per_respondent=2, seed=1)
    assert len(picked) == 30
    per = {}
    for e in picked:
        per[e.respondent_id] = per.get(e.respondent_id, 0) + 1
    assert set(per.values()) == {2} and len(per) == 15
    assert picked == D.subsample_questions_of_respondents(examples, 30, per_respondent=2, seed=1)
    assert picked != D.subsample_questions_of_respondents(examples, 30, per_respondent=2, seed=2)
    assert [examples.index(e) for e in picked] == sorted(examples.index(e) for e in picked)  # input order
    assert prefix_groups(["a", "b", "a", "a", "a"], 3) == [[0, 2, 3], [4], [1]]


def test_a_packed_run_trains_and_scores_as_the_padded_run(tmp_path, monkeypatch):
    common = dict(method="cuma", train_examples=48, questions_per_respondent=3, epochs=2, eval_examples=30,
                  routing_examples=0)
    packed = T.train(options(tmp_path, output_dir=str(tmp_path / "packed"), **common), **parts())
    collate, score = T.make_collate, E.score_choices
    monkeypatch.setattr(T, "make_collate", lambda pad_id, packed_for=None: collate(pad_id))
    monkeypatch.setattr(E, "score_choices", lambda *a, prefix_groups=None, **k: score(*a, **k))
    padded = T.train(options(tmp_path, output_dir=str(tmp_path / "padded"), **common), **parts())
    assert packed["data"]["n_train"] == 48 and len(curve(packed)) == 12
    np.testing.assert_allclose(curve(packed), curve(padded), rtol=1e-4)
    assert packed["metrics"]["accuracy"] == padded["metrics"]["accuracy"]
    assert packed["metrics"]["nll"] == pytest.approx(padded["metrics"]["nll"], rel=1e-4)


def test_packing_refuses_an_attention_without_4d_masks():
    from cuma_model.survey.packing import attention_mask_for

    model = tiny_decoder("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2.*questions-per-respondent 0"):
        attention_mask_for(model, torch.ones(1, 1, 2, 2, dtype=torch.bool))


def test_a_subset_the_respondents_cannot_fill_is_refused_and_flash_attention_cannot_pack(tmp_path):
    # 3 questions per respondent: 2 of each cannot make 150 answers from the training split's respondents
    with pytest.raises(ValueError, match="only .* answers.*questions-per-respondent"):
        T.make_splits(survey(), T._args_from(options(tmp_path, train_examples=150, questions_per_respondent=2)))
    assert len(T.make_splits(survey(), T._args_from(options(tmp_path, train_examples=100))).train) == 100
    p = parts()
    p["model"].config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        T.train(options(tmp_path, method="lora", train_examples=30, questions_per_respondent=3), **p)

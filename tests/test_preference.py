"""Preference training with TRL: survey pairs, the GRPO reward, and z reaching every row of DPO and GRPO forwards."""
import string
import zlib

import numpy as np
import pytest
import torch

import cuma_model
from cuma_model.survey import preference as P
from cuma_model.context import active_state, is_disabled, pending_embeds
from cuma_model.survey.data import SurveyExample
from tiny_models import randomize_experts, tiny_decoder

D = 6
PROFILES = ["You are from Ohio, age 30.", "You are from Texas, age 71.", "You are from Maine, age 45.",
            "You are from Utah, age 22."]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def char_tokenizer():
    """One token per character (so prompt + completion always tokenizes as prompt tokens + completion tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = specials + sorted(set(string.printable))
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = TEMPLATE
    return fast


def fake_encoder(texts):
    """Deterministic z per text (a stand-in for DemographicEncoder: texts -> [N, D] float32)."""
    rows = [torch.randn(D, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts]
    return torch.stack(rows)


def example(i, target, k=3, qid="q1"):
    return SurveyExample(respondent_id=f"r{i}", question_id=qid, profile=PROFILES[i % len(PROFILES)], groups={},
                         question="Spend on parks?", choices=("too little", "about right", "too much", "far too much")[:k],
                         scores=tuple(float(s) for s in range(k)), scale=(0.0, float(k - 1)), target=target)


def tiny_policy(tok, seed=0, **kw):
    model = tiny_decoder("llama", seed=seed, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None)
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=2, demographic_dim=D, router_hidden_dim=8, **kw)
    randomize_experts(model, std=0.3, seed=seed + 1)  # stands in for a trained SFT adapter (B != 0)
    return model


class RowRecorder:
    """Forward pre-hook on one adapted projection: (rows, z rows, adapters disabled?) of every forward."""

    def __init__(self, model, tok):
        self.model, self.tok, self.calls = model, tok, []
        self.hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(self)

    def __call__(self, module, args):
        state = active_state(self.model.cuma)
        z = state.demographic_embeds if state is not None else pending_embeds(self.model.cuma)
        self.calls.append((args[0].shape[0], None if z is None else z.detach().clone(), is_disabled(self.model.cuma)))

    def remove(self):
        self.hook.remove()


def profile_in(text):
    hits = [p for p in PROFILES if p in text]
    assert len(hits) == 1, text
    return hits[0]


def assert_rows_carry_their_profile(texts, z):
    """Row r of the model input (decoded) contains profile p  <=>  z row r is encoder(p)."""
    assert z.shape[0] == len(texts)
    expected = fake_encoder([profile_in(t) for t in texts])
    torch.testing.assert_close(z.cpu(), expected)


# ---------------------------------------------------------------------------------------------------- survey pairs

def test_survey_pairs_chosen_is_the_answer_rejected_is_another_option():
    tok = char_tokenizer()
    examples = [example(i, target=i % 3) for i in range(12)]
    pairs = P.survey_preference_pairs(examples, seed=3, tokenizer=tok)
    assert len(pairs) == 12
    for e, p in zip(examples, pairs):
        assert p["chosen"] == e.target_letter and p["answer"] == e.target_letter
        assert p["rejected"] != p["chosen"] and p["rejected"] in e.letters
        assert p["profile"] == e.profile and e.profile in p["prompt"] and "A. too little" in p["prompt"]
        assert p["prompt"].endswith("<|im_start|>assistant\n")
        # farthest on the ordinal scale: answer 0 -> C, answer 2 -> A, answer 1 -> A or C (seeded tie)
        far = {0: {"C"}, 1: {"A", "C"}, 2: {"A"}}[e.target]
        assert p["rejected"] in far
    ties = [p["rejected"] for e, p in zip(examples, pairs) if e.target == 1]
    assert pairs == P.survey_preference_pairs(examples, seed=3, tokenizer=tok)  # seeded
    assert {p["rejected"] for p in P.survey_preference_pairs(examples * 4, seed=0, tokenizer=tok)
            if p["answer"] == "B"} == {"A", "C"}  # both ends get drawn
    assert ties
    rnd = P.survey_preference_pairs([example(0, 0, k=4)] * 40, seed=1, tokenizer=tok, rejected="random")
    assert {p["rejected"] for p in rnd} == {"B", "C", "D"}
    conv = P.survey_preference_pairs(examples[:1], seed=0)  # no tokenizer: conversational pairs for TRL
    assert conv[0]["prompt"][0] == {"role": "system", "content": PROFILES[0]}
    assert conv[0]["chosen"] == [{"role": "assistant", "content": "A"}]
    with pytest.raises(ValueError):
        P.rejected_choice(example(0, 0, k=1), np.random.default_rng(0))


def test_survey_pairs_on_real_gss_spending():
    from cuma_model.survey.data import load_survey

    examples = load_survey("gss_spending", max_respondents=20, seed=0)
    pairs = P.survey_preference_pairs(examples, seed=0, tokenizer=char_tokenizer())
    assert len(pairs) == len(examples) > 20
    assert all(p["chosen"] == e.target_letter != p["rejected"] for e, p in zip(examples, pairs))


def test_load_preference_data_checks_columns(tmp_path):
    import json

    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"prompt": "q", "chosen": "A", "rejected": "B", "profile": PROFILES[0]})
                              for _ in range(3)))
    assert len(P.load_preference_data(good)) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "A", "rejected": "B"}))
    with pytest.raises(ValueError, match="profile"):
        P.load_preference_data(bad)


# ---------------------------------------------------------------------------------------------------- reward

def test_first_letter_and_survey_answer_reward():
    assert [P.first_letter(c) for c in ["B", " B.", "(C) too much", "**A**", "About right", "b", "", "7"]] == \
        ["B", "B", "C", "A", None, None, None, None]
    assert P.first_letter([{"role": "assistant", "content": " C"}]) == "C"
    letters, scores = ["A", "B", "C"], [1.0, 2.0, 3.0]
    r = P.survey_answer_reward(["A", "B", "C", "D", "nope", [{"role": "assistant", "content": "A"}]],
                               answer=["A"] * 6, letters=[letters] * 6, scores=[scores] * 6)
    assert r == [1.0, 0.25, 0.0, 0.0, 0.0, 1.0]
    assert P.survey_answer_reward(["B"], ["B"], [letters], [scores]) == [1.0]
    assert P.survey_answer_reward(["C"], ["B"], [letters], [scores], partial=1.0) == [0.5]


# ---------------------------------------------------------------------------------------------------- DPO

def dpo_setup(tmp_path, reference="base", precompute=True, n=4, batch=2, **cfg):
    from datasets import Dataset
    from trl import DPOConfig

    tok = char_tokenizer()
    model = tiny_policy(tok)
    pairs = P.survey_preference_pairs([example(i, target=i % 3) for i in range(n)], seed=0, tokenizer=tok)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=batch, max_steps=1, learning_rate=1e-3,
                     logging_steps=1, save_strategy="no", report_to="none", bf16=False, max_length=None,
                     precompute_ref_log_probs=precompute, dataloader_num_workers=0, seed=0, **cfg)
    trainer = P.make_dpo_trainer(model, args, Dataset.from_list(pairs), tok, fake_encoder, reference=reference)
    return trainer, model, tok


def completion_logps(model, ids, completion_len, z=None):
    """Sum of log p(completion tokens) for one prompt+completion sequence, by a plain forward."""
    x = torch.tensor([ids])
    kw = {} if z is None else {"demographic_embeds": z[None]}
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x, **kw).logits[0, :-1].float(), -1)
    targets = x[0, 1:]
    per_tok = logp.gather(-1, targets[:, None])[:, 0]
    return per_tok[-completion_len:].sum().item()


@pytest.mark.parametrize("reference", ["base", "sft"])
def test_dpo_precomputed_reference_is_base_or_sft(tmp_path, reference):
    trainer, model, tok = dpo_setup(tmp_path, reference=reference)
    ds = trainer.train_dataset
    base = tiny_decoder("llama", seed=0, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id, bos_token_id=None)
    for row in ds:
        ids = row["prompt_ids"] + row["chosen_ids"]
        z = fake_encoder([row["profile"]])[0]
        want_base = completion_logps(base, ids, len(row["chosen_ids"]))
        want_sft = completion_logps(model, ids, len(row["chosen_ids"]), z)
        assert abs(want_base - want_sft) > 1e-3  # the adapter changes the answer's log-prob
        want = want_base if reference == "base" else want_sft
        assert row["ref_chosen_logps"] == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_dpo_step_sees_z_z_rows_in_trl_order_and_adds_the_aux_loss(tmp_path):
    trainer, model, tok = dpo_setup(tmp_path, reference="base", precompute=False, n=4, batch=2)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch[P.EMBEDS_KEY].shape == (2, D)
    rec = RowRecorder(model, tok)
    model.train()
    loss = trainer.compute_loss(model, batch)
    rec.remove()
    texts = tok.batch_decode(batch["input_ids"], skip_special_tokens=False)
    # the policy forward, then the reference forward: the same model with its adapters disabled (the base)
    assert [(rows, disabled) for rows, _, disabled in rec.calls] == [(4, False), (4, True)]
    z = rec.calls[0][1]
    torch.testing.assert_close(rec.calls[1][1], z)
    torch.testing.assert_close(z[:2], z[2:])  # [z; z]: chosen rows then rejected rows
    assert_rows_carry_their_profile(texts, z)
    for i in range(2):  # row i and row 2 + i are one pair: same prompt, chosen then rejected
        assert texts[i].split("assistant\n")[0] == texts[2 + i].split("assistant\n")[0]
    aux = trainer._cuma_last_aux
    assert aux is not None and aux.item() > 0
    model.cuma.config.aux_loss_coef = 0.0
    without = trainer.compute_loss(model, batch)
    model.cuma.config.aux_loss_coef = 0.01
    torch.testing.assert_close(loss, without + aux, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reference,precompute", [("base", False), ("sft", False), ("sft", True)])
def test_dpo_trains_one_step(tmp_path, reference, precompute):
    trainer, model, tok = dpo_setup(tmp_path, reference=reference, precompute=precompute)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = trainer.state.log_history[0]
    assert np.isfinite(logs["loss"]) and "aux_loss" in logs and "rewards/accuracies" in logs
    if reference == "sft":  # the policy starts as its own reference
        assert logs["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    else:
        assert abs(logs["rewards/chosen"]) > 1e-6
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("cuma_B" in n for n in changed) and any("router" in n for n in changed)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and not any(p.grad is not None for n, p in model.named_parameters() if not p.requires_grad)


# ---------------------------------------------------------------------------------------------------- GRPO

def test_grpo_step_repeats_z_per_completion(tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig

    tok = char_tokenizer()
    model = tiny_policy(tok)
    pairs = P.survey_preference_pairs([example(i, target=i % 3) for i in range(4)], seed=0, tokenizer=tok)
    rows = [{k: p[k] for k in ("prompt", "profile", "answer", "letters", "scores")} for p in pairs]
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_steps=1,
                      max_completion_length=3, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                      report_to="none", bf16=False, seed=0, beta=0.04, dataloader_num_workers=0)
    trainer = P.make_grpo_trainer(model, [P.survey_answer_reward], args, train_dataset=Dataset.from_list(rows),
                                  processing_class=tok, encoder=fake_encoder)
    generated = {}
    orig = trainer._generate_and_score_completions

    def spy(inputs):
        out = orig(inputs)
        generated["profiles"] = [x["profile"] for x in inputs]
        generated["out"] = out
        return out

    trainer._generate_and_score_completions = spy
    rec = RowRecorder(model, tok)
    trainer.train()
    rec.remove()
    profiles = generated["profiles"]
    assert len(profiles) == 4 and profiles[0] == profiles[1] and profiles[2] == profiles[3]  # G=2 per prompt
    z_gen = generated["out"][P.EMBEDS_KEY]
    unique = fake_encoder(profiles[::2])
    torch.testing.assert_close(z_gen.cpu(), unique.repeat_interleave(2, dim=0))
    routed = [(n, z) for n, z, disabled in rec.calls if not disabled]
    assert any(disabled for *_, disabled in rec.calls)  # beta > 0: the KL reference is the base
    assert routed and all(n == 4 and z.shape == (4, D) for n, z in routed)
    # the first routed forward is generation's prefill: rows in sampler order, z repeat_interleaved
    torch.testing.assert_close(routed[0][1].cpu(), unique.repeat_interleave(2, dim=0))
    # the loss forward (last) runs on TRL's shuffled rows: each row still carries its own z
    out = generated["out"]
    texts = tok.batch_decode(torch.cat([out["prompt_ids"], out["completion_ids"]], 1), skip_special_tokens=False)
    assert_rows_carry_their_profile(texts, out[P.EMBEDS_KEY])
    torch.testing.assert_close(routed[-1][1], out[P.EMBEDS_KEY])
    logs = trainer.state.log_history[0]
    assert "aux_loss" in logs and np.isfinite(logs["loss"]) and "kl" in logs


# ---------------------------------------------------------------------------------------------------- CLI

def test_cli_dpo_from_sft_checkpoint_saves_final_adapter(tmp_path):
    tok = char_tokenizer()
    sft = tiny_policy(tok)
    cuma_model.save_pretrained(sft, tmp_path / "sft")
    base = tiny_decoder("llama", seed=0, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id, bos_token_id=None)
    argv = ["--stage", "dpo", "--sft-checkpoint", str(tmp_path / "sft"), "--max-respondents", "6",
            "--max-steps", "1", "--batch-size", "2", "--learning-rate", "1e-3", "--output-dir", str(tmp_path / "out")]
    assert P.build_parser().parse_args(argv).reference == "base"
    result = P.run_preference(argv, model=base, tokenizer=tok, encoder=fake_encoder)
    assert result["global_step"] == 1 and result["rows"] == 2
    assert (tmp_path / "out" / "preference_result.json").is_file()
    final = tmp_path / "out" / "final"
    assert sorted(p.name for p in final.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    reloaded = cuma_model.from_pretrained(tiny_decoder("llama", seed=0, vocab_size=len(tok)), final)
    trained = dict(base.named_parameters())
    changed = [n for n, p in reloaded.named_parameters() if p.requires_grad
               and not torch.equal(p, dict(sft.named_parameters())[n])]
    assert changed and all(torch.equal(p, trained[n]) for n, p in reloaded.named_parameters() if p.requires_grad)


def test_training_script_dispatches_preference_stages(monkeypatch):
    from cuma_model.survey import train

    seen = []
    monkeypatch.setattr(P, "main", lambda argv: seen.append(argv) or 0)
    argv = ["--stage", "grpo", "--sft-checkpoint", "runs/cuma/final", "--max-steps", "3"]
    assert train.main(argv) == 0 and seen == [argv]

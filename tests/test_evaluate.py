import json

import numpy as np
import pytest
import torch

from cuma_model.survey import evaluate as E
from cuma_model.survey.data import SurveyExample
from tiny_models import CHAT_TEMPLATE, word_tokenizer


def ex(rid, qid, target, groups, k=3):
    return SurveyExample(respondent_id=str(rid), question_id=qid, profile=f"person {rid}", groups=groups,
                         question=f"question {qid}?", choices=tuple(f"c{i}" for i in range(k)),
                         scores=tuple(float(i) for i in range(k)), scale=(0.0, float(k - 1)), target=target)


def synthetic_survey(n_resp, seed, noise=0.1):
    """Answers depend on party: d -> 0, r -> 2, i -> 1 (with `noise` random answers)."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(n_resp):
        party = rng.choice(["d", "r", "i"], p=[0.45, 0.35, 0.2])
        sex = rng.choice(["f", "m"])
        for q in ("q1", "q2", "q3"):
            t = {"d": 0, "r": 2, "i": 1}[party]
            if q == "q2":
                t = 2 - t
            if rng.random() < noise:
                t = int(rng.integers(0, 3))
            out.append(ex(f"{seed}-{r}", q, t, {"party": party, "sex": sex}))
    return out


# ---------------------------------------------------------------------------------------------------- floors

def test_question_majority_hand():
    train = [ex(1, "q1", 2, {}), ex(2, "q1", 2, {}), ex(3, "q1", 0, {}), ex(4, "q2", 1, {}), ex(5, "q2", 0, {})]
    test = [ex(9, "q1", 0, {}), ex(9, "q2", 0, {}), ex(9, "q9", 1, {})]
    pred = E.QuestionMajority().fit(train).predict(test)
    # q2 ties between 0 and 1: lowest index; unseen q9: choice 0
    assert pred.choice_idx.tolist() == [2, 0, 0]
    np.testing.assert_allclose(np.exp(pred.choice_logits[0]), [2 / 6, 1 / 6, 3 / 6], rtol=1e-6)


def test_group_majority_backoff():
    g = lambda p, s: {"party": p, "sex": s}
    train = [ex(1, "q1", 1, g("d", "f")), ex(2, "q1", 1, g("d", "f")), ex(3, "q1", 2, g("d", "m")),
             ex(4, "q1", 0, g("r", "f")), ex(5, "q1", 0, g("r", "f")), ex(6, "q1", 0, g("r", "f"))]
    test = [ex(7, "q1", 0, g("d", "f")),   # full group (2 rows) -> 1
            ex(8, "q1", 0, g("d", "m")),   # (d, m) has 1 row < 2 -> party d: {1: 2, 2: 1} -> 1
            ex(9, "q1", 0, g("r", "m")),   # unseen combination -> party r -> 0
            ex(10, "q1", 0, g("x", "f"))]  # unseen party -> question majority {0: 3, 1: 2, 2: 1} -> 0
    gm = E.GroupMajority(["party", "sex"], min_count=2).fit(train)
    assert gm.predict(test).choice_idx.tolist() == [1, 1, 0, 0]
    assert gm.backoff_levels_ == {2: 1, 1: 2, 0: 1}
    # without back-off the thin (d, m) group would answer 2
    assert E.GroupMajority(["party", "sex"], min_count=1).fit(train).predict(test[1:2]).choice_idx.tolist() == [2]
    # sex first: (d, m) backs off to sex m, seen once -> question majority
    assert E.GroupMajority(["sex", "party"], min_count=2).fit(train).predict(test[1:2]).choice_idx.tolist() == [0]


def test_logistic_regression_beats_question_majority():
    train, test = synthetic_survey(150, seed=0), synthetic_survey(60, seed=1)
    preds = E.run_baselines(train, test)
    true = np.array([e.target for e in test])
    acc = {k: float(np.mean(p.choice_idx == true)) for k, p in preds.items()}
    assert acc["question_majority"] < 0.6
    assert acc["logistic_regression"] > acc["question_majority"] + 0.3
    assert acc["group_majority"] > acc["question_majority"] + 0.3
    lr = preds["logistic_regression"]
    assert all(z.shape == (3,) and z.dtype == np.float32 for z in lr.choice_logits)
    assert lr.choice_idx.tolist() == [int(np.argmax(z)) for z in lr.choice_logits]


# ---------------------------------------------------------------------------------------------------- metrics dict

def test_evaluate_predictions_perfect_and_collapsed():
    test = synthetic_survey(40, seed=3)
    true = np.array([e.target for e in test])
    m = E.evaluate_predictions(test, true, [np.eye(3)[t] * 10 for t in true])
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["emd"]["mean"] == 0.0
    assert m["group_gaps"]["js"] == pytest.approx(0.0, abs=1e-12)
    assert m["group_gaps"]["between_group_spread"]["ratio"] == pytest.approx(1.0)
    assert m["entropy"]["mean"] < 1e-3
    assert 0 < m["nll"] < 1e-3
    json.dumps(m, allow_nan=False)

    collapsed = E.evaluate_predictions(test, np.zeros(len(test), dtype=int), [np.zeros(3)] * len(test))
    assert collapsed["group_gaps"]["between_group_spread"]["pred_js"] == pytest.approx(0.0)
    assert collapsed["group_gaps"]["between_group_spread"]["ratio"] == pytest.approx(0.0)
    assert collapsed["group_gaps"]["between_group_spread"]["ratio_soft"] == pytest.approx(0.0)
    assert m["group_gaps"]["between_group_spread"]["ratio_soft"] == pytest.approx(1.0, abs=1e-3)
    assert collapsed["entropy"]["mean_normalized"] == pytest.approx(1.0)
    assert collapsed["nll"] == pytest.approx(np.log(3))
    assert collapsed["emd"]["mean"] > 0.1
    assert "party" in collapsed["sigma_inequity"]["per_dimension"]
    json.dumps(collapsed, allow_nan=False)

    report = E.format_report({"perfect": m, "collapsed": collapsed})
    lines = report.splitlines()
    assert lines[0].split()[:4] == ["method", "NLL", "Brier", "RPS"]  # proper scores lead
    assert lines[2].startswith("perfect") and "1.0000" in lines[2] and lines[3].startswith("collapsed")
    md = E.write_markdown_table({"perfect": m})
    assert md.startswith("| method | NLL | Brier | RPS |") and "| perfect | 0.000" in md

    with pytest.raises(ValueError):
        E.evaluate_predictions(test[:2], [0, 3])
    with pytest.raises(ValueError):
        E.evaluate_predictions(test[:2], [0])


def test_predictions_jsonl_roundtrip(tmp_path):
    test = synthetic_survey(5, seed=4)
    pred = np.arange(len(test)) % 3
    logits = [np.array([0.5, -1.0, 2.0], dtype=np.float32)] * len(test)
    E.write_predictions_jsonl(tmp_path / "p.jsonl", test, pred, logits)
    back, pred2, logits2 = E.read_predictions_jsonl(tmp_path / "p.jsonl")
    assert back == test and pred2.tolist() == pred.tolist()
    np.testing.assert_array_equal(logits2[0], logits[0])


def test_cli_baselines_and_run_dir(tmp_path, capsys):
    E.write_examples_jsonl(tmp_path / "train.jsonl", synthetic_survey(60, seed=5))
    test = synthetic_survey(20, seed=6)
    E.write_examples_jsonl(tmp_path / "test.jsonl", test)
    run = tmp_path / "run"
    E.write_predictions_jsonl(run / "predictions.jsonl", test, [e.target for e in test])
    E.routing_usage_table([([("layer.0", np.zeros((1, 2, 1), dtype=int))], np.ones((1, 2)), [{"party": "d"}])]) \
        .to_csv(run / "routing_usage.csv", index=False)
    rc = E.main(["--baselines", "--train", str(tmp_path / "train.jsonl"), "--test", str(tmp_path / "test.jsonl"),
                 "--out", str(tmp_path / "floors"), "--run-dir", str(run), "--plot-dimension", "party",
                 "--markdown", str(tmp_path / "t.md")])
    assert rc == 0
    out = capsys.readouterr().out
    for name in ("question_majority", "group_majority", "logistic_regression", "run"):
        assert name in out
    m = json.loads((run / "metrics.json").read_text())
    assert m["accuracy"] == 1.0 and m["entropy"] is None and m["nll"] is None
    assert (run / "answer_shares_party.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "routing_party.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "floors" / "logistic_regression" / "metrics.json").exists()
    assert "| run |" in (tmp_path / "t.md").read_text()


def test_evaluate_run_keeps_a_training_summary(tmp_path):
    test = synthetic_survey(10, seed=7)
    E.write_predictions_jsonl(tmp_path / "predictions.jsonl", test, [e.target for e in test])
    summary = {"method": "cuma", "timings": {"total_s": 12.0}, "metrics": {"accuracy": 0.0}}
    (tmp_path / "metrics.json").write_text(json.dumps(summary))
    E.evaluate_run(tmp_path, plot_dimensions=[])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["method"] == "cuma" and saved["timings"] == {"total_s": 12.0}
    assert saved["metrics"]["accuracy"] == 1.0


# ---------------------------------------------------------------------------------------------------- routing report

class Rec:
    def __init__(self, key, idx, w):
        self.router_key, self.topk_idx, self.topk_weights = key, idx, w


def test_routing_usage_shares_and_padding(tmp_path):
    # batch of 2, S=4, k=2; row 0 is left padded by one token routed to expert 3, which must not count
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    idx = torch.tensor([[[3, 3], [0, 1], [0, 1], [0, 2]],
                        [[1, 2], [1, 2], [1, 2], [2, 1]]])
    w = torch.full((2, 4, 2), 0.5)
    w[0, 1] = torch.tensor([0.9, 0.1])
    recs = [Rec("layer.0", idx, w), Rec("layer.1", idx.flip(-1), w)]
    groups = [{"party": "d", "sex": "f"}, {"party": "r", "sex": "f"}]
    usage = E.RoutingUsage()
    usage.add(recs, mask, groups)
    t = usage.table(num_experts=5)
    assert list(t.columns) == ["dimension", "group", "router", "expert", "count", "share"]
    sums = t.groupby(["dimension", "group", "router"])["share"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0)
    d0 = t[(t.dimension == "party") & (t.group == "d") & (t.router == "layer.0")].set_index("expert")["share"]
    np.testing.assert_allclose(d0.to_numpy(), [3 / 6, 2 / 6, 1 / 6, 0, 0])
    f0 = t[(t.dimension == "sex") & (t.group == "f") & (t.router == "layer.0")].set_index("expert")["count"]
    np.testing.assert_allclose(f0.to_numpy(), [3, 6, 5, 0, 0])
    assert set(t.dimension) == {"all", "party", "sex"}

    # a second batch accumulates
    usage.add([Rec("layer.0", torch.zeros(1, 2, 2, dtype=torch.long), None)], torch.ones(1, 2), [{"party": "d"}])
    d0 = usage.table().query("dimension == 'party' and group == 'd' and router == 'layer.0'")
    np.testing.assert_allclose(d0["count"].to_numpy(), [7, 2, 1, 0])

    weighted = E.routing_usage_table([(recs, mask, groups)], weighted=True)
    wd = weighted.query("dimension == 'party' and group == 'd' and router == 'layer.0'")["count"].to_numpy()
    np.testing.assert_allclose(wd, [0.9 + 0.5 + 0.5, 0.1 + 0.5, 0.5, 0])

    with pytest.raises(ValueError):
        usage.add(recs, mask[:, :3], groups)

    from cuma_model.survey.plots import plot_routing_heatmap
    png = plot_routing_heatmap(t, "party", tmp_path / "r.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1000


# ---------------------------------------------------------------------------------------------------- model scoring

WORDS = ["you", "are", "a", "person", "from", "ohio", "texas", "which", "one", "?", "answer", "options", "user",
         "assistant", "system", "party", "democrat", "republican"]
LETTERS = ["A", "B", "C", "D"]
TEMPLATE = CHAT_TEMPLATE


def tiny_tokenizer(template=TEMPLATE):
    return word_tokenizer(WORDS, LETTERS, template)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


def prompts_of(tok, n=7, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 12))))
        out.append(tok.apply_chat_template([{"role": "user", "content": words}], tokenize=False,
                                           add_generation_prompt=True))
    return out


def test_letter_token_ids_follow_chat_template():
    tok = tiny_tokenizer()
    ids = E.letter_token_ids(tok, ["A", "B", "A"])
    # the template puts a space between "assistant" and the answer, so the model emits "▁A", not the bare "A"
    assert ids == {"A": tok.convert_tokens_to_ids("▁A"), "B": tok.convert_tokens_to_ids("▁B")}
    no_template = tiny_tokenizer(template=None)
    assert E.letter_token_ids(no_template, ["C"]) == {"C": tok.convert_tokens_to_ids("C")}
    with pytest.raises(ValueError):
        E.letter_token_ids(no_template, ["Z"])


def reference_scores(model, tok, prompts, letters):
    ids = E.letter_token_ids(tok, LETTERS)
    out = []
    with torch.no_grad():
        for p, ls in zip(prompts, letters):
            x = torch.tensor([tok.encode(p, add_special_tokens=False)])
            out.append(model(input_ids=x).logits[0, -1, [ids[l] for l in ls]].numpy())
    return out


def test_score_choices_left_padding_matches_alone(tiny_llama):
    model, tok = tiny_llama
    prompts = prompts_of(tok)
    letters = [LETTERS[: 2 + i % 3] for i in range(len(prompts))]
    lengths = {len(tok.encode(p, add_special_tokens=False)) for p in prompts}
    assert len(lengths) > 2  # batches really mix lengths
    ref = reference_scores(model, tok, prompts, letters)
    calls = []
    original = model.forward

    def spy(**kw):
        out = original(**kw)
        calls.append((kw.get("logits_to_keep"), tuple(out.logits.shape)))
        return out

    model.forward = spy
    try:
        got = E.score_choices(model, tok, prompts, letters, batch_size=4, progress=False)
    finally:
        del model.forward
    assert [c[0] for c in calls] == [1, 1] and all(s[1] == 1 for _, s in calls)
    for g, r, ls in zip(got, ref, letters):
        assert g.dtype == np.float32 and g.shape == (len(ls),)
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    alone = [E.score_choices(model, tok, [p], [ls], batch_size=1, progress=False)[0]
             for p, ls in zip(prompts, letters)]
    for g, a in zip(got, alone):
        np.testing.assert_allclose(g, a, rtol=1e-4, atol=1e-5)
    assert E.predict_from_logits(got).tolist() == [int(np.argmax(r)) for r in ref]


class Conditioned(torch.nn.Module):
    """Stands in for a CuMA-patched model: adds demographic_embeds[:, 0] to every logit."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.seen = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0,
                demographic_embeds=None):
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=use_cache, logits_to_keep=logits_to_keep)
        self.seen.append(demographic_embeds.shape)
        out.logits = out.logits + demographic_embeds[:, :1, None]
        return out


def test_score_choices_passes_demographic_rows(tiny_llama):
    model, tok = tiny_llama
    prompts = prompts_of(tok, n=5, seed=1)
    letters = [LETTERS] * 5
    z = torch.zeros(5, 3)
    z[:, 0] = torch.arange(5) * 100.0
    wrapped = Conditioned(model)
    got = E.score_choices(wrapped, tok, prompts, letters, demographic_embeds=z, batch_size=2, progress=False)
    plain = E.score_choices(model, tok, prompts, letters, batch_size=2, progress=False)
    assert [s for s in wrapped.seen] == [(2, 3), (2, 3), (1, 3)]
    for i in range(5):
        np.testing.assert_allclose(got[i] - plain[i], 100.0 * i, atol=1e-3)
    with pytest.raises(ValueError):
        E.score_choices(wrapped, tok, prompts, letters, demographic_embeds=z[:4], progress=False)


def test_score_choices_peft_model(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_llama
    prompts = prompts_of(tok, n=4, seed=2)
    letters = [LETTERS] * 4
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    try:
        got = E.score_choices(peft_model, tok, prompts, letters, batch_size=3, progress=False)
        ref = reference_scores(peft_model, tok, prompts, letters)
    finally:
        peft_model.unload()
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- proper scores

def test_cli_baselines_fit_temperatures_on_validation_and_show_sampled_twins(tmp_path, capsys):
    for name, n, seed in (("train", 60, 5), ("val", 20, 8), ("test", 20, 6)):
        E.write_examples_jsonl(tmp_path / f"{name}.jsonl", synthetic_survey(n, seed=seed))
    rc = E.main(["--baselines", *[f"--{n}={tmp_path / n}.jsonl" for n in ("train", "val", "test")],
                 "--out", str(tmp_path / "floors"), "--plot-dimension", "party"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:8] == ["method", "NLL", "Brier", "RPS", "T", "NLL@T", "Brier@T", "RPS@T"]
    assert "group_majority~sampled" in out and "noise floor of grp-JS/grp-TV" in out
    floor = tmp_path / "floors" / "group_majority"
    m = json.loads((floor / "metrics.json").read_text())
    val, _, val_logits = E.read_predictions_jsonl(floor / E.VAL_PREDICTIONS)
    assert m["calibrated"]["temperature"] == pytest.approx(E.temperature_of(val, val_logits))
    assert m["calibrated"]["nll"] is not None and m["intervals"]["calibrated_nll"]["lo"] <= m["calibrated"]["nll"]
    assert (floor / "reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_paired_differences_of_proper_scores_raw_and_calibrated():
    test = synthetic_survey(30, seed=9)
    truth = np.array([e.target for e in test])
    sharp = E.Predictions(truth, [np.where(np.arange(3) == t, 4.0, 0.0) for t in truth])
    flat = E.Predictions(np.zeros(len(test), dtype=np.int64), [np.zeros(3)] * len(test))
    d = E.paired_differences(test, sharp, {"flat": flat}, temperature=2.0, other_temperatures={"flat": 1.0})["flat"]
    for k in ("nll", "brier", "rps", "calibrated_nll", "calibrated_brier", "calibrated_rps"):
        assert d[k]["mean"] < 0 and d[k]["verdict"] == "win", k
    rows = E.proper_score_rows(test, sharp.choice_logits, 2.0)
    assert d["calibrated_nll"]["mean"] == pytest.approx(rows["nll"].mean() - np.log(3))
    # without the other's temperature there is no calibrated difference
    assert "calibrated_nll" not in E.paired_differences(test, sharp, {"flat": flat}, temperature=2.0)["flat"]


def test_group_scale_prior_carries_each_groups_answers_to_a_new_scale():
    # training questions on a 0..1 scale of two choices: group a answers at the top 3 times in 4, b at the bottom
    train = ([ex(f"a{i}", f"q{j}", t, {"party": "a"}, k=2) for i, t in enumerate([1, 1, 1, 0]) for j in (1, 2)]
             + [ex(f"b{i}", f"q{j}", t, {"party": "b"}, k=2) for i, t in enumerate([0, 0, 0, 1]) for j in (1, 2)])
    # the new question has 3 choices at 0, 0.5 and 1: the top answers go to its top choice, nothing to the middle
    test = [ex("a9", "new", 0, {"party": "a"}, k=3), ex("b9", "new", 0, {"party": "b"}, k=3),
            ex("c9", "new", 0, {"party": "c"}, k=3)]
    prior = E.GroupScalePrior(["party"], min_count=1).fit(train)
    pr = prior.predict(test)
    np.testing.assert_allclose(np.exp(pr.choice_logits[0]), np.array([2 + 1, 0 + 1, 6 + 1]) / 11, rtol=1e-6)
    np.testing.assert_allclose(np.exp(pr.choice_logits[1]), np.array([6 + 1, 0 + 1, 2 + 1]) / 11, rtol=1e-6)
    np.testing.assert_allclose(np.exp(pr.choice_logits[2]), np.array([8 + 1, 0 + 1, 8 + 1]) / 19, rtol=1e-6)
    assert pr.choice_idx.tolist() == [2, 0, 0] and prior.backoff_levels_ == {1: 2, 0: 1}
    # a point halfway between two choices is shared by both
    np.testing.assert_allclose(E._carried({0.5: 2.0}, [0.0, 1.0]), [1.0, 1.0])


def test_z_is_shuffled_across_respondents_not_answers():
    respondents = ["r1", "r1", "r2", "r3", "r3", "r3"]
    z = torch.tensor([[1.0], [1.0], [2.0], [3.0], [3.0], [3.0]])
    shuffled = E.shuffled_across_respondents(z, respondents, seed=1)
    # each respondent keeps one z, and the respondents' z are a permutation of theirs
    assert shuffled[0] == shuffled[1] and shuffled[3] == shuffled[4] == shuffled[5]
    assert sorted([float(shuffled[0]), float(shuffled[2]), float(shuffled[3])]) == [1.0, 2.0, 3.0]
    assert torch.equal(E.shuffled_across_respondents(z, respondents, seed=1), shuffled)  # seeded
    assert not all(torch.equal(E.shuffled_across_respondents(z, respondents, seed=s), z) for s in range(5))
    with pytest.raises(ValueError, match="6 rows for 2 respondent ids"):
        E.shuffled_across_respondents(z, ["r1", "r2"])

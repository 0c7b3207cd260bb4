"""cuma_model.survey.train on tiny random decoders: learning, exact resume, atomic checkpoints, the base path, bad options."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cuma_model.survey import evaluate as E
from cuma_model.survey import run_checkpoint as R
from cuma_model.survey import train as T
from cuma_model.survey.data import SurveyExample
from tiny_models import CHAT_TEMPLATE, tiny_decoder, word_tokenizer

WORDS = ["you", "are", "a", "democrat", "republican", "independent", "which", "one", "?", "answer", "with", "letter",
         ".", "spend", "more", "less", "same", "on", "roads", "parks", "schools", "system", "user", "assistant"]
LETTERS = ["A", "B", "C"]
TEMPLATE = CHAT_TEMPLATE
PARTIES = ["democrat", "republican", "independent"]


def tiny_tokenizer():
    return word_tokenizer(WORDS, LETTERS, TEMPLATE)


def survey(n_resp=60, seed=0):
    """Three questions; the answer is a function of party and question (10% noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(n_resp):
        party = int(rng.integers(0, 3))
        for qi, topic in enumerate(["roads", "parks", "schools"]):
            t = (party + qi) % 3 if rng.random() > 0.1 else int(rng.integers(0, 3))
            out.append(SurveyExample(
                respondent_id=str(r), question_id=topic, profile=f"you are a {PARTIES[party]}",
                groups={"party": PARTIES[party]}, question=f"spend more on {topic} ?",
                choices=("more", "less", "same"), scores=(1.0, 2.0, 3.0), scale=(1.0, 3.0), target=t))
    return out


class PartyEncoder:
    """A stand-in sentence encoder: z is the one-hot party of the profile text (dim 4)."""

    dim = 4

    def encode_unique(self, texts):
        position = {}
        index = [position.setdefault(t, len(position)) for t in texts]
        table = torch.zeros(len(position), self.dim)
        for text, i in position.items():
            for j, p in enumerate(PARTIES):
                if p in text:
                    table[i, j] = 1.0
        return table, torch.tensor(index)


def parts(seed=0):
    tok = tiny_tokenizer()
    model = tiny_decoder("llama", seed=seed, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         initializer_range=0.3)  # logits with some range: a 0.02 init makes them nearly flat
    return dict(model=model, tokenizer=tok, encoder=PartyEncoder(), examples=survey())


def options(tmp_path, **kw):
    base = dict(train_examples=0, eval_examples=0, batch_size=8, lr=1e-2, scheduler="constant", warmup_steps=0,
                num_experts=4, top_k=2, r=4, router_hidden_dim=16, routing_examples=16, plots=False,
                output_dir=str(tmp_path / "run"))
    base.update(kw)
    return base


def curve(result):
    return [h["loss"] for h in result["train"]["history"]]


@pytest.mark.parametrize("method", ["cuma", "lora"])
def test_loss_falls(tmp_path, method):
    res = T.train(options(tmp_path, method=method, max_steps=25, do_eval=False), **parts())
    loss = curve(res)
    assert len(loss) == 25
    assert np.mean(loss[-8:]) < 0.6 * np.mean(loss[:4]), loss


def adapter_weights(run_dir):
    return load_file(str(Path(run_dir) / "final" / "adapter_model.safetensors"))


def test_resume_gives_the_same_weights(tmp_path):
    # 3 epochs of 12 micro-batches in 6 steps each (accumulation 2), with a schedule: the resume point (step 8)
    # falls inside the second epoch, so the data order, the skipped batches and the LR position all have to match.
    common = dict(method="cuma", epochs=3, grad_accum=2, scheduler="cosine", warmup_steps=3, dropout=0.1,
                  train_examples=90, do_eval=False)
    straight = T.train(options(tmp_path, output_dir=str(tmp_path / "straight"), **common), **parts())
    first = T.train(options(tmp_path, output_dir=str(tmp_path / "split"), save_steps=4, **common), **parts())
    assert first["train"]["steps"] == straight["train"]["steps"] == 18
    # throw away the later checkpoints and the final adapter, then continue from step 8
    for name in ("checkpoint-12", "checkpoint-16", "final"):
        import shutil
        shutil.rmtree(tmp_path / "split" / name)
    resumed = T.train(options(tmp_path, output_dir=str(tmp_path / "split"), save_steps=4, resume="latest",
                              **common), **parts())
    a, b = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "split")
    assert set(a) == set(b) and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert curve(resumed) == curve(straight)
    assert [h["lr"] for h in resumed["train"]["history"]] == [h["lr"] for h in straight["train"]["history"]]


def test_checkpoints_complete_and_atomic(tmp_path):
    res = T.train(options(tmp_path, method="lora", max_steps=6, save_steps=3, routing_examples=0), **parts())
    run = tmp_path / "run"
    names = sorted(p.name for p in run.iterdir())
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")], names
    assert {"checkpoint-3", "final", "metrics.json", "predictions.jsonl"} <= set(names)
    for ck in ("checkpoint-3", "final"):
        files = {p.name for p in (run / ck).iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", R.STATE_NAME, R.RUN_ARGS_NAME} <= files, files
        assert not [f for f in files if f.startswith(".")]
        state = R.read_training_state(run / ck)
        assert state["step"] == int(ck.split("-")[1]) if ck != "final" else state["step"] == 6
        assert {"optimizer", "scheduler", "epoch", "batches_done", "history", "args", "data_fingerprint"} <= set(state)
    assert R.find_latest_checkpoint(run).name == "final"
    # a checkpoint rewritten in place is replaced as a whole, leaving nothing behind
    model = parts()["model"]
    R.write_checkpoint(run / "checkpoint-3", T.apply_method(model, T._args_from(options(tmp_path, method="lora")), 0),
                       "lora", {"step": 3}, T._args_from(options(tmp_path)))
    assert R.read_training_state(run / "checkpoint-3") == {"step": 3}
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "lora" and metrics["train"]["steps"] == 6
    assert set(metrics["floors"]) == {"question_majority", "group_majority", "logistic_regression"}
    assert metrics["metrics"]["n"] == res["data"]["n_eval"]


def test_base_and_routing_report(tmp_path):
    res = T.train(options(tmp_path, method="base", eval_examples=24), **parts())
    assert res["train"]["steps"] == 0 and res["metrics"]["n"] == 24
    assert not (tmp_path / "run" / "final").exists()
    assert 0.0 <= res["metrics"]["accuracy"] <= 1.0 and res["metrics"]["entropy"] is not None
    res = T.train(options(tmp_path, method="cuma", max_steps=2, eval_examples=24, plots=True,
                          output_dir=str(tmp_path / "cuma")), **parts())
    run = tmp_path / "cuma"
    usage = __import__("pandas").read_csv(run / "routing_usage.csv")
    assert set(usage["dimension"]) == {"all", "party"}
    shares = usage.groupby(["dimension", "group", "router"])["share"].sum()
    np.testing.assert_allclose(shares.to_numpy(), 1.0, rtol=1e-6)
    # recorded during scoring, for the respondents of the first routing_examples (16) evaluated examples (scoring
    # packs a respondent's questions in one row): top_k (2) selections for every prompt token of their examples,
    # per router, a shared profile prefix counted once per example
    splits = T.make_splits(survey(), T._args_from(options(tmp_path, eval_examples=24)))
    first = {}
    for i, e in enumerate(splits.eval):
        first.setdefault(e.respondent_id, i)
    counted = [e for e in splits.eval if first[e.respondent_id] < 16]
    assert 16 <= len(counted) < 24
    prompt_ids = T.tokenize_prompts(parts()["tokenizer"], counted, True, 256)
    per_router = usage[usage["dimension"] == "all"].groupby("router")["count"].sum()
    assert res["routing"]["n_examples"] == len(counted)
    np.testing.assert_allclose(per_router.to_numpy(), 2 * sum(len(p) for p in prompt_ids))
    for png in ("loss_curve.png", "routing_party.png", "answer_shares_party.png"):
        assert (run / png).stat().st_size > 0
    assert "question_majority" in res["report"]


@pytest.mark.parametrize("argv, match", [
    (["--top-k", "4", "--num-experts", "2"], "top-k"),
    (["--survey", "nonsense"], "unknown survey"),
    (["--batch-size", "0"], "batch-size"),
    (["--method", "base", "--resume", "latest"], "base"),
    (["--lr-ratio-B", "0"], "lr-ratio-B"),
    (["--demographic-scale", "-2"], "demographic-scale"),
    (["--max-grad-norm", "nan"], "max-grad-norm"),  # NaN would switch clipping off
    (["--aux-loss-coef", "nan"], "aux-loss-coef"),
    (["--lora-alpha", "0"], "lora-alpha"),
    (["--lora-alpha", "nan"], "lora-alpha"),
    (["--lr", "inf"], "lr"),
    (["--seeds", "1", "1"], "distinct seeds"),
    (["--objective", "distribution"], "needs --group-by"),
    (["--seeds", "1", "2", "--resume", "latest"], "starts fresh runs"),
    (["--max-length", "1"], "--max-length 1 cannot hold a prompt's question"),
    (["--max-length", "31"], "use at least 32"),
    (["--encoder", "/nonexistent"], "--encoder '/nonexistent' is neither a local folder nor a model"),
])
def test_bad_options(argv, match, capsys):
    with pytest.raises(SystemExit):
        T.main(argv)
    assert match in capsys.readouterr().err
    with pytest.raises(ValueError, match=match):
        T.train(argv)


@pytest.mark.parametrize("method", ["cuma", "lora"])
def test_param_groups_give_B_its_own_learning_rate(method):
    T_B = lambda n: ("cuma_B" if method == "cuma" else "lora_B") in n
    p = parts()
    args = T._args_from(dict(method=method, lr=1e-3, lr_ratio_B=4.0, num_experts=4, r=4, router_hidden_dim=16))
    model = T.apply_method(p["model"], args, demographic_dim=PartyEncoder.dim)
    names = {id(q): n for n, q in model.named_parameters() if q.requires_grad}
    groups = T.param_groups(model, args)
    assert len(groups) == 2
    rest, b = groups
    assert b["lr"] == 4e-3 and "lr" not in rest  # rest takes the optimizer's lr
    assert b["params"] and all(T_B(names[id(q)]) for q in b["params"])
    assert rest["params"] and not any(T_B(names[id(q)]) for q in rest["params"])
    assert {id(q) for g in groups for q in g["params"]} == set(names)
    # ratio 1: one group holding everything
    one = T.param_groups(model, T._args_from(dict(method=method)))
    assert len(one) == 1 and [id(q) for q in one[0]["params"]] == list(names)  # in model order


def test_unknown_option_name():
    with pytest.raises(ValueError, match="unknown training options"):
        T.train({"top_kk": 3})


def test_floors_at_equal_data(tmp_path):
    res = T.train(options(tmp_path, method="cuma", max_steps=2, train_examples=12, eval_examples=24), **parts())
    names = {"question_majority", "group_majority", "logistic_regression"}
    assert set(res["floors"]) == names | {f"{n}@12" for n in names}
    assert set(res["paired"]) == set(res["floors"])
    # fitted on 12 examples, the question-majority floor can only know what those 12 said
    splits = T.make_splits(survey(), T._args_from(options(tmp_path, train_examples=12, eval_examples=24)))
    from cuma_model.survey import evaluate as E

    small = E.QuestionMajority().fit(splits.train).predict(splits.eval)
    assert res["floors"]["question_majority@12"]["accuracy"] == E.evaluate_predictions(
        splits.eval, small.choice_idx, small.choice_logits)["accuracy"]
    assert "cuma - logistic_regression@12" in res["report"]


def test_seeds_train_one_split_and_report_the_spread(tmp_path):
    """--seeds: one data split for every run (the same evaluation answers), other weights per seed, and a summary
    whose spread is the sample sd of the runs' own numbers."""
    seen = []

    def train_one(args):
        seen.append(args)
        return T.train(args, **parts())

    summary = T.train_seeds(options(tmp_path, method="cuma", max_steps=3, train_examples=30, eval_examples=24,
                                    seeds=[3, 4], data_seed=1), train_one=train_one)
    assert [a.seed for a in seen] == [3, 4] and all(a.data_seed == 1 and a.seeds is None for a in seen)
    runs = [json.loads((tmp_path / "run" / f"seed-{s}" / "metrics.json").read_text()) for s in (3, 4)]
    examples = [[(r["respondent_id"], r["question_id"]) for r in map(json.loads, open(
        tmp_path / "run" / f"seed-{s}" / "predictions.jsonl"))] for s in (3, 4)]
    assert examples[0] == examples[1]  # one split, one set of evaluation answers
    w = [load_file(str(tmp_path / "run" / f"seed-{s}" / "final" / "adapter_model.safetensors")) for s in (3, 4)]
    assert any(not torch.equal(w[0][k], w[1][k]) for k in w[0])  # the seed reached the training
    acc = [r["metrics"]["accuracy"] for r in runs]
    assert summary["metrics"]["accuracy"]["values"] == acc
    assert summary["metrics"]["accuracy"]["mean"] == pytest.approx(np.mean(acc))
    assert summary["metrics"]["accuracy"]["sd"] == pytest.approx(np.std(acc, ddof=1))
    diff = summary["metrics"]["accuracy_minus_question_majority"]["values"]
    assert diff == [r["paired"]["question_majority"]["accuracy"]["mean"] for r in runs]
    assert json.loads((tmp_path / "run" / "seeds.json").read_text())["metrics"]["nll"]["values"] == \
        [r["metrics"]["nll"] for r in runs]
    assert summary["metrics"]["nll_at_temperature"]["values"] == [r["metrics"]["calibrated"]["nll"] for r in runs]
    assert summary["metrics"]["z_shuffled_nll_difference"]["values"] == \
        [r["z_permutation"]["nll_difference"]["mean"] for r in runs]


def test_a_checkpoint_older_than_an_option_resumes_as_it_ran():
    """An option absent from a checkpoint is compared as what it was before it existed, not as today's default."""
    saved = {"seed": 0, "lr": 0.002}
    assert R.resume_differences(saved, {**saved, "data_seed": None, "demographic_norm": "none"}) == []
    assert R.resume_differences(saved, {**saved, "data_seed": 5, "demographic_norm": "whiten"}) == [
        "--data-seed: None in the checkpoint, 5 now",
        "--demographic-norm: 'none' in the checkpoint, 'whiten' now"]
    assert T.build_parser().parse_args([]).demographic_norm == "whiten"  # today's default differs: still refused
    assert R.resume_differences(saved, {**saved, "unknown_option": 1}) == [
        "--unknown-option: '(absent)' in the checkpoint, 1 now"]


def test_group_distributions_by_hand():
    from cuma_model.survey.data import group_distributions

    ex = survey(n_resp=60)
    groups, targets = group_distributions(ex, ["party"], min_count=5)
    by_key = {(g.groups["party"], g.question_id): t for g, t in zip(groups, targets)}
    for (party, q), t in by_key.items():
        answers = [e.target for e in ex if e.groups["party"] == party and e.question_id == q]
        assert np.allclose(t, np.bincount(answers, minlength=3) / len(answers))
    assert len(by_key) == 9 and groups[0].profile == f"party: {groups[0].groups['party']}"
    assert all(g.target == int(np.argmax(t)) for g, t in zip(groups, targets))
    assert group_distributions(ex, ["party"], min_count=1000) == ([], [])
    with pytest.raises(ValueError, match="unknown group dimensions"):
        group_distributions(ex, ["age"])


def test_the_distribution_loss_is_the_forward_kl_over_the_vocabulary():
    torch.manual_seed(0)
    logits = torch.randn(3, 11)

    class Out(dict):
        __getattr__ = dict.__getitem__

    out = Out(logits=torch.stack([logits, torch.zeros(3, 11)], dim=1))  # the loss reads position -2
    model = lambda **kw: out  # noqa: E731 -- stands in for a model
    ids, probs = torch.tensor([[2, 5, 7], [2, 5, 0], [4, 1, 9]]), torch.tensor([[.2, .3, .5], [.6, .4, 0.], [1., 0, 0]])
    batch = {"input_ids": torch.zeros(3, 2, dtype=torch.long), "attention_mask": torch.ones(3, 2),
             "position_ids": torch.zeros(3, 2), "target_ids": ids, "target_probs": probs}
    kl, _ = T._forward_loss(model, batch, None, {}, False, False)
    full = torch.zeros(3, 11).scatter_add(1, ids, probs)  # the target as a distribution over the vocabulary
    expected = torch.nn.functional.kl_div(torch.log_softmax(logits, -1), full, reduction="batchmean")
    torch.testing.assert_close(kl, expected)


def test_distribution_objective_learns_each_groups_answers(tmp_path):
    from cuma_model.survey import data as D
    from cuma_model.survey import evaluate as E

    splits = T.make_splits(survey(), T._args_from(options(tmp_path, objective="distribution", group_by=["party"],
                                                          group_min_count=5)))
    p = parts()
    prompts = D.render_prompts(p["tokenizer"], splits.train)
    letters = [g.letters for g in splits.train]

    def kl_to_targets(model, z=None):
        rows = E.score_choices(model, p["tokenizer"], prompts, letters, demographic_embeds=z, progress=False)
        q = [np.exp(r - r.max()) / np.exp(r - r.max()).sum() for r in rows]
        kl = [float(np.sum(np.where(t > 0, t * np.log(np.where(t > 0, t, 1) / qi), 0))) for t, qi in
              zip(splits.targets, q)]
        return np.mean(kl), sum(int(qi.argmax() == t.argmax()) for t, qi in zip(splits.targets, q))

    before, _ = kl_to_targets(p["model"])  # the base model (B = 0 at the start: what training starts from)
    res = T.train(options(tmp_path, method="cuma", objective="distribution", group_by=["party"], group_min_count=5,
                          max_steps=300, lr=3e-3, eval_examples=0), **p)  # 9 of 9 on each of 12 init seeds
    assert res["data"]["n_train"] == 9  # 3 parties x 3 questions
    assert not any("@" in name for name in res["floors"])  # it saw every training answer: the floors on all of them
    z, index = p["encoder"].encode_unique([g.profile for g in splits.train])
    after, hits = kl_to_targets(p["model"], z[index])
    assert after < 0.25 * before and hits == 9, (before, after, hits)  # each group's own majority


def test_whitened_z_statistics_come_from_the_training_profiles_and_reach_the_checkpoint(tmp_path):
    res = T.train(options(tmp_path, method="cuma", demographic_norm="whiten", max_steps=2, save_steps=1,
                          train_examples=30, do_eval=False), **parts())
    assert res["train"]["steps"] == 2
    splits = T.make_splits(survey(), T._args_from(options(tmp_path, train_examples=30)))
    table, _ = PartyEncoder().encode_unique(sorted({e.profile for e in splits.train}))
    from cuma_model.router import demographic_statistics

    mean, whiten = demographic_statistics(table, whiten=True)
    for folder in ("checkpoint-1", "final"):
        saved = load_file(str(tmp_path / "run" / folder / "adapter_model.safetensors"))
        means = [v for k, v in saved.items() if k.endswith("z_mean")]
        whitens = [v for k, v in saved.items() if k.endswith("z_whiten")]
        assert means and all(torch.allclose(m, mean) for m in means)
        assert whitens and all(torch.allclose(w, whiten) for w in whitens)


def test_param_groups_give_the_routers_their_own_learning_rate():
    p = parts()
    args = T._args_from(dict(method="cuma", lr=1e-3, lr_ratio_B=4.0, lr_ratio_router=0.5, num_experts=4, r=4,
                             router_hidden_dim=16))
    model = T.apply_method(p["model"], args, demographic_dim=PartyEncoder.dim)
    names = {id(q): n for n, q in model.named_parameters() if q.requires_grad}
    rest, b, routers = T.param_groups(model, args)
    assert b["lr"] == 4e-3 and routers["lr"] == 5e-4 and "lr" not in rest
    router_params = {id(q) for r in T.cuma_model.routers(model) for q in r.parameters()}
    assert {id(q) for q in routers["params"]} == router_params
    assert rest["params"] and all("cuma_A" in names[id(q)] for q in rest["params"])
    only = T.param_groups(model, T._args_from(dict(method="cuma", lr=1e-3, lr_ratio_router=2.0)))
    assert len(only) == 2 and only[1]["lr"] == 2e-3 and {id(q) for q in only[1]["params"]} == router_params


def test_the_projection_of_z_trains_at_the_routers_rate_and_reaches_the_checkpoint(tmp_path):
    args = T._args_from(dict(method="cuma", lr=1e-3, lr_ratio_router=0.5, num_experts=4, r=4, router_hidden_dim=16,
                             demographic_projection_layers=2))
    model = T.apply_method(parts()["model"], args, demographic_dim=PartyEncoder.dim)
    _, routers = T.param_groups(model, args)
    projection = {id(q) for q in model.cuma.projection.parameters()}
    assert projection and projection <= {id(q) for q in routers["params"]}
    T.train(options(tmp_path, method="cuma", demographic_projection_layers=2, max_steps=2, save_steps=1,
                    train_examples=30, do_eval=False), **parts())
    saved = [load_file(str(tmp_path / "run" / f / "adapter_model.safetensors")) for f in ("checkpoint-1", "final")]
    keys = [k for k in saved[1] if k.startswith("cuma_demographic_projection.layers.")]
    assert len(keys) == 4
    assert any(not torch.equal(saved[0][k], saved[1][k]) for k in keys)  # the second step moved it
    config = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert config["demographic_projection_layers"] == 2


def test_truncated_prompts_are_counted_in_a_warning():
    tok, examples = tiny_tokenizer(), survey()
    lengths = [len(p) for p in T.tokenize_prompts(tok, examples, True, 256)]
    cut = max(lengths) - 1  # the longest prompts lose their first token
    longer = sum(n > cut for n in lengths)
    assert longer > 0.01 * len(lengths)
    with pytest.warns(UserWarning, match=f"--max-length {cut} truncates {longer} of {len(lengths)} training prompts"
                                         f".*--max-length {max(lengths)} keeps them whole"):
        short = T.tokenize_prompts(tok, examples, True, cut)
    assert max(len(p) for p in short) == cut
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T.tokenize_prompts(tok, examples, True, max(lengths))  # nothing truncated: no warning


# ---------------------------------------------------------------------------------------------------- evidence

def test_a_run_leads_with_proper_scores_calibrated_on_validation(tmp_path):
    res = T.train(options(tmp_path, method="cuma", max_steps=3, eval_examples=24, calibration_examples=20,
                          plots=True), **parts())
    run = tmp_path / "run"
    m = res["metrics"]
    assert {"nll", "brier", "rps"} <= set(m) and m["calibrated"]["temperature"] > 0
    # the temperature is the one fitted on the validation answers the run wrote, none of them evaluated
    val, _, val_logits = E.read_predictions_jsonl(run / E.VAL_PREDICTIONS)
    assert m["calibrated"]["temperature"] == pytest.approx(E.temperature_of(val, val_logits), rel=1e-6)
    splits = T.make_splits(survey(), T._args_from(options(tmp_path, eval_examples=24, calibration_examples=20)))
    assert len(val) == res["data"]["n_calibration"] == min(20, len(splits.val)) > 0
    assert len(T.make_splits(survey(), T._args_from(options(tmp_path, calibration_examples=4))).calib) == 4
    assert {e.respondent_id for e in splits.calib} <= {e.respondent_id for e in splits.val}
    assert not {e.respondent_id for e in splits.calib} & {e.respondent_id for e in splits.eval}
    for name, floor in res["floors"].items():
        assert floor["calibrated"]["temperature"] == res["calibration"]["floor_temperatures"][name]
        assert res["paired"][name]["calibrated_nll"]["verdict"] in ("win", "loss", "tie")
    assert set(res["sampled_floors"]) == {f"{n}~sampled" for n in res["floors"]}
    assert res["report"].splitlines()[0].split()[1:4] == ["NLL", "Brier", "RPS"]
    assert "group_majority~sampled" in res["report"] and "z shuffled across respondents" in res["report"]
    assert (run / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["z_permutation"]["n"] == 24 and "sampled_floors" in saved
    # no calibration answers: no temperatures, nothing else lost
    res = T.train(options(tmp_path, method="lora", max_steps=1, eval_examples=12, calibration_examples=0,
                          output_dir=str(tmp_path / "lora")), **parts())
    assert res["metrics"]["calibrated"] is None and res["metrics"]["brier"] is not None
    assert res["z_permutation"] is None  # no z to shuffle


def test_shuffling_z_within_identical_profiles_changes_nothing(tmp_path):
    """The permutation test's null: respondents who share one profile share one z, so shuffling z among them must
    leave every score as it was (and a run where profiles differ moves)."""
    same = [dataclasses.replace(e, profile="you are a democrat", groups={"party": "democrat"}) for e in survey()]
    res = T.train(options(tmp_path, method="cuma", max_steps=3, eval_examples=30, calibration_examples=0,
                          demographic_norm="none"), **{**parts(), "examples": same})  # one profile: no statistics
    test = res["z_permutation"]
    assert test["nll_difference"]["mean"] == 0.0 and test["nll_difference"]["lo"] == test["nll_difference"]["hi"] == 0
    assert test["accuracy_difference"]["mean"] == 0.0
    res = T.train(options(tmp_path, method="cuma", max_steps=3, eval_examples=30, calibration_examples=0,
                          demographic_norm="none", output_dir=str(tmp_path / "differ")), **parts())
    assert res["z_permutation"]["nll_difference"]["mean"] != 0.0


def test_question_split_keeps_heldout_answers_out_of_training_and_the_floors(tmp_path):
    args = T._args_from(options(tmp_path, split="question", heldout_questions=["parks"], calibration_examples=10))
    splits = T.make_splits(survey(), args)
    assert splits.heldout_questions == ["parks"]
    for part in (splits.train_all, splits.train, splits.val, splits.calib):
        assert part and all(e.question_id != "parks" for e in part)
    assert splits.eval and all(e.question_id == "parks" for e in splits.eval)
    assert not {e.respondent_id for e in splits.train_all} & {e.respondent_id for e in splits.test}
    # drawn by seed: the same questions for the same seed
    drawn = T.make_splits(survey(), T._args_from(options(tmp_path, split="question", heldout_question_count=2)))
    assert len(drawn.heldout_questions) == 2
    assert drawn.heldout_questions == T.make_splits(survey(), T._args_from(
        options(tmp_path, split="question", heldout_question_count=2))).heldout_questions

    res = T.train(options(tmp_path, method="lora", max_steps=2, split="question", heldout_questions=["parks"],
                          calibration_examples=10), **parts())
    assert res["data"]["heldout_questions"] == ["parks"]
    assert "group_scale_prior" in res["floors"]
    # the floors never saw an answer to the held-out question: the question majority knows nothing of it
    qm = res["floors"]["question_majority"]
    assert qm["nll"] == pytest.approx(np.log(3)) and qm["calibrated"]["temperature"] > 0


@pytest.mark.parametrize("method", ["lora", "cuma"])
def test_the_base_model_answers_held_out_questions_as_a_floor(tmp_path, method):
    """The frozen base model's floor is exactly what --method base scores on the same split."""
    split = dict(split="question", heldout_questions=["parks"], calibration_examples=10, z_permutation=False)
    res = T.train(options(tmp_path, method=method, max_steps=3, **split), **parts())
    base = T.train(options(tmp_path, method="base", output_dir=str(tmp_path / "base"), **split), **parts())
    floor = res["floors"][T.BASE_FLOOR]
    for key in ("nll", "brier", "accuracy"):
        assert floor[key] == pytest.approx(base["metrics"][key], rel=1e-5), key
    assert floor["calibrated"]["temperature"] == pytest.approx(base["metrics"]["calibrated"]["temperature"], rel=1e-4)
    assert res["metrics"]["nll"] != pytest.approx(floor["nll"], rel=1e-6)  # the adapter itself was scored too
    assert T.BASE_FLOOR in res["paired"] and f"{T.BASE_FLOOR}~sampled" in res["sampled_floors"]


@pytest.mark.parametrize("argv, match", [
    (["--heldout-questions", "roads"], "add --split question"),
    (["--split", "question", "--heldout-question-count", "0"], "--heldout-question-count must be >= 1"),
    (["--split", "question", "--heldout-questions", "a", "--heldout-question-count", "1"], "not both"),
    (["--calibration-examples", "-1"], "--calibration-examples must be"),
])
def test_bad_evidence_options(argv, match):
    with pytest.raises(ValueError, match=match):
        T.train(argv)


def test_unknown_or_all_heldout_questions_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\['nope'\] are not questions of the survey; its questions: "
                                         r"\['parks', 'roads', 'schools'\]"):
        T.make_splits(survey(), T._args_from(options(tmp_path, split="question", heldout_questions=["nope"])))
    with pytest.raises(ValueError, match="leave at least one to train on"):
        T.make_splits(survey(), T._args_from(options(tmp_path, split="question",
                                                     heldout_questions=["parks", "roads", "schools"])))
    with pytest.raises(ValueError, match="at most 2 of the survey's 3 questions"):
        T.make_splits(survey(), T._args_from(options(tmp_path, split="question", heldout_question_count=3)))


def test_label_smoothing_caps_how_sure_the_adapter_becomes(tmp_path):
    """Trained alike, the smoothed run's top answer probability on its training answers stays under its target's
    1 - eps, well below the plain run's."""
    e = survey()[0]
    assert T.smoothed_answer(e, 0.3) == pytest.approx([0.15 if i != e.target else 0.7 for i in range(3)])

    def top_probability(eps, name):
        p = parts()
        T.train(options(tmp_path, method="lora", max_steps=150, lr=1e-2, label_smoothing=eps, do_eval=False,
                        output_dir=str(tmp_path / name)), **p)
        model, tok = p["model"], p["tokenizer"]
        train = survey()[:60]
        prompts = T.D.render_prompts(tok, train, profile_in_prompt=True)
        logits = E.score_choices(model, tok, prompts, [x.letters for x in train], progress=False)
        return float(np.mean([np.exp(l.max() - np.logaddexp.reduce(l)) for l in logits]))

    plain, smoothed = top_probability(0.0, "plain"), top_probability(0.3, "smoothed")
    assert smoothed < 0.7 and smoothed < plain - 0.1, (smoothed, plain)


@pytest.mark.parametrize("kw, message", [
    ({"label_smoothing": 1.0}, "must be in \\[0, 1\\)"), ({"label_smoothing": float("nan")}, "must be in"),
    ({"label_smoothing": 0.1, "objective": "distribution", "group_by": ["party"]}, "already distributions"),
])
def test_bad_label_smoothing_is_named(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        T.validate_args(T._args_from(options(tmp_path, **kw)))


def test_label_smoothing_defaults_by_objective(tmp_path):
    assert T._args_from(options(tmp_path)).label_smoothing == T.LABEL_SMOOTHING == 0.1
    assert T._args_from(options(tmp_path, objective="distribution", group_by=["party"])).label_smoothing == 0.0
    assert T._args_from(options(tmp_path, label_smoothing=0.0)).label_smoothing == 0.0

"""cuma_model.survey.transfer: runs trained on one survey, scored on another survey's people and questions."""
import json

import numpy as np
import pytest
import torch

import cuma_model
from cuma_model.survey import evaluate as E
from cuma_model.survey import train as T
from cuma_model.survey import transfer as X
from cuma_model.survey.data import SurveyExample
from test_train import PARTIES, PartyEncoder, options, parts, survey, tiny_tokenizer
from tiny_models import tiny_decoder


def other_survey(n_resp=20, seed=7):
    """Two questions with two choices in another order: nothing of it is in the training survey."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(n_resp):
        party = int(rng.integers(0, 3))
        for topic in ("system", "schools"):
            out.append(SurveyExample(
                respondent_id=f"x{r}", question_id=f"t-{topic}", profile=f"you are a {PARTIES[party]}",
                groups={"party": PARTIES[party]}, question=f"less on {topic} ?", choices=("less", "more"),
                scores=(1.0, 2.0), scale=(1.0, 2.0), target=int(party == 0)))
    return out


def fresh_base(args):
    """What each run was trained on: parts()'s model, by seed (a fresh copy per run: loading mutates it)."""
    p = parts()
    return p["model"], p["tokenizer"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method in ("cuma", "lora"):
        T.train(options(root, method=method, max_steps=4, eval_examples=12, calibration_examples=10,
                        output_dir=str(root / method)), **parts())
        out[method] = root / method
    return out


def test_each_run_is_scored_as_its_adapter_scores_alone(runs, monkeypatch):
    monkeypatch.setattr("cuma_model.survey.encoder.DemographicEncoder", lambda name: PartyEncoder())
    target = other_survey()
    result = X.transfer([runs["cuma"], runs["lora"]], target, load_base=fresh_base)
    names = ["cuma (cuma)", "lora (lora)", T.BASE_FLOOR, X.UNIFORM]
    assert list(result["metrics"]) == names and result["n"] == len(target) == 40
    # by hand: the cuma adapter loaded onto a fresh base, scored with the PartyEncoder's z
    model, tok = fresh_base(None)
    model = cuma_model.from_pretrained(model, runs["cuma"] / "final", is_trainable=False).eval()
    table, index = PartyEncoder().encode_unique([e.profile for e in target])
    prompts = T.D.render_prompts(tok, target, profile_in_prompt=True)
    logits = E.score_choices(model, tok, prompts, [e.letters for e in target], demographic_embeds=table[index],
                             progress=False)
    true = np.array([e.target for e in target])
    nll = float(np.mean([np.logaddexp.reduce(l) - l[t] for l, t in zip(logits, true)]))
    assert result["metrics"]["cuma (cuma)"]["nll"] == pytest.approx(nll, rel=1e-4)
    # the base model floor: the frozen model with no adapter at all
    base, _ = fresh_base(None)
    base_logits = E.score_choices(base.eval(), tok, prompts, [e.letters for e in target], progress=False)
    base_nll = float(np.mean([np.logaddexp.reduce(l) - l[t] for l, t in zip(base_logits, true)]))
    assert result["metrics"][T.BASE_FLOOR]["nll"] == pytest.approx(base_nll, rel=1e-4)
    assert result["metrics"][X.UNIFORM]["nll"] == pytest.approx(np.log(2))
    # temperatures come from each run's own source validation answers, never from the target
    for method, name in (("cuma", "cuma (cuma)"), ("lora", "lora (lora)")):
        source = json.loads((runs[method] / "metrics.json").read_text())["calibration"]["temperature"]
        assert result["source_temperatures"][name] == pytest.approx(source)
        assert result["metrics"][name]["calibrated"]["temperature"] == pytest.approx(source)
    assert set(result["paired"]) == {"lora (lora)", T.BASE_FLOOR, X.UNIFORM}
    assert list(result["z_permutation"]) == ["cuma (cuma)"]  # only a run with z is shuffled
    assert "z shuffled" in result["report"]


def test_the_command_line_writes_transfer_json(runs, tmp_path, monkeypatch):
    monkeypatch.setattr("cuma_model.survey.encoder.DemographicEncoder", lambda name: PartyEncoder())
    monkeypatch.setattr(T, "load_model_and_tokenizer", lambda model, gguf: fresh_base(None))
    monkeypatch.setattr(T.D, "load_survey", lambda name, data=None: other_survey(n_resp=30))
    assert X.main(["--run", str(runs["lora"]), "--survey", "other", "--respondents", "5",
                   "--out", str(tmp_path / "t")]) == 0
    written = json.loads((tmp_path / "t" / X.TRANSFER_NAME).read_text())
    assert written["n_respondents"] == 5 and written["n"] == 10 and written["survey"] == "other"


def test_bad_runs_are_named(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no train_args.json"):
        X.transfer([tmp_path], other_survey(), load_base=fresh_base)
    twin = tmp_path / "x" / "lora"
    twin.parent.mkdir()
    twin.symlink_to(runs["lora"])
    with pytest.raises(ValueError, match="share a name"):
        X.transfer([runs["lora"], twin], other_survey(), load_base=fresh_base)
    with pytest.raises(SystemExit):
        X.main(["--run", str(runs["lora"]), "--survey", "x", "--respondents", "-1", "--out", str(tmp_path)])

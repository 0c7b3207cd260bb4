"""Respondent-bootstrap intervals and paired differences: hand-checked cases, clustering, ties."""
import numpy as np
import pytest

from cuma_model import evaluate as E
from cuma_model.data import SurveyExample
from cuma_model.intervals import respondent_bootstrap, verdict


def test_two_respondents_by_hand():
    # resampled means are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4: the 2.5% and 97.5% quantiles are 0 and 1
    iv = respondent_bootstrap([0.0, 1.0], ["a", "b"])
    assert iv["mean"] == 0.5 and iv["lo"] == 0.0 and iv["hi"] == 1.0
    iv = respondent_bootstrap([0.0, 0.0, 1.0, 1.0], ["a", "a", "b", "b"])  # two answers each: the same resamples
    assert (iv["lo"], iv["hi"]) == (0.0, 1.0)


def test_equal_values_give_a_point_and_results_repeat():
    iv = respondent_bootstrap([0.7] * 9, list("abcdefghi"))
    assert iv == pytest.approx({"mean": 0.7, "lo": 0.7, "hi": 0.7}, abs=1e-12)
    rng = np.random.default_rng(0)
    v, r = rng.random(50), rng.integers(0, 10, 50)
    assert respondent_bootstrap(v, r) == respondent_bootstrap(v, r)
    with pytest.raises(ValueError, match="values for"):
        respondent_bootstrap([1.0, 2.0], ["a"])


def test_correlated_answers_widen_the_interval():
    """20 respondents who each answer 10 questions alike: resampling answers would claim 200 independent ones."""
    rng = np.random.default_rng(1)
    per_person = rng.integers(0, 2, 20).astype(float)
    values = np.repeat(per_person, 10)
    by_person = respondent_bootstrap(values, np.repeat(np.arange(20), 10))
    by_answer = respondent_bootstrap(values, np.arange(200))
    width = lambda iv: iv["hi"] - iv["lo"]
    assert width(by_person) > 2.5 * width(by_answer)  # about sqrt(10) wider
    assert by_person["lo"] < values.mean() < by_person["hi"]


def test_verdicts():
    assert verdict({"mean": 0.01, "lo": -0.01, "hi": 0.03}) == "tie"
    assert verdict({"mean": 0.05, "lo": 0.01, "hi": 0.09}) == "win"
    assert verdict({"mean": -0.05, "lo": -0.09, "hi": -0.01}) == "loss"
    assert verdict({"mean": -0.05, "lo": -0.09, "hi": -0.01}, higher_is_better=False) == "win"


def examples(n_resp=40, per=3, seed=0):
    rng = np.random.default_rng(seed)
    return [SurveyExample(respondent_id=str(r), question_id=f"q{q}", profile="p", groups={"g": str(r % 2)},
                          question="?", choices=("a", "b"), scores=(1.0, 2.0), scale=(1.0, 2.0),
                          target=int(rng.integers(0, 2)))
            for r in range(n_resp) for q in range(per)]


def test_paired_differences_and_the_report():
    ex = examples()
    true = np.array([e.target for e in ex])
    perfect = E.Predictions(true, [np.array([5.0, -5.0]) if t == 0 else np.array([-5.0, 5.0]) for t in true])
    flat = E.Predictions(np.zeros(len(ex), dtype=np.int64), [np.zeros(2) for _ in ex])
    paired = E.paired_differences(ex, perfect, {"itself": perfect, "flat": flat})
    assert paired["itself"]["accuracy"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "verdict": "tie"}
    gain = paired["flat"]["accuracy"]
    assert gain["verdict"] == "win" and gain["mean"] == pytest.approx(1.0 - (true == 0).mean())
    assert paired["flat"]["nll"]["verdict"] == "win" and paired["flat"]["nll"]["hi"] < 0
    metrics = E.evaluate_predictions(ex, perfect.choice_idx, perfect.choice_logits)
    assert metrics["intervals"]["accuracy"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0}
    text = E.format_intervals("cuma", metrics, paired)
    assert "cuma: accuracy 100 [100, 100]%" in text and "cuma - itself: accuracy +0 [+0, +0] points (tie)" in text
    assert "cuma - flat" in text and "(win)" in text

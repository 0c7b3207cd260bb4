"""Respondent-bootstrap intervals and paired differences: hand-checked cases, clustering, ties."""
import numpy as np
import pytest

from cuma_model.survey import evaluate as E
from cuma_model.survey.data import SurveyExample
from cuma_model.survey.intervals import basic_interval, respondent_bootstrap, respondent_resamples, verdict


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
    assert "accuracy 100 [100, 100]%" in text and "accuracy +0 [+0, +0] points (tie)" in text
    assert text.splitlines()[1].startswith("  cuma: NLL ")  # proper scores lead
    assert "cuma - itself: NLL +0 [+0, +0] (tie), Brier +0 [+0, +0] (tie)" in text
    assert "cuma - flat" in text and "(win)" in text


def test_resamples_draw_whole_respondents_and_agree_with_the_mean_bootstrap():
    rng = np.random.default_rng(3)
    respondents = np.repeat(np.arange(30), rng.integers(1, 5, 30))
    values = rng.random(respondents.size) + (respondents % 3)  # respondents differ: clustering matters
    resamples = respondent_resamples(respondents, 2000, seed=1)
    for idx in resamples[:20]:
        drawn = respondents[idx]
        for r in set(drawn.tolist()):  # every answer of a drawn respondent, once per draw
            assert np.sum(drawn == r) % np.sum(respondents == r) == 0
        assert sum(np.sum(drawn == r) // np.sum(respondents == r) for r in set(drawn.tolist())) == 30
    generic = basic_interval(values.mean(), [values[idx].mean() for idx in resamples])
    direct = respondent_bootstrap(values, respondents)  # an independent implementation of the same bootstrap
    assert generic["mean"] == direct["mean"]
    assert generic["lo"] == pytest.approx(direct["lo"], abs=0.04) and generic["hi"] == pytest.approx(direct["hi"], abs=0.04)
    assert all(np.array_equal(a, b) for a, b in zip(resamples, respondent_resamples(respondents, 2000, seed=1)))


def group_examples(n_resp=60, per=4, seed=0):
    """Two groups that answer differently: group 0 mostly 'a', group 1 mostly 'c'."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(n_resp):
        g = r % 2
        for q in range(per):
            p = [0.7, 0.2, 0.1] if g == 0 else [0.1, 0.2, 0.7]
            out.append(SurveyExample(respondent_id=str(r), question_id=f"q{q}", profile="p", groups={"g": str(g)},
                                     question="?", choices=("a", "b", "c"), scores=(1.0, 2.0, 3.0), scale=(1.0, 3.0),
                                     target=int(rng.choice(3, p=p))))
    return out


def test_set_metric_intervals_hold_the_metrics_and_tell_an_oracle_from_the_majority():
    ex = group_examples()
    true = np.array([e.target for e in ex])
    oracle = E.Predictions(true, [np.eye(3)[t] * 6 - 3 for t in true])
    majority = E.Predictions(np.full(len(ex), int(np.bincount(true).argmax())), [np.zeros(3) for _ in ex])
    intervals, paired = E.set_metric_intervals(ex, {"oracle": oracle, "majority": majority, "same": oracle},
                                               reference="oracle", n_resamples=100)
    for name, pr in (("oracle", oracle), ("majority", majority)):
        m = E.evaluate_predictions(ex, pr.choice_idx, pr.choice_logits)
        iv = intervals[name]
        assert iv["emd"]["mean"] == pytest.approx(m["emd"]["mean"])
        assert iv["group_js"]["mean"] == pytest.approx(m["group_gaps"]["js"])
        assert iv["spread"]["mean"] == pytest.approx(m["group_gaps"]["between_group_spread"]["ratio"])
        assert iv["spread_soft"]["mean"] == pytest.approx(m["group_gaps"]["between_group_spread"]["ratio_soft"])
        assert iv["group_js_soft"]["mean"] == pytest.approx(m["group_gaps"]["js_soft"])
        assert iv["group_tv_soft"]["mean"] == pytest.approx(m["group_gaps"]["tv_soft"])
    assert intervals["majority"]["emd"]["lo"] < intervals["majority"]["emd"]["mean"] < intervals["majority"]["emd"]["hi"]
    assert intervals["oracle"]["emd"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
    assert paired["same"]["emd"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "verdict": "tie"}
    assert paired["majority"]["emd"]["verdict"] == "win" and paired["majority"]["group_js"]["verdict"] == "win"
    assert paired["majority"]["group_js_soft"]["verdict"] == "win"  # flat probabilities miss the groups' shares
    assert paired["majority"]["spread"]["verdict"] == "higher"  # the majority answers both groups alike
    text = E.format_intervals("oracle", {"n": len(ex), "intervals": {
        "accuracy": {"mean": 1.0, "lo": 1.0, "hi": 1.0}, **intervals["oracle"]}}, {
        "majority": {"accuracy": {"mean": 0.5, "lo": 0.4, "hi": 0.6, "verdict": "win"}, **paired["majority"]}})
    assert "group JS" in text and "(win)" in text and "(higher)" in text

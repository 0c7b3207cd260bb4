"""Sampled twins: a predictor's expected hard metrics with its answers drawn from its own probabilities."""
import numpy as np
import pytest

from cuma_model.survey import evaluate as E
from cuma_model.survey import sampled as S
from test_evaluate import ex


def toy_table():
    """Two groups answering one question: group a 3 of 4 choose 0, group b 1 of 4."""
    answers = {"a": [0, 0, 0, 1], "b": [0, 1, 1, 1]}
    return [ex(f"{g}{i}", "q", t, {"party": g}, k=2) for g, ts in answers.items() for i, t in enumerate(ts)]


def test_expected_accuracy_is_the_mean_probability_of_the_true_answer():
    examples = toy_table()
    floor = E.GroupMajority(["party"], min_count=1).fit(examples)
    pr = floor.predict(examples)
    proba = [np.exp(z) / np.exp(z).sum() for z in pr.choice_logits]
    # Laplace shares (3 + 1) / (4 + 2) = 2/3 for a group's majority answer: the closed form, on this table,
    # 6 answers of 8 are majority answers (p 2/3), 2 are minority answers (p 1/3)
    expected = (6 * 2 / 3 + 2 * 1 / 3) / 8
    assert S.expected_accuracy(proba, [e.target for e in examples]) == pytest.approx(expected)
    twin = E.sampled_twin(examples, pr.choice_logits, E.evaluate_predictions(examples, pr.choice_idx,
                                                                            pr.choice_logits), min_group_rows=1,
                          n_draws=400)
    assert twin["accuracy"] == pytest.approx(expected)
    assert twin["accuracy_drawn"] == pytest.approx(expected, abs=0.03)  # the draws agree with the closed form
    assert twin["accuracy"] < E.evaluate_predictions(examples, pr.choice_idx)["accuracy"]  # argmax: 6/8


def test_draws_follow_the_probabilities_and_sure_predictors_are_their_own_twins():
    rng = np.random.default_rng(0)
    drawn = S.draw_answers([np.array([0.2, 0.5, 0.3])] * 20000, rng)
    np.testing.assert_allclose(np.bincount(drawn, minlength=3) / drawn.size, [0.2, 0.5, 0.3], atol=0.01)
    # one-hot probabilities: every draw is the argmax, so the twin's hard metrics are the argmax metrics
    examples = toy_table()
    pred = np.array([e.target for e in examples])
    logits = [np.where(np.arange(2) == p, 0.0, -1e9) for p in pred]
    m = E.evaluate_predictions(examples, pred, logits, min_group_rows=1)
    twin = E.sampled_twin(examples, logits, m, min_group_rows=1, n_draws=3)
    assert twin["accuracy"] == pytest.approx(1.0)
    assert twin["group_gaps"]["js"] == pytest.approx(m["group_gaps"]["js"])
    assert twin["emd"]["mean"] == pytest.approx(m["emd"]["mean"])
    assert twin["nll"] == m["nll"] and twin["sampled"] is True


def test_a_calibrated_sampler_fits_the_groups_better_than_its_argmax():
    """The trap the sampled twins expose: drawing from the true group shares beats the argmax on hard group JS."""
    examples = toy_table() * 10
    examples = [ex(f"{i}", e.question_id, e.target, e.groups, k=2) for i, e in enumerate(examples)]
    floor = E.GroupMajority(["party"], min_count=1).fit(examples)
    pr = floor.predict(examples)
    m = E.evaluate_predictions(examples, pr.choice_idx, pr.choice_logits, min_group_rows=1)
    twin = E.sampled_twins(examples, {"group_majority": pr}, {"group_majority": m})["group_majority~sampled"]
    assert twin["group_gaps"]["js"] < m["group_gaps"]["js"]
    assert twin["accuracy"] < m["accuracy"]

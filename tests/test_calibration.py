"""Temperature scaling and the proper scores it moves: hand-computed cases."""
import numpy as np
import pytest

from cuma_model.survey import calibration as C
from cuma_model.survey import metrics as M


def test_temperature_fit_matches_a_hand_computed_case():
    # two choices, logit gap 2 log 3 on every row, the second choice right 3 times in 4: the NLL is least where
    # softmax(z / T) gives it 3/4, a gap of log 3, so T = 2
    logits = [np.array([0.0, 2 * np.log(3)])] * 4
    t = C.fit_temperature(logits, [1, 1, 1, 0])
    assert t == pytest.approx(2.0, rel=1e-4)
    assert C.mean_nll_at(logits, [1, 1, 1, 0], t) == pytest.approx(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    # an underconfident model is sharpened: gap log 3 / 2 needs T = 1/2
    assert C.fit_temperature([np.array([0.0, np.log(3) / 2])] * 4, [1, 1, 1, 0]) == pytest.approx(0.5, rel=1e-4)


def test_temperature_keeps_every_argmax_and_ignores_flat_logits():
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=k) for k in (2, 3, 5, 3)]
    scaled = C.scaled_logits(logits, 3.7)
    assert [int(z.argmax()) for z in scaled] == [int(z.argmax()) for z in logits]
    assert C.fit_temperature([np.zeros(3)] * 5, [0, 1, 2, 0, 1]) == 1.0


def test_temperature_refuses_bad_input():
    with pytest.raises(ValueError, match="at least one validation answer"):
        C.fit_temperature([], [])
    with pytest.raises(ValueError, match="2 logit rows for 1 answers"):
        C.fit_temperature([np.zeros(2)] * 2, [0])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        C.scaled_logits([np.zeros(2)], 0.0)


def test_brier_and_ranked_probability_scores_by_hand():
    p = [np.array([0.5, 0.3, 0.2]), np.array([0.6, 0.3, 0.1]), np.array([0.6, 0.3, 0.1])]
    true = [1, 2, 2]
    np.testing.assert_allclose(M.brier_scores(p, true), [0.25 + 0.49 + 0.04, 0.36 + 0.09 + 0.81, 1.26])
    # scores 1, 2, 3: cumulative p [0.5, 0.8] vs [0, 1]; [0.6, 0.9] vs [0, 0]; scores 3, 1, 2 reorder the
    # choices to (1, 2, 0): p [0.3, 0.1, 0.6], the answer second: [0.3, 0.4] vs [0, 1]
    rps = M.ranked_probability_scores(p, true, [(1, 2, 3), (1, 2, 3), (3, 1, 2)])
    np.testing.assert_allclose(rps, [(0.25 + 0.04) / 2, (0.36 + 0.81) / 2, (0.09 + 0.36) / 2])
    # a sure right answer scores 0 on both
    assert M.brier_scores([np.array([0.0, 1.0])], [1])[0] == 0.0
    assert M.ranked_probability_scores([np.array([0.0, 1.0])], [1], [(0, 1)])[0] == 0.0

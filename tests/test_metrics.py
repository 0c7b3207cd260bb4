import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy, wasserstein_distance

from cuma_model.survey import metrics as M


def test_accuracy_hand():
    assert M.accuracy([0, 1, 2, 1], [0, 1, 1, 1]) == 0.75
    with pytest.raises(ValueError):
        M.accuracy([0, 1], [0])


def test_macro_f1_hand():
    # A: P=1, R=1/2, F1=2/3; B: P=2/3, R=1, F1=4/5
    assert M.macro_f1(list("AABB"), list("ABBB")) == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_scale_scores():
    np.testing.assert_allclose(M.scale_scores([1, 2.5, 4], 1, 4), [0, 0.5, 1])
    np.testing.assert_allclose(M.scale_scores([-1, 0, 1], -1, 1), [0, 0.5, 1])


def test_emd_per_question_hand_and_scipy():
    q = ["q1", "q1", "q2", "q2", "q2"]
    t = [0.0, 1.0, 0.5, 0.5, 0.5]
    p = [0.0, 0.0, 0.5, 0.5, 0.5]
    e = M.emd_per_question(q, t, p)
    assert e == {"q1": pytest.approx(0.5), "q2": pytest.approx(0.0)}
    rng = np.random.default_rng(0)
    q = rng.integers(0, 4, 200)
    t, p = rng.random(200), rng.random(200)
    e = M.emd_per_question(q, t, p)
    for qid in range(4):
        assert e[qid] == pytest.approx(wasserstein_distance(t[q == qid], p[q == qid]))
    s = M.emd_summary(e)
    assert s["mean"] == pytest.approx(np.mean(list(e.values())))
    assert s["median"] == pytest.approx(np.median(list(e.values())))


def test_emd_auc_hand():
    assert len(M.EMD_AUC_THRESHOLDS) == 13
    assert M.emd_auc([0.0, 0.0]) == pytest.approx(60.0)
    # pct = 50 for th <= 0.45, 100 for th >= 0.5: 50*0.45 + 75*0.05 + 100*0.1
    assert M.emd_auc([0.0, 0.48]) == pytest.approx(36.25)
    assert M.emd_auc([0.9]) == pytest.approx(0.0)


def test_sigma_inequity_skipping_rules():
    correct = np.array([1] * 5 + [1, 1, 1, 0, 0] + [0] * 4 + [1] * 5, dtype=bool)
    sex = ["a"] * 5 + ["b"] * 5 + ["c"] * 4 + ["Unknown"] * 5   # c: 4 rows, Unknown: skipped
    age = ["x"] * 14 + ["y"] * 4 + [None]                      # y too small: only one subgroup left
    kept = ["nan"] * 5 + ["m"] * 14                            # the string "nan" is a label
    out = M.sigma_inequity(correct, {"sex": sex, "age": age})
    assert set(out["per_dimension"]) == {"sex"}
    assert out["per_dimension"]["sex"] == pytest.approx(np.std([1.0, 0.6]))
    assert out["mean"] == pytest.approx(0.2)
    out = M.sigma_inequity(correct, {"sex": sex, "kept": kept})
    acc_m = correct[5:].mean()
    assert out["per_dimension"]["kept"] == pytest.approx(np.std([1.0, acc_m]))
    assert out["mean"] == pytest.approx((0.2 + np.std([1.0, acc_m])) / 2)
    assert math.isnan(M.sigma_inequity(correct, {"age": age})["mean"])
    # a float NaN label is missing, not a group
    nan_lab = [float("nan")] * 5 + ["m"] * 14
    assert M.sigma_inequity(correct, {"d": nan_lab})["per_dimension"] == {}


def test_group_macro_accuracy_hand():
    correct = [1, 1, 1, 0, 1, 0]
    out = M.group_macro_accuracy(correct, {"party": ["d", "d", "d", "d", "r", "r"], "sex": ["f"] * 6})
    assert out["per_dimension"]["party"]["groups"] == {"d": 0.75, "r": 0.5}
    assert out["per_dimension"]["party"]["macro"] == pytest.approx(0.625)
    assert out["per_dimension"]["sex"]["macro"] == pytest.approx(4 / 6)
    assert out["mean"] == pytest.approx((0.625 + 4 / 6) / 2)


def test_choice_entropy_hand_and_scipy():
    h = M.choice_entropy([np.zeros(2), np.zeros(4), np.array([100.0, 0.0])])
    np.testing.assert_allclose(h, [math.log(2), math.log(4), 0.0], atol=1e-12)
    rng = np.random.default_rng(1)
    logits = [rng.normal(size=k).astype(np.float32) for k in (2, 3, 5)]
    for z, hz in zip(logits, M.choice_entropy(logits)):
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        assert hz == pytest.approx(entropy(p), rel=1e-6)


def test_choice_nll_hand_and_torch():
    nll = M.choice_nll([np.zeros(2), np.log([0.7, 0.2, 0.1]), np.array([100.0, 0.0])], [1, 2, 1])
    np.testing.assert_allclose(nll[:2], [np.log(2), -np.log(0.1)], rtol=1e-12)
    assert 99.0 < nll[2] < 101.0  # far from the truth: large and finite
    rng = np.random.default_rng(3)
    logits = [rng.normal(size=k) * 3 for k in (2, 3, 5, 4)]
    true = [1, 0, 4, 3]
    for z, t, got in zip(logits, true, M.choice_nll(logits, true)):
        want = torch.nn.functional.cross_entropy(torch.tensor(z)[None], torch.tensor([t])).item()
        assert got == pytest.approx(want, rel=1e-10)


def test_js_divergence_hand_and_scipy():
    assert M.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert M.js_divergence([0.5, 0.5], [0.5, 0.5]) == pytest.approx(0.0, abs=1e-12)
    p, q = np.array([0.2, 0.5, 0.3]), np.array([0.6, 0.1, 0.3])
    assert M.js_divergence(p, q) == pytest.approx(jensenshannon(p, q, base=2) ** 2)


def _gap_inputs(pred):
    # one question, two groups of 5: group a always answers 0, group b always 1
    q = ["q"] * 10
    true = [0] * 5 + [1] * 5
    return dict(question_ids=q, true_idx=true, pred_idx=pred, n_choices=[2] * 10,
                true_scaled=np.array(true, float), pred_scaled=np.array(pred, float),
                groups={"party": ["a"] * 5 + ["b"] * 5})


def test_group_gaps_collapsed_model():
    out = M.group_distribution_gaps(**_gap_inputs([0] * 10))
    # cell a: emd 0, js 0; cell b: emd 1, js 1; row-weighted mean 0.5
    assert out["emd"] == pytest.approx(0.5) and out["js"] == pytest.approx(0.5)
    s = out["between_group_spread"]
    assert s["pred_js"] == pytest.approx(0.0) and s["true_js"] == pytest.approx(1.0)
    assert s["ratio"] == pytest.approx(0.0)
    assert out["per_dimension"]["party"]["n_cells"] == 2


def test_group_gaps_faithful_model_and_min_rows():
    out = M.group_distribution_gaps(**_gap_inputs([0] * 5 + [1] * 5))
    assert out["emd"] == pytest.approx(0.0) and out["js"] == pytest.approx(0.0, abs=1e-12)
    assert out["between_group_spread"]["ratio"] == pytest.approx(1.0)
    small = M.group_distribution_gaps(**_gap_inputs([0] * 10), min_rows=6)
    assert small["n_cells"] == 0 and math.isnan(small["between_group_spread"]["ratio"])


def test_group_gaps_against_scipy_random():
    rng = np.random.default_rng(2)
    n = 300
    q = rng.integers(0, 3, n)
    t, p = rng.integers(0, 4, n), rng.integers(0, 4, n)
    g = rng.choice(["u", "v"], n)
    out = M.group_distribution_gaps(q, t, p, [4] * n, t / 3, p / 3, {"d": g}, min_rows=1)
    emds, jss, ws = [], [], []
    for qid in range(3):
        for lab in ("u", "v"):
            r = (q == qid) & (g == lab)
            emds.append(wasserstein_distance(t[r] / 3, p[r] / 3))
            td = np.bincount(t[r], minlength=4) / r.sum()
            pd_ = np.bincount(p[r], minlength=4) / r.sum()
            jss.append(jensenshannon(td, pd_, base=2) ** 2)
            ws.append(r.sum())
    assert out["emd"] == pytest.approx(np.average(emds, weights=ws))
    assert out["js"] == pytest.approx(np.average(jss, weights=ws))


def test_group_gaps_soft_probabilities():
    # both groups get probabilities [0.75, 0.25]: the soft spread is 0 while the true spread is 1 bit
    inputs = _gap_inputs([0] * 10)
    proba = [np.array([0.75, 0.25])] * 10
    out = M.group_distribution_gaps(**inputs, pred_proba=proba)
    s = out["between_group_spread"]
    assert s["pred_js_soft"] == pytest.approx(0.0, abs=1e-12) and s["ratio_soft"] == pytest.approx(0.0, abs=1e-12)
    # cell a: true [1, 0]; cell b: true [0, 1]; both against [0.75, 0.25]
    expected = (jensenshannon([1, 0], [0.75, 0.25], base=2) ** 2 + jensenshannon([0, 1], [0.75, 0.25], base=2) ** 2) / 2
    assert out["js_soft"] == pytest.approx(expected)
    # group-specific probabilities: soft spread equals the JS between the two groups' mean probabilities
    proba = [np.array([0.9, 0.1])] * 5 + [np.array([0.2, 0.8])] * 5
    s = M.group_distribution_gaps(**inputs, pred_proba=proba)["between_group_spread"]
    assert s["pred_js_soft"] == pytest.approx(jensenshannon([0.9, 0.1], [0.2, 0.8], base=2) ** 2)
    assert math.isnan(M.group_distribution_gaps(**inputs)["js_soft"])
    with pytest.raises(ValueError):
        M.group_distribution_gaps(**inputs, pred_proba=proba[:3])


def test_js_divergence_equal_distributions_is_zero_not_nan():
    # means of equal rows over different counts differ in the last bit; scipy's sqrt gives NaN on such pairs
    p = np.mean([np.full(3, 1 / 3)] * 7, axis=0)
    q = np.mean([np.full(3, 1 / 3)] * 11, axis=0)
    assert M.js_divergence(p, q) == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(5)
    for _ in range(20):
        a, b = rng.dirichlet(np.ones(4)), rng.dirichlet(np.ones(4))
        assert M.js_divergence(a, b) == pytest.approx(jensenshannon(a, b, base=2) ** 2, rel=1e-9)


def _loop_gaps(q, t, p, nc, ts, ps, groups, min_rows, proba):
    """Every cell and every pair of groups one at a time, with scipy: the oracle of group_distribution_gaps."""
    def js(a, b):
        return jensenshannon(a, b, base=2) ** 2

    cells, spread = [], []
    for labels in groups.values():
        labels = np.array([None if x is None or x == "Unknown" else x for x in labels], dtype=object)
        for qid in dict.fromkeys(q):
            rows, k, dists = np.flatnonzero(q == qid), None, []
            k = nc[rows[0]]
            for g in dict.fromkeys(labels[rows]):
                r = rows[labels[rows] == g]
                if g is None or r.size < min_rows:
                    continue
                td, pd_ = np.bincount(t[r], minlength=k) / r.size, np.bincount(p[r], minlength=k) / r.size
                sd = np.mean([proba[i] for i in r], axis=0)
                cells.append((r.size, wasserstein_distance(ts[r], ps[r]), js(td, pd_), js(td, sd)))
                dists.append((r.size, td, pd_, sd))
            if len(dists) >= 2:
                pairs = [(a, b) for a in range(len(dists)) for b in range(a + 1, len(dists))]
                spread.append([sum(d[0] for d in dists)] + [np.mean([js(dists[a][j], dists[b][j]) for a, b in pairs])
                                                            for j in (2, 1, 3)])
    cells, spread = np.array(cells), np.array(spread)
    w = cells[:, 0]
    pj, tj, sj = (np.average(spread[:, j], weights=spread[:, 0]) for j in (1, 2, 3))
    return {"emd": np.average(cells[:, 1], weights=w), "js": np.average(cells[:, 2], weights=w),
            "js_soft": np.average(cells[:, 3], weights=w), "n_cells": len(cells), "pred_js": pj, "true_js": tj,
            "ratio": pj / tj, "ratio_soft": sj / tj}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_gaps_equal_the_cell_by_cell_computation(seed):
    rng = np.random.default_rng(seed)
    n = 400
    q = rng.choice(["q1", "q2", "q3", "q4"], n)
    nc = np.where(q == "q2", 2, np.where(q == "q4", 5, 4))  # questions with 2, 4 and 5 choices
    t, p = rng.integers(0, 10**6, n) % nc, rng.integers(0, 10**6, n) % nc
    ts, ps = t / (nc - 1), p / (nc - 1)
    groups = {"party": rng.choice(["a", "b", "c", None], n, p=[0.4, 0.3, 0.2, 0.1]),
              "age": rng.choice(["young", "old", "Unknown"], n)}
    proba = [rng.dirichlet(np.ones(k)) for k in nc]
    got = M.group_distribution_gaps(q, t, p, nc, ts, ps, groups, min_rows=8, pred_proba=proba)
    want = _loop_gaps(q, t, p, nc, ts, ps, groups, 8, proba)
    spread = got["between_group_spread"]
    for key in ("emd", "js", "js_soft"):
        assert got[key] == pytest.approx(want[key], rel=1e-9), key
    assert got["n_cells"] == want["n_cells"]
    for key in ("pred_js", "true_js", "ratio", "ratio_soft"):
        assert spread[key] == pytest.approx(want[key], rel=1e-9), key


def test_group_gaps_take_probabilities_padded_wider_than_the_subset():
    # a bootstrap resample can miss the widest question the probabilities were padded for
    inputs = _gap_inputs([0] * 5 + [1] * 5)
    proba = np.array([[0.75, 0.25, 0.0]] * 5 + [[0.1, 0.9, 0.0]] * 5)
    codes = {"party": M._codes(inputs["groups"]["party"], missing=None)}
    got = M.gaps_of_codes(M._codes(inputs["question_ids"])[0], inputs["true_idx"], inputs["pred_idx"],
                          inputs["n_choices"], inputs["true_scaled"], inputs["pred_scaled"], codes, proba=proba)
    want = M.group_distribution_gaps(**inputs, pred_proba=[p[:2] for p in proba])
    assert got["js_soft"] == pytest.approx(want["js_soft"]) and want["js_soft"] > 0
    assert got["between_group_spread"]["ratio_soft"] == pytest.approx(want["between_group_spread"]["ratio_soft"])


def test_total_variation_per_cell_hard_and_soft():
    assert M.total_variation([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    q = ["q"] * 4
    true = [0, 0, 1, 1]
    pred = [0, 0, 0, 0]
    proba = [np.array([0.5, 0.5])] * 4
    gaps = M.group_distribution_gaps(q, true, pred, [2] * 4, [0, 0, 1, 1], [0, 0, 0, 0], {"g": ["a"] * 4},
                                     min_rows=1, pred_proba=proba)
    assert gaps["tv"] == pytest.approx(0.5) and gaps["tv_soft"] == pytest.approx(0.0)
    assert gaps["js_soft"] == pytest.approx(0.0) and gaps["js"] > 0


def test_group_noise_floor_of_two_halves():
    # a cell whose answers all agree: its halves agree; a cell of two different answers: halves of one each differ
    # completely (TV 1, JS 1 bit); weighted by rows (4 and 2)
    q = ["q1"] * 4 + ["q2"] * 2
    true = [1, 1, 1, 1, 0, 1]
    noise = M.group_noise_floor(q, true, [2] * 6, {"g": ["a"] * 6}, min_rows=2, n_splits=3)
    assert noise["n_cells"] == 2 and noise["n_splits"] == 3
    assert noise["tv"] == pytest.approx(2 / 6) and noise["js"] == pytest.approx(2 / 6)
    # cells under min_rows do not count; none left gives NaN
    assert math.isnan(M.group_noise_floor(q, true, [2] * 6, {"g": ["a"] * 6}, min_rows=5)["js"])

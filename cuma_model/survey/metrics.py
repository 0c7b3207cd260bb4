"""Evaluation metrics on plain arrays: proper scores (NLL, Brier, ranked probability score), accuracy, macro-F1,
WorldValuesBench EMD, sigma-inequity, group distribution gaps and their noise floor, mean-collapse.

Every function here takes numpy arrays (or lists) and returns floats or plain dicts, so it can be checked by hand and
against scipy. Conventions shared by all of them:

- `true_idx`, `pred_idx`: int arrays [N] of choice indices.
- `question_ids`: array [N] of question ids; rows of one question are compared with each other only.
- scores are "scaled" ordinal values in [0, 1]: `(x - min) / (max - min)` with the question's answer scale.
- group labels: array [N] of strings for one demographic dimension; `None`, float NaN and the labels in
  `MISSING_LABELS` mark an unknown value and the row is left out of that dimension (the string "nan" is kept,
  as in the published evaluation).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy.special import rel_entr
from scipy.stats import wasserstein_distance
from sklearn.metrics import f1_score

MISSING_LABELS = frozenset({"Unknown"})
EMD_AUC_THRESHOLDS = np.arange(0, 0.6 + 1e-8, 0.05)


def accuracy(true_idx: Sequence[int], pred_idx: Sequence[int]) -> float:
    """Share of rows whose predicted choice index equals the target."""
    t, p = np.asarray(true_idx), np.asarray(pred_idx)
    if t.shape != p.shape:
        raise ValueError(f"true {t.shape} and pred {p.shape} differ in shape")
    if t.size == 0:
        return float("nan")
    return float(np.mean(t == p))


def macro_f1(true_letters: Sequence[str], pred_letters: Sequence[str]) -> float:
    """sklearn macro-F1 pooled over all questions, the answer letters as classes (the published definition)."""
    if len(true_letters) == 0:
        return float("nan")
    return float(f1_score(list(true_letters), list(pred_letters), average="macro", zero_division=0))


def scale_scores(scores: Sequence[float], lo: float, hi: float) -> np.ndarray:
    """Map ordinal answer values onto [0, 1] with the question's scale: (x - lo) / (hi - lo)."""
    if hi == lo:
        raise ValueError(f"degenerate answer scale ({lo}, {hi})")
    return (np.asarray(scores, dtype=np.float64) - lo) / (hi - lo)


def emd_per_question(question_ids: Sequence, true_scaled: Sequence[float], pred_scaled: Sequence[float]) -> dict:
    """WorldValuesBench EMD: per question, W1 between the true and the predicted scaled scores of its respondents.

    Returns {question_id: EMD_q} with `scipy.stats.wasserstein_distance(true, pred)` on that question's rows.
    """
    q = np.asarray(question_ids)
    t = np.asarray(true_scaled, dtype=np.float64)
    p = np.asarray(pred_scaled, dtype=np.float64)
    out = {}
    for qid in _unique_in_order(q):
        rows = q == qid
        out[qid] = float(wasserstein_distance(t[rows], p[rows]))
    return out


def emd_auc(emd_values: Iterable[float], thresholds: np.ndarray = EMD_AUC_THRESHOLDS) -> float:
    """Area under pct(th) = 100 * mean(EMD_q <= th) over thresholds 0..0.6 step 0.05 (trapezoid; maximum 60)."""
    e = np.asarray(list(emd_values), dtype=np.float64)
    if e.size == 0:
        return float("nan")
    pct = np.array([100.0 * np.mean(e <= th) for th in thresholds])
    return float(np.trapezoid(pct, thresholds))


def emd_summary(per_question: Mapping) -> dict:
    """Mean, median and AUC of the per-question EMDs."""
    e = np.asarray(list(per_question.values()), dtype=np.float64)
    if e.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "auc": float("nan"), "n_questions": 0}
    return {"mean": float(e.mean()), "median": float(np.median(e)), "auc": emd_auc(e), "n_questions": int(e.size)}


def is_missing(label) -> bool:
    """True for None, float NaN and the labels in MISSING_LABELS (the string "nan" is a real label)."""
    if label is None:
        return True
    if isinstance(label, float) and math.isnan(label):
        return True
    return label in MISSING_LABELS


def group_accuracies(correct: Sequence[bool], labels: Sequence, min_rows: int = 1) -> dict:
    """{label: (accuracy, n_rows)} over the known labels with at least `min_rows` rows."""
    c = np.asarray(correct, dtype=bool)
    lab = _label_array(labels)
    if lab.size != c.size:
        raise ValueError("labels and correct differ in length")
    out = {}
    for g in _unique_in_order(lab):
        if g is None:
            continue
        rows = lab == g
        n = int(rows.sum())
        if n >= min_rows:
            out[g] = (float(c[rows].mean()), n)
    return out


def sigma_inequity(correct: Sequence[bool], groups: Mapping[str, Sequence], min_rows: int = 5,
                   min_groups: int = 2) -> dict:
    """sigma-inequity: per dimension np.std (ddof 0) of subgroup accuracies, averaged over dimensions.

    groups: {dimension: labels [N]}. Subgroups with fewer than `min_rows` rows or a missing label are skipped; a
    dimension counts only with at least `min_groups` subgroups left. Returns {"mean", "per_dimension"}; the mean is
    NaN when no dimension counts.
    """
    per_dim = {}
    for dim, labels in groups.items():
        accs = group_accuracies(correct, labels, min_rows=min_rows)
        if len(accs) >= min_groups:
            per_dim[dim] = float(np.std([a for a, _ in accs.values()]))
    mean = float(np.mean(list(per_dim.values()))) if per_dim else float("nan")
    return {"mean": mean, "per_dimension": per_dim}


def group_macro_accuracy(correct: Sequence[bool], groups: Mapping[str, Sequence], min_rows: int = 1) -> dict:
    """Per dimension, the mean over its groups of per-group accuracy (each group weighs the same); and their mean.

    Returns {"mean", "per_dimension": {dim: {"macro", "groups": {label: accuracy}}}}. Missing labels are skipped.
    """
    per_dim = {}
    for dim, labels in groups.items():
        accs = group_accuracies(correct, labels, min_rows=min_rows)
        if accs:
            per_dim[dim] = {"macro": float(np.mean([a for a, _ in accs.values()])),
                            "groups": {str(g): a for g, (a, _) in accs.items()}}
    mean = float(np.mean([d["macro"] for d in per_dim.values()])) if per_dim else float("nan")
    return {"mean": mean, "per_dimension": per_dim}


def softmax_rows(choice_logits: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Softmax of each example's choice logits: list of float64 [n_choices_i]."""
    out = []
    for z in choice_logits:
        z = np.asarray(z, dtype=np.float64)
        e = np.exp(z - z.max())
        out.append(e / e.sum())
    return out


def choice_entropy(choice_logits: Sequence[np.ndarray]) -> np.ndarray:
    """Per-example Shannon entropy (nats) of the softmax over that example's valid choice-letter logits.

    choice_logits: list of [n_choices_i] float arrays. Returns float64 [N]. A mean-collapsed model that is sure of
    one answer has entropy near 0; uniform over n choices gives log(n).
    """
    return np.array([float(-np.sum(p[p > 0] * np.log(p[p > 0]))) for p in softmax_rows(choice_logits)],
                    dtype=np.float64)


def choice_nll(choice_logits: Sequence[np.ndarray], true_idx: Sequence[int]) -> np.ndarray:
    """Per-example negative log-likelihood (nats) of the true choice under the softmax of its choice logits.

    Unlike accuracy it credits a model for learning each question's answer distribution even where its argmax
    stays on the overall majority answer. float64 [N].
    """
    return np.array([float(-np.log(max(p[int(t)], np.finfo(np.float64).tiny)))
                     for p, t in zip(softmax_rows(choice_logits), true_idx)], dtype=np.float64)


def brier_scores(proba: Sequence[np.ndarray], true_idx: Sequence[int]) -> np.ndarray:
    """Per-example multi-class Brier score: sum over choices of (p_j - 1[j = true])^2, in [0, 2]. float64 [N]."""
    out = np.empty(len(proba), dtype=np.float64)
    for i, (p, t) in enumerate(zip(proba, true_idx)):
        onehot = np.zeros(len(p))
        onehot[int(t)] = 1.0
        out[i] = float(np.sum((np.asarray(p, dtype=np.float64) - onehot) ** 2))
    return out


def ranked_probability_scores(proba: Sequence[np.ndarray], true_idx: Sequence[int],
                              choice_scores: Sequence[Sequence[float]]) -> np.ndarray:
    """Per-example ranked probability score of an ordinal answer: the choices ordered by their scores, the mean over
    the K - 1 thresholds of (predicted cumulative probability - observed cumulative indicator)^2, in [0, 1].

    Unlike NLL and Brier it credits probability placed near the true answer on the scale. float64 [N]."""
    out = np.empty(len(proba), dtype=np.float64)
    for i, (p, t, sc) in enumerate(zip(proba, true_idx, choice_scores)):
        order = np.argsort(np.asarray(sc, dtype=np.float64), kind="stable")
        p = np.asarray(p, dtype=np.float64)[order]
        observed = (order == int(t)).astype(np.float64)
        gaps = (np.cumsum(p) - np.cumsum(observed))[:-1]
        out[i] = float(np.mean(gaps ** 2)) if gaps.size else 0.0
    return out


def answer_distribution(idx: Sequence[int], n_choices: int) -> np.ndarray:
    """Empirical distribution [n_choices] of the choice indices `idx`."""
    counts = np.bincount(np.asarray(idx, dtype=np.int64), minlength=n_choices).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence in bits (in [0, 1]); scipy's `jensenshannon(p, q, base=2)` is its square root.

    Computed directly and clipped at 0: scipy's square root turns the rounding of two equal distributions into NaN.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    js = 0.5 * (rel_entr(p, m).sum() + rel_entr(q, m).sum()) / np.log(2)
    return float(max(js, 0.0))


def total_variation(p: Sequence[float], q: Sequence[float]) -> float:
    """Total variation distance between two distributions (each normalised): half the L1 gap, in [0, 1]."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


def group_noise_floor(question_ids: Sequence, true_idx: Sequence[int], n_choices: Sequence[int],
                      groups: Mapping[str, Sequence], min_rows: int = 5, n_splits: int = 5, seed: int = 0) -> dict:
    """The distance between two random halves of the true answers of each (dimension, group, question) cell: the
    JS divergence (bits) and total variation that sampling noise alone puts between two samples of the cell.

    Cells as in `group_distribution_gaps` (at least `min_rows` rows, and 2). Each split shuffles each cell's rows
    (seeded) and halves them; the distances are averaged over cells weighted by rows and over `n_splits` splits.
    Returns {"js", "tv", "n_cells", "n_splits"}."""
    q_index = _codes(question_ids)[0]
    t = np.asarray(true_idx, dtype=np.int64)
    width = int(max(np.max(n_choices, initial=1), t.max(initial=-1) + 1))
    rng = np.random.default_rng(seed)
    js, tv, total, n_cells = 0.0, 0.0, 0.0, 0
    for labels in groups.values():
        g_index, n_groups = _codes(_label_array(labels), missing=None)
        keep = np.flatnonzero(g_index >= 0)
        cell_ids, cell_of, n = np.unique(q_index[keep] * max(n_groups, 1) + g_index[keep], return_inverse=True,
                                         return_counts=True)
        big = n >= max(min_rows, 2)
        n_cells += int(big.sum())
        onehot = np.eye(width)[t[keep]]
        start = np.concatenate([[0], np.cumsum(n)[:-1]])
        for _ in range(n_splits):
            order = np.lexsort((rng.random(keep.size), cell_of))  # rows by cell, shuffled within it
            rank = np.empty(keep.size, dtype=np.int64)
            rank[order] = np.arange(keep.size) - start[cell_of[order]]
            first = rank < n[cell_of] // 2
            a = _row_sums(cell_of[first], onehot[first], len(cell_ids))[big]
            b = _row_sums(cell_of[~first], onehot[~first], len(cell_ids))[big]
            js += float(np.sum(_js_rows(a, b) * n[big]))
            tv += float(np.sum(_tv_rows(a, b) * n[big]))
            total += float(np.sum(n[big]))
    if not n_cells:
        return {"js": float("nan"), "tv": float("nan"), "n_cells": 0, "n_splits": n_splits}
    return {"js": float(js / total), "tv": float(tv / total), "n_cells": n_cells, "n_splits": n_splits}


def group_distribution_gaps(question_ids: Sequence, true_idx: Sequence[int], pred_idx: Sequence[int],
                            n_choices: Sequence[int], true_scaled: Sequence[float], pred_scaled: Sequence[float],
                            groups: Mapping[str, Sequence], min_rows: int = 5,
                            pred_proba: Sequence[np.ndarray] | None = None) -> dict:
    """How far each group's predicted answer distribution is from its true one, and how far apart groups are.

    A cell is one (dimension, group, question) with at least `min_rows` rows. Per cell:
    - `emd`: W1 between the true and predicted scaled scores of the cell's rows;
    - `js`: JS divergence (bits) between the true and predicted answer distributions (hard predictions).
    - `js_soft` (with `pred_proba`, the per-row answer probabilities): JS between the true distribution and the
      mean predicted probabilities of the cell's rows;
    - `tv`, `tv_soft`: the total variation distance between the same pairs.
    `group_noise_floor` gives what sampling noise alone puts between two halves of each cell's true answers.
    These are averaged over cells weighted by rows, per dimension and over all dimensions' cells.

    Between-group spread, per (dimension, question) with >= 2 qualifying groups: the mean pairwise JS divergence
    between the groups' predicted distributions (`pred_js`) and between their true ones (`true_js`); averaged over
    questions (weighted by the question's rows in those groups). `ratio = pred_js / true_js`: near 1 when the model
    keeps groups as far apart as they really are, near 0 when it answers every group alike (mean collapse), above 1
    when it exaggerates differences. Hard predictions make each group's predicted distribution peaked, which
    inflates `pred_js` (two groups with different majorities are 1 bit apart); `pred_js_soft` / `ratio_soft` use the
    mean predicted probabilities instead and are the fairer comparison for a model. Finite samples give `true_js` a
    positive noise floor.
    """
    codes = {dim: _codes(_label_array(labels), missing=None) for dim, labels in groups.items()}
    proba = _padded_rows(pred_proba, n_choices, len(question_ids)) if pred_proba is not None else None
    return gaps_of_codes(_codes(question_ids)[0], true_idx, pred_idx, n_choices, true_scaled, pred_scaled, codes,
                         min_rows, proba)


def gaps_of_codes(q_index: np.ndarray, true_idx, pred_idx, n_choices, true_scaled, pred_scaled,
                  groups: Mapping[str, tuple[np.ndarray, int]], min_rows: int = 5,
                  proba: np.ndarray | None = None) -> dict:
    """`group_distribution_gaps` on integer codes: question codes [N], {dimension: (group codes [N] with -1 where
    missing, number of groups)} and the predicted probabilities as one zero-padded [N, K] matrix. For callers that
    score many subsets of one set of answers (bootstrap resamples): the codes are computed once."""
    t = np.asarray(true_idx, dtype=np.int64)
    p = np.asarray(pred_idx, dtype=np.int64)
    nc = np.asarray(n_choices, dtype=np.int64)
    ts = np.asarray(true_scaled, dtype=np.float64)
    ps = np.asarray(pred_scaled, dtype=np.float64)
    width = int(max(nc.max(initial=0), t.max(initial=-1) + 1, p.max(initial=-1) + 1, 1))
    if proba is not None:  # padded to the widest question of a larger set, or to be padded to this subset's
        width = max(width, proba.shape[1])
        proba = np.pad(proba, ((0, 0), (0, width - proba.shape[1])))

    per_dim = {}
    # arrays of (n, emd, js, js_soft, tv, tv_soft) and (weight, pred_js, true_js, pred_js_soft)
    all_cells, all_spread = [], []
    for dim, (g_index, n_groups) in groups.items():
        keep = np.flatnonzero(g_index >= 0)
        # a cell is one (question, group); rows without the dimension's label belong to none
        cell = q_index[keep] * max(n_groups, 1) + g_index[keep]
        cell_ids, cell_of, n = np.unique(cell, return_inverse=True, return_counts=True)
        true_d = _row_sums(cell_of, np.eye(width)[t[keep]], len(cell_ids))
        pred_d = _row_sums(cell_of, np.eye(width)[p[keep]], len(cell_ids))
        soft_d = _row_sums(cell_of, proba[keep], len(cell_ids)) if proba is not None else None
        # W1 of two samples of one size: the mean gap between their sorted values
        by_true, by_pred = np.lexsort((ts[keep], cell_of)), np.lexsort((ps[keep], cell_of))
        emd = np.bincount(cell_of[by_true], np.abs(ts[keep][by_true] - ps[keep][by_pred]), len(cell_ids)) / n
        big = n >= min_rows
        no_soft = np.full(n.shape, np.nan)
        cells = np.stack([n, emd, _js_rows(true_d, pred_d),
                          _js_rows(true_d, soft_d) if soft_d is not None else no_soft, _tv_rows(true_d, pred_d),
                          _tv_rows(true_d, soft_d) if soft_d is not None else no_soft], 1)[big]
        spread = _spread_rows(cell_ids[big] // max(n_groups, 1), n[big], pred_d[big], true_d[big],
                              soft_d[big] if soft_d is not None else None)
        all_cells.append(cells)
        all_spread += spread
        per_dim[dim] = {**_weighted_cells(cells), "between_group_spread": _weighted_spread(spread)}
    cells = np.concatenate(all_cells) if all_cells else np.zeros((0, 6))
    return {**_weighted_cells(cells), "between_group_spread": _weighted_spread(all_spread),
            "per_dimension": per_dim}


def _spread_rows(question_of: np.ndarray, n: np.ndarray, pred_d, true_d, soft_d) -> list:
    """(rows, mean pairwise JS of the predicted, true and soft distributions) of each question with >= 2 cells."""
    a, b = np.nonzero(np.triu(question_of[:, None] == question_of[None, :], 1))
    if not a.size:
        return []
    questions, pair_of, pairs = np.unique(question_of[a], return_inverse=True, return_counts=True)
    rows = np.bincount(question_of, n)[questions]

    def mean_js(d):
        if d is None:
            return np.full(len(questions), np.nan)
        return np.bincount(pair_of, _js_rows(d[a], d[b]), len(questions)) / pairs

    return list(zip(rows.tolist(), mean_js(pred_d).tolist(), mean_js(true_d).tolist(), mean_js(soft_d).tolist()))


def _padded_rows(rows: Sequence[np.ndarray], n_choices, n: int) -> np.ndarray:
    """The per-example probability rows as one [N, K] matrix, zero-padded to the widest."""
    if len(rows) != n:
        raise ValueError(f"{len(rows)} probability rows for {n} examples")
    out = np.zeros((n, max([len(r) for r in rows] + [int(np.max(n_choices, initial=1))])))
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


_NOTHING = object()  # a `missing` that no value is


def _codes(values, missing=_NOTHING) -> tuple[np.ndarray, int]:
    """(int64 [N] codes in order of first appearance, number of distinct values); `missing` values get -1."""
    codes, out = {}, np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        out[i] = -1 if v is missing else codes.setdefault(v, len(codes))
    return out, len(codes)


def _row_sums(cell_of: np.ndarray, rows: np.ndarray, n_cells: int) -> np.ndarray:
    """[n_cells, K]: the sum of the rows [N, K] of each cell."""
    out = np.zeros((n_cells, rows.shape[1]))
    np.add.at(out, cell_of, rows)
    return out


def _js_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """`js_divergence` of each row pair of p and q ([M, K] counts or weights, each row normalised)."""
    p = p / p.sum(1, keepdims=True)
    q = q / q.sum(1, keepdims=True)
    m = (p + q) / 2
    return np.maximum(0.5 * (rel_entr(p, m).sum(1) + rel_entr(q, m).sum(1)) / np.log(2), 0.0)


_CELL_METRICS = ("emd", "js", "js_soft", "tv", "tv_soft")


def _tv_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """`total_variation` of each row pair of p and q ([M, K] counts or weights, each row normalised)."""
    return 0.5 * np.abs(p / p.sum(1, keepdims=True) - q / q.sum(1, keepdims=True)).sum(1)


def _weighted_cells(cells: np.ndarray) -> dict:
    if not len(cells):
        return {**{m: float("nan") for m in _CELL_METRICS}, "n_cells": 0}
    w = cells[:, 0]
    return {**{m: float(np.average(cells[:, j + 1], weights=w)) for j, m in enumerate(_CELL_METRICS)},
            "n_cells": len(cells)}


def _weighted_spread(spread: list) -> dict:
    if not spread:
        nan = float("nan")
        return {"pred_js": nan, "true_js": nan, "ratio": nan, "pred_js_soft": nan, "ratio_soft": nan,
                "n_questions": 0}
    w = np.array([s[0] for s in spread], dtype=np.float64)
    pj, tj, sj = (float(np.average([s[i] for s in spread], weights=w)) for i in (1, 2, 3))
    ratio = (lambda x: x / tj if tj > 0 else float("nan"))
    return {"pred_js": pj, "true_js": tj, "ratio": ratio(pj), "pred_js_soft": sj, "ratio_soft": ratio(sj),
            "n_questions": len(spread)}


def _label_array(labels) -> np.ndarray:
    """Object array of string labels, None where the label is missing."""
    return np.array([None if is_missing(x) else str(x) for x in labels], dtype=object)


def _unique_in_order(values) -> list:
    seen, out = set(), []
    for v in values:
        key = v if not (isinstance(v, float) and math.isnan(v)) else "__nan__"
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out

"""A predictor's sampled twin: answers drawn at random from its own probabilities instead of taken at its argmax.

Hard-prediction metrics (group JS, EMD, between-group spread) reward a predictor whose answers are spread like the
true ones; drawing each answer from a calibrated floor's probabilities spreads them so, at a cost in accuracy. A
model's hard-metric gain over a floor's argmax means little when the floor's sampled twin matches it.

Expected values under sampling: accuracy in closed form (the mean probability of the true answer); the set metrics,
which are not linear in the answers, as the mean over `n_draws` seeded draws. Proper scores and every metric of
the probabilities are the predictor's own: sampling changes the answers, not the probabilities.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cuma_model.survey import metrics as M

N_DRAWS = 20


def expected_accuracy(proba: Sequence[np.ndarray], true_idx: Sequence[int]) -> float:
    """The expected accuracy of answers drawn from `proba`: the mean probability of the true answer."""
    if not len(proba):
        return float("nan")
    return float(np.mean([p[int(t)] for p, t in zip(proba, true_idx)]))


def draw_answers(proba: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One answer index per row drawn from that row's probabilities (int64 [N])."""
    u = rng.random(len(proba))
    return np.array([min(int(np.searchsorted(np.cumsum(p), x * np.sum(p), side="right")), len(p) - 1)
                     for p, x in zip(proba, u)], dtype=np.int64)


def sampled_metrics(question_ids: Sequence, true_idx: Sequence[int], choice_scaled: Sequence[np.ndarray],
                    proba: Sequence[np.ndarray], groups: Mapping[str, Sequence], min_group_rows: int = 5,
                    n_draws: int = N_DRAWS, seed: int = 0) -> dict:
    """The hard-prediction metrics of answers drawn from `proba`, in expectation.

    choice_scaled: each row's choices' scaled scores (for the EMD). Returns {"accuracy" (closed form),
    "accuracy_drawn" (mean over the draws, a check of the closed form), "emd": {"mean"}, "group_gaps": {"emd",
    "js", "tv", "between_group_spread": {"ratio"}}, "n_draws", "seed"}; each set metric is the mean over draws."""
    q = np.asarray(question_ids, dtype=object)
    t = np.asarray(true_idx, dtype=np.int64)
    n_choices = np.array([len(p) for p in proba], dtype=np.int64)
    true_scaled = np.array([s[i] for s, i in zip(choice_scaled, t)], dtype=np.float64)
    rng = np.random.default_rng(seed)
    keys = ("accuracy_drawn", "emd", "group_emd", "group_js", "group_tv", "spread")
    draws = {k: [] for k in keys}
    for _ in range(n_draws):
        pred = draw_answers(proba, rng)
        pred_scaled = np.array([s[i] for s, i in zip(choice_scaled, pred)], dtype=np.float64)
        gaps = M.group_distribution_gaps(q, t, pred, n_choices, true_scaled, pred_scaled, groups,
                                         min_rows=min_group_rows)
        values = (M.accuracy(t, pred), M.emd_summary(M.emd_per_question(q, true_scaled, pred_scaled))["mean"],
                  gaps["emd"], gaps["js"], gaps["tv"], gaps["between_group_spread"]["ratio"])
        for k, v in zip(keys, values):
            draws[k].append(v)
    mean = {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            for k, v in ((k, np.asarray(v, dtype=np.float64)) for k, v in draws.items())}
    return {"accuracy": expected_accuracy(proba, t), "accuracy_drawn": mean["accuracy_drawn"],
            "emd": {"mean": mean["emd"]},
            "group_gaps": {"emd": mean["group_emd"], "js": mean["group_js"], "tv": mean["group_tv"],
                           "between_group_spread": {"ratio": mean["spread"]}},
            "n_draws": n_draws, "seed": seed}

"""95% intervals that respect respondents: a bootstrap that resamples respondents, not answers.

One respondent's answers are correlated (the same person answers every question), so resampling single answers
would make intervals too narrow. Each resample draws as many respondents as there are, with replacement, and
takes every answer of each. Seeded: the same inputs give the same interval.

- `respondent_bootstrap`: a mean over answers (accuracy, NLL, their paired differences), from per-respondent sums;
  the percentile interval.
- `respondent_resamples` + `basic_interval`: any statistic of a set of answers (EMD, group JS, spread),
  recomputed on each resample's answers; fewer resamples (`SET_RESAMPLES`), since each costs a full metric.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

N_RESAMPLES = 2000
SET_RESAMPLES = 200
LEVEL = 0.95


def respondent_bootstrap(values: Sequence[float], respondents: Sequence, n_resamples: int = N_RESAMPLES,
                         level: float = LEVEL, seed: int = 0) -> dict:
    """{"mean", "lo", "hi"} of the mean of `values` (one per answer) over respondents resampled with replacement."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (len(respondents),):
        raise ValueError(f"{values.shape[0] if values.ndim else 0} values for {len(respondents)} respondent ids")
    if not len(values):
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan")}
    _, cluster = np.unique(np.asarray([str(r) for r in respondents]), return_inverse=True)
    sums = np.bincount(cluster, weights=values)
    counts = np.bincount(cluster).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(sums), np.full(len(sums), 1.0 / len(sums)), size=n_resamples)  # [B, respondents]
    means = (draws @ sums) / (draws @ counts)
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return {"mean": float(values.mean()), "lo": float(lo), "hi": float(hi)}


def respondent_resamples(respondents: Sequence, n_resamples: int = SET_RESAMPLES, seed: int = 0) -> list[np.ndarray]:
    """Answer indices of each resample: as many respondents as there are, drawn with replacement, every answer of
    each drawn respondent (a respondent drawn twice counts twice)."""
    _, cluster = np.unique(np.asarray([str(r) for r in respondents]), return_inverse=True)
    answers = [np.flatnonzero(cluster == c) for c in range(cluster.max() + 1)] if len(cluster) else []
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(answers), size=(n_resamples, len(answers))) if answers else []
    return [np.concatenate([answers[c] for c in draw]) for draw in draws]


def basic_interval(point: float, resampled: Sequence[float], level: float = LEVEL) -> dict:
    """{"mean": point, "lo", "hi"}: the basic (reverse percentile) bootstrap interval [2 point - q_hi, 2 point - q_lo]
    of the finite resampled values (NaN without any).

    For the metrics of a set of answers: a resample holds fewer distinct respondents, which raises plug-in
    statistics such as a group JS (their finite-sample noise floor rises with fewer answers per cell). The basic
    interval moves the other way by that shift, as the estimate itself sits above the truth; when the shift is
    more than half the interval's width the point estimate lies above its own interval, and says so. Paired
    differences of two methods on the same resamples are shifted alike, and the shift mostly cancels."""
    values = np.asarray(resampled, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size or not np.isfinite(point):
        return {"mean": float(point), "lo": float("nan"), "hi": float("nan")}
    tail = (1.0 - level) / 2
    q_lo, q_hi = np.quantile(values, [tail, 1.0 - tail])
    return {"mean": float(point), "lo": float(2 * point - q_hi), "hi": float(2 * point - q_lo)}


def verdict(interval: dict, higher_is_better: bool = True) -> str:
    """"win", "loss" or "tie" for a difference (this method minus another): a tie when its interval holds 0."""
    if interval["lo"] <= 0.0 <= interval["hi"]:
        return "tie"
    better = interval["lo"] > 0.0 if higher_is_better else interval["hi"] < 0.0
    return "win" if better else "loss"

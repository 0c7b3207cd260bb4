"""Temperature scaling: one scalar temperature per method, fitted on validation answers, applied to test logits.

Dividing every logit by T > 1 softens a model's probabilities (T < 1 sharpens them) without changing any argmax,
so accuracy and every hard-prediction metric stay as they were and only the proper scores move. T is fitted by
minimising the mean negative log-likelihood of the validation answers (Guo et al., ICML 2017); a floor's logits are
log-probabilities and are scaled the same way.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

# the search range of log T: from T = 1/50 to T = 50 (a flat or saturated model lands on an end)
LOG_T_BOUNDS = (-np.log(50.0), np.log(50.0))


def scaled_logits(choice_logits: Sequence[np.ndarray], temperature: float) -> list[np.ndarray]:
    """Each row of logits divided by `temperature` (float64)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return [np.asarray(z, dtype=np.float64) / temperature for z in choice_logits]


def mean_nll_at(choice_logits: Sequence[np.ndarray], true_idx: Sequence[int], temperature: float) -> float:
    """Mean negative log-likelihood (nats) of the true choices under softmax(logits / temperature)."""
    rows = scaled_logits(choice_logits, temperature)
    return float(np.mean([logsumexp(z) - z[int(t)] for z, t in zip(rows, true_idx)]))


def fit_temperature(choice_logits: Sequence[np.ndarray], true_idx: Sequence[int]) -> float:
    """The temperature that minimises the mean NLL of the true choices (searched on log T within LOG_T_BOUNDS).

    Needs at least one answer; logits that are flat everywhere leave T at 1 (any T fits them equally)."""
    if len(choice_logits) != len(true_idx):
        raise ValueError(f"{len(choice_logits)} logit rows for {len(true_idx)} answers")
    if not len(choice_logits):
        raise ValueError("fitting a temperature needs at least one validation answer")
    # rows centred once: the NLL of z / T depends only on the gaps between a row's logits
    rows = [np.asarray(z, dtype=np.float64) - np.max(z) for z in choice_logits]
    if all(np.ptp(z) == 0 for z in rows):
        return 1.0
    widths = max(len(z) for z in rows)
    padded = np.full((len(rows), widths), -np.inf)
    for i, z in enumerate(rows):
        padded[i, : len(z)] = z
    true_logit = padded[np.arange(len(rows)), np.asarray(true_idx, dtype=np.int64)]

    def nll(log_t: float) -> float:
        t = np.exp(log_t)
        return float(np.mean(logsumexp(padded / t, axis=1) - true_logit / t))

    best = minimize_scalar(nll, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
    return float(np.exp(best.x))

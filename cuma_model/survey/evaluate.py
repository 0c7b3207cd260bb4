"""Evaluate survey answering: score choices with a model, statistical floors, all metrics, a routing report, a CLI.

Pieces, in the order a run uses them:
- `score_choices(model, tokenizer, prompts, letters_per_example, demographic_embeds=None)`: per-example logits over
  that example's choice letters, read at the last prompt token (left padding, positions counted from each row's
  first real token, `logits_to_keep=1`).
- Floors fitted on train examples: `QuestionMajority`, `GroupMajority`, `LogisticRegressionBaseline`, and for
  questions never trained on `GroupScalePrior`; each `predict(examples)` returns `Predictions(choice_idx,
  choice_logits)`, the same form as a model's.
- `evaluate_predictions(test_examples, pred_choice_idx, choice_logits=None, temperature=None)`: one JSON-safe dict
  with every metric of `cuma_model.survey.metrics` (the proper scores NLL, Brier and RPS, raw and at a temperature
  fitted on validation answers, accuracy, macro-F1, WorldValuesBench EMD, sigma-inequity, group macro-accuracy,
  answer entropy, per-group distribution gaps with their noise floor, and the between-group spread);
  `sampled_twins`: a floor's expected hard metrics with its answers drawn from its own probabilities;
  `z_permutation_test`: the same adapter scored with z shuffled across respondents.
- `format_report` / `write_markdown_table`: methods side by side; `paired_differences` / `format_intervals`: 95%
  intervals from a bootstrap over respondents, and differences between methods scored on the same examples.
- `RoutingUsage` / `routing_usage_table`: expert usage per demographic group per router from routing records.
- `python -m cuma_model.survey.evaluate --run-dir DIR`: DIR/predictions.jsonl -> DIR/metrics.json and PNGs (the
  temperature fitted on DIR/val_predictions.jsonl when there);
  `python -m cuma_model.survey.evaluate --baselines --train TRAIN.jsonl --test TEST.jsonl --out DIR` (or
  `--survey gss_spending` for a seeded respondent split): the floors, one run directory each under DIR.

File formats. An examples file is JSONL, one `SurveyExample` per line with its dataclass fields. A predictions file
is the same plus `"pred"` (the predicted choice index) and `"choice_logits"` (list of floats, or null): it carries
the examples it was made on, so evaluating a run never needs the survey loaders or the same data split again.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cuma_model.survey import calibration as C
from cuma_model.survey import metrics as M
from cuma_model.survey import sampled as S
from cuma_model.survey.data import SurveyExample
from cuma_model.survey.intervals import (
    SET_RESAMPLES,
    basic_interval,
    respondent_bootstrap,
    respondent_resamples,
    verdict,
)
from cuma_model.survey.packing import attention_mask_for, pack
from cuma_model.survey.packing import prefix_groups as groups_of


class Predictions(NamedTuple):
    """Predicted choice indices [N] (int64) and optional per-example choice logits (list of [n_choices_i] fp32)."""

    choice_idx: np.ndarray
    choice_logits: list[np.ndarray] | None


# --------------------------------------------------------------------------------------------------------------------
# Metrics over examples
# --------------------------------------------------------------------------------------------------------------------

PROPER_SCORES = ("nll", "brier", "rps")


def proper_score_rows(examples: Sequence[SurveyExample], choice_logits: Sequence[np.ndarray],
                      temperature: float = 1.0) -> dict[str, np.ndarray]:
    """Per-answer proper scores of softmax(logits / temperature): {"nll", "brier", "rps"}, each float64 [N]
    (the ranked probability score orders each question's choices by their scores)."""
    rows = C.scaled_logits(choice_logits, temperature) if temperature != 1.0 else choice_logits
    true = np.array([e.target for e in examples], dtype=np.int64)
    proba = M.softmax_rows(rows)
    return {"nll": M.choice_nll(rows, true), "brier": M.brier_scores(proba, true),
            "rps": M.ranked_probability_scores(proba, true, [e.scores for e in examples])}


def evaluate_predictions(test_examples: Sequence[SurveyExample], pred_choice_idx: Sequence[int],
                         choice_logits: Sequence[np.ndarray] | None = None, min_group_rows: int = 5,
                         temperature: float | None = None) -> dict:
    """Every metric for one method on `test_examples`, as a JSON-serialisable dict (NaN becomes null).

    pred_choice_idx: int [N], the predicted choice index per example. choice_logits: optional list of
    [n_choices_i] arrays (the proper scores and entropy are null without them). `temperature`: the method's
    temperature fitted on validation answers (`calibration.fit_temperature`); the proper scores of
    softmax(logits / temperature) then fill `calibrated`. `min_group_rows` is the smallest subgroup (sigma-inequity)
    or (group, question) cell (distribution gaps) that counts. Keys: n, n_questions, nll, brier, rps (mean
    negative log-likelihood, Brier score and ranked probability score of the true answers) | null,
    calibrated {temperature, nll, brier, rps} | null, accuracy, macro_f1,
    emd {mean, median, auc, n_questions, per_question}, sigma_inequity {mean, per_dimension},
    group_macro_accuracy {mean, per_dimension}, entropy {mean, mean_normalized} | null,
    group_gaps {emd, js, js_soft, tv, tv_soft, n_cells, between_group_spread {pred_js, true_js, ratio, pred_js_soft,
    ratio_soft}, per_dimension} (the *_soft entries use the softmax of choice_logits and are null without them),
    group_noise_floor {js, tv, n_cells, n_splits} (two random halves of each cell's true answers), and intervals
    (respondent bootstrap) of accuracy and of each proper score, raw and calibrated.
    """
    ex = list(test_examples)
    pred = np.asarray(pred_choice_idx, dtype=np.int64)
    if pred.shape != (len(ex),):
        raise ValueError(f"{len(ex)} examples but predictions of shape {pred.shape}")
    qids, true, n_choices, true_scaled, pred_scaled = _answer_arrays(ex, pred)
    groups = example_groups(ex)
    correct = true == pred

    emd_q = M.emd_per_question(qids, true_scaled, pred_scaled)
    out = {
        "n": len(ex),
        "n_questions": len(emd_q),
        "nll": None,
        "brier": None,
        "rps": None,
        "calibrated": None,
        "accuracy": M.accuracy(true, pred),
        "macro_f1": M.macro_f1([e.letters[e.target] for e in ex], [e.letters[p] for e, p in zip(ex, pred)]),
        "emd": {**M.emd_summary(emd_q), "per_question": {str(k): v for k, v in emd_q.items()}},
        "sigma_inequity": M.sigma_inequity(correct, groups, min_rows=min_group_rows),
        "group_macro_accuracy": M.group_macro_accuracy(correct, groups),
        "entropy": None,
        "group_gaps": None,
    }
    respondents = [e.respondent_id for e in ex]
    intervals = {"accuracy": respondent_bootstrap(correct, respondents)}
    proba = None
    if choice_logits is not None:
        if len(choice_logits) != len(ex):
            raise ValueError(f"{len(ex)} examples but {len(choice_logits)} logit rows")
        if any(len(z) != k for z, k in zip(choice_logits, n_choices)):
            raise ValueError("a logit row's length differs from its example's number of choices")
        proba = M.softmax_rows(choice_logits)
        scores = proper_score_rows(ex, choice_logits)
        for name, values in scores.items():
            out[name] = float(values.mean()) if len(ex) else float("nan")
            intervals[name] = respondent_bootstrap(values, respondents)
        if temperature is not None:
            scaled = proper_score_rows(ex, choice_logits, temperature)
            out["calibrated"] = {"temperature": float(temperature),
                                 **{k: float(v.mean()) if len(ex) else float("nan") for k, v in scaled.items()}}
            for name, values in scaled.items():
                intervals[f"calibrated_{name}"] = respondent_bootstrap(values, respondents)
        h = M.choice_entropy(choice_logits)
        out["entropy"] = {"mean": float(h.mean()) if h.size else float("nan"),
                          "mean_normalized": float(np.mean(h / np.log(np.maximum(n_choices, 2))))
                          if h.size else float("nan")}
    else:
        intervals.update({name: None for name in PROPER_SCORES})
    out["group_gaps"] = M.group_distribution_gaps(qids, true, pred, n_choices, true_scaled, pred_scaled, groups,
                                                  min_rows=min_group_rows, pred_proba=proba)
    out["group_noise_floor"] = M.group_noise_floor(qids, true, n_choices, groups, min_rows=min_group_rows)
    out["intervals"] = intervals
    return _json_safe(out)


def sampled_twin(examples: Sequence[SurveyExample], choice_logits: Sequence[np.ndarray], metrics: Mapping,
                 min_group_rows: int = 5, n_draws: int = S.N_DRAWS, seed: int = 0) -> dict:
    """The sampled twin of a predictor with probabilities (`sampled.sampled_metrics`): its expected hard metrics
    with answers drawn from softmax(choice_logits), next to the proper scores of `metrics` (the predictor's own
    `evaluate_predictions` dict), which sampling leaves unchanged."""
    ex = list(examples)
    twin = S.sampled_metrics([e.question_id for e in ex], [e.target for e in ex],
                             [np.array([_scaled(e, i) for i in range(len(e.choices))]) for e in ex],
                             M.softmax_rows(choice_logits), example_groups(ex), min_group_rows, n_draws, seed)
    kept = {k: metrics.get(k) for k in ("n", "nll", "brier", "rps", "calibrated", "entropy")}
    soft = {k: (metrics.get("group_gaps") or {}).get(k) for k in ("js_soft", "tv_soft")}
    twin["group_gaps"].update(soft)
    twin["group_gaps"]["between_group_spread"]["ratio_soft"] = (
        ((metrics.get("group_gaps") or {}).get("between_group_spread") or {}).get("ratio_soft"))
    return _json_safe({**kept, **twin, "sampled": True})


def sampled_twins(examples: Sequence[SurveyExample], predictions: Mapping[str, Predictions],
                  metrics: Mapping[str, Mapping], suffix: str = "~sampled") -> dict:
    """{name + suffix: sampled_twin} of every predictor in `predictions` that has probabilities."""
    return {name + suffix: sampled_twin(examples, pr.choice_logits, metrics[name])
            for name, pr in predictions.items() if pr.choice_logits is not None}


def paired_differences(examples: Sequence[SurveyExample], prediction: Predictions,
                       others: Mapping[str, Predictions], temperature: float | None = None,
                       other_temperatures: Mapping[str, float] | None = None) -> dict:
    """This method minus each other one, scored on the same examples, with respondent-bootstrap 95% intervals:
    {name: {"accuracy": {mean, lo, hi, verdict}, "nll", "brier", "rps": {...} | None, and "calibrated_nll", ...
    where both methods have a temperature}}; a difference whose interval holds 0 is a "tie"."""
    true = np.array([e.target for e in examples], dtype=np.int64)
    respondents = [e.respondent_id for e in examples]
    correct = np.asarray(prediction.choice_idx) == true
    mine = proper_score_rows(examples, prediction.choice_logits) if prediction.choice_logits is not None else None
    mine_t = (proper_score_rows(examples, prediction.choice_logits, temperature)
              if mine is not None and temperature is not None else None)
    out = {}
    for name, other in others.items():
        acc = respondent_bootstrap(correct.astype(float) - (np.asarray(other.choice_idx) == true), respondents)
        entry = {"accuracy": {**acc, "verdict": verdict(acc)}, **{k: None for k in PROPER_SCORES}}
        if mine is not None and other.choice_logits is not None:
            entry.update(_score_differences(mine, proper_score_rows(examples, other.choice_logits), respondents))
            t_other = (other_temperatures or {}).get(name)
            if mine_t is not None and t_other is not None:
                theirs = proper_score_rows(examples, other.choice_logits, t_other)
                entry.update({f"calibrated_{k}": v for k, v in
                              _score_differences(mine_t, theirs, respondents).items()})
        out[name] = entry
    return _json_safe(out)


def _score_differences(mine: Mapping, theirs: Mapping, respondents) -> dict:
    out = {}
    for k in PROPER_SCORES:
        iv = respondent_bootstrap(mine[k] - theirs[k], respondents)
        out[k] = {**iv, "verdict": verdict(iv, higher_is_better=False)}
    return out


def shuffled_across_respondents(rows: torch.Tensor, respondents: Sequence, seed: int = 0) -> torch.Tensor:
    """`rows` (one per answer, e.g. each answer's z) with each respondent's row replaced by another respondent's:
    the respondents (sorted by id) are permuted with `seed` and every answer of respondent i gets the row of the
    first answer of respondent perm(i). Respondents, not answers, are shuffled: one person keeps one z."""
    if len(respondents) != rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} rows for {len(respondents)} respondent ids")
    ids = sorted({str(r) for r in respondents})
    first = {}
    for i, r in enumerate(respondents):
        first.setdefault(str(r), i)
    perm = np.random.default_rng(seed).permutation(len(ids))
    donor = {ids[i]: first[ids[j]] for i, j in enumerate(perm)}
    return rows[torch.as_tensor([donor[str(r)] for r in respondents], dtype=torch.long)]


def z_permutation_test(examples: Sequence[SurveyExample], logits: Sequence[np.ndarray],
                       shuffled_logits: Sequence[np.ndarray], seed: int) -> dict:
    """Does the adapter use z? The same adapter's scores with z shuffled across respondents minus its scores with
    each respondent's own z: the NLL and accuracy differences with respondent-bootstrap intervals (a positive NLL
    difference whose interval excludes 0: z carries information the adapter uses)."""
    true = np.array([e.target for e in examples], dtype=np.int64)
    respondents = [e.respondent_id for e in examples]
    own, shuffled = M.choice_nll(logits, true), M.choice_nll(shuffled_logits, true)
    hit = predict_from_logits(logits) == true
    hit_shuffled = predict_from_logits(shuffled_logits) == true
    return _json_safe({"seed": seed, "n": len(true), "nll": float(own.mean()), "nll_shuffled": float(shuffled.mean()),
                       "nll_difference": respondent_bootstrap(shuffled - own, respondents),
                       "accuracy": float(hit.mean()), "accuracy_shuffled": float(hit_shuffled.mean()),
                       "accuracy_difference": respondent_bootstrap(hit_shuffled.astype(float) - hit, respondents)})


def format_z_permutation(test: Mapping) -> str:
    d = test["nll_difference"]
    a = test["accuracy_difference"]
    return (f"z shuffled across respondents (seed {test['seed']}, {test['n']} answers): NLL {test['nll']:.4f} -> "
            f"{test['nll_shuffled']:.4f}, difference {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]; accuracy "
            f"{100 * test['accuracy']:.1f}% -> {100 * test['accuracy_shuffled']:.1f}%, "
            f"{100 * a['mean']:+.1f} [{100 * a['lo']:+.1f}, {100 * a['hi']:+.1f}] points")


# set metrics: (name, lower is better) -- a difference in spread has no better side (1 is the true spread)
SET_METRICS = {"emd": True, "group_js": True, "group_js_soft": True, "group_tv_soft": True, "spread": None,
               "spread_soft": None}


def set_metric_intervals(examples: Sequence[SurveyExample], predictions: Mapping[str, Predictions],
                         reference: str | None = None, n_resamples: int = SET_RESAMPLES, min_group_rows: int = 5,
                         seed: int = 0) -> tuple[dict, dict]:
    """95% intervals of the metrics of a set of answers (`SET_METRICS`: mean EMD over questions, group JS, soft
    group JS and TV, between-group spread and its soft form), each recomputed on every respondent resample.

    Returns ({method: {metric: {mean, lo, hi}}}, {other: {metric: {mean, lo, hi, verdict}}}): the second holds
    `reference` minus each other method, paired (both on the same resamples); a spread difference says "higher",
    "lower" or "tie". Every method is scored on the same resamples, so intervals of different methods are
    comparable."""
    ex = list(examples)
    resamples = respondent_resamples([e.respondent_id for e in ex], n_resamples, seed)
    everything = np.arange(len(ex))
    values = {}  # method -> (point [metrics], resampled [n_resamples, metrics])
    for name, pr in predictions.items():
        scorer = _SetScorer(ex, pr, min_group_rows)
        values[name] = (scorer(everything), np.array([scorer(idx) for idx in resamples]).reshape(-1, len(SET_METRICS)))
    # every set metric is >= 0: the basic interval's reflected lower end is clipped there (differences are not)
    intervals = {name: {m: _at_least_zero(basic_interval(point[j], draws[:, j])) for j, m in enumerate(SET_METRICS)}
                 for name, (point, draws) in values.items()}
    paired = {}
    if reference is not None:
        ref_point, ref_draws = values[reference]
        for name, (point, draws) in values.items():
            if name == reference:
                continue
            paired[name] = {}
            for j, (m, lower_better) in enumerate(SET_METRICS.items()):
                iv = basic_interval(ref_point[j] - point[j], ref_draws[:, j] - draws[:, j])
                paired[name][m] = {**iv, "verdict": _set_verdict(iv, lower_better)}
    return _json_safe(intervals), _json_safe(paired)


def _at_least_zero(interval: dict) -> dict:
    return {**interval, "lo": max(interval["lo"], 0.0)} if math.isfinite(interval["lo"]) else interval


def _set_verdict(interval: dict, lower_is_better: bool | None) -> str:
    if not all(math.isfinite(interval[k]) for k in ("mean", "lo", "hi")):
        return "undefined"
    if lower_is_better is not None:
        return verdict(interval, higher_is_better=not lower_is_better)
    if not (interval["lo"] <= 0.0 <= interval["hi"]):
        return "higher" if interval["lo"] > 0.0 else "lower"
    return "tie"


class _SetScorer:
    """One method's `SET_METRICS` on any multiset of its answers (an index array, repeats allowed)."""

    def __init__(self, examples: Sequence[SurveyExample], prediction: Predictions, min_group_rows: int):
        self.pred = np.asarray(prediction.choice_idx, dtype=np.int64)
        self.q, self.true, self.n_choices, self.true_scaled, self.pred_scaled = _answer_arrays(examples, self.pred)
        # codes once, not per resample
        self.q_codes = M._codes(self.q)[0]
        self.groups = {d: M._codes(M._label_array(v), missing=None) for d, v in example_groups(examples).items()}
        self.proba = (M._padded_rows(M.softmax_rows(prediction.choice_logits), self.n_choices, len(examples))
                      if prediction.choice_logits is not None else None)
        self.min_rows = min_group_rows

    def __call__(self, idx: np.ndarray) -> list[float]:
        emd = M.emd_summary(M.emd_per_question(self.q[idx], self.true_scaled[idx], self.pred_scaled[idx]))["mean"]
        gaps = M.gaps_of_codes(
            self.q_codes[idx], self.true[idx], self.pred[idx], self.n_choices[idx], self.true_scaled[idx],
            self.pred_scaled[idx], {d: (codes[idx], n) for d, (codes, n) in self.groups.items()},
            min_rows=self.min_rows, proba=self.proba[idx] if self.proba is not None else None)
        spread = gaps["between_group_spread"]
        return [emd, gaps["js"], gaps["js_soft"], gaps["tv_soft"], spread["ratio"], spread["ratio_soft"]]


_SCORE_LABELS = {"nll": "NLL", "brier": "Brier", "rps": "RPS", "calibrated_nll": "NLL@T",
                 "calibrated_brier": "Brier@T", "calibrated_rps": "RPS@T"}


def format_intervals(name: str, metrics: Mapping, paired: Mapping | None = None) -> str:
    """Lines stating `name`'s proper scores (raw and at its temperature) and accuracy with their 95% intervals,
    and its differences from the others."""
    def interval(iv, scale=1.0, sign=""):
        if any(iv[k] is None for k in ("mean", "lo", "hi")):
            return "undefined here"  # e.g. no group with enough answers
        return f"{iv['mean'] * scale:{sign}.3g} [{iv['lo'] * scale:{sign}.3g}, {iv['hi'] * scale:{sign}.3g}]"

    iv = metrics.get("intervals") or {}
    lines = [f"95% intervals (bootstrap over respondents, {metrics.get('n')} answers):"]
    parts = [f"{label} {interval(iv[k])}" for k, label in _SCORE_LABELS.items() if iv.get(k)]
    if iv.get("accuracy"):
        parts.append(f"accuracy {interval(iv['accuracy'], 100)}%")
    lines.append(f"  {name}: " + ", ".join(parts))
    if iv.get("emd"):
        lines.append("  " + " " * len(name) + "  " + ", ".join(
            f"{_SET_LABELS[m]} {interval(iv[m])}" for m in SET_METRICS if iv.get(m)))
    for other, d in (paired or {}).items():
        parts = [f"{label} {interval(d[k], 1, '+')} ({d[k]['verdict']})" for k, label in _SCORE_LABELS.items()
                 if d.get(k)]
        parts.append(f"accuracy {interval(d['accuracy'], 100, '+')} points ({d['accuracy']['verdict']})")
        lines.append(f"  {name} - {other}: " + ", ".join(parts))
        if d.get("emd"):
            lines.append("    " + ", ".join(f"{_SET_LABELS[m]} {interval(d[m], 1, '+')} ({d[m]['verdict']})"
                                            for m in SET_METRICS if d.get(m)))
    return "\n".join(lines)


_SET_LABELS = {"emd": "EMD", "group_js": "group JS", "group_js_soft": "soft group JS",
               "group_tv_soft": "soft group TV", "spread": "spread", "spread_soft": "soft spread"}


def example_groups(examples: Sequence[SurveyExample]) -> dict[str, list]:
    """{dimension: labels [N]} over every dimension seen in the examples (None where an example lacks it)."""
    dims = list(dict.fromkeys(d for e in examples for d in e.groups))
    return {d: [e.groups.get(d) for e in examples] for d in dims}


def _answer_arrays(examples: Sequence[SurveyExample], pred: np.ndarray) -> tuple:
    """(question ids, true choice indices, numbers of choices, true and predicted scaled scores) of the answers;
    a predicted index out of its example's range is an error."""
    n_choices = np.array([len(e.choices) for e in examples], dtype=np.int64)
    if np.any(pred < 0) or np.any(pred >= n_choices):
        raise ValueError("a predicted choice index is out of range for its example")
    return (np.array([e.question_id for e in examples], dtype=object),
            np.array([e.target for e in examples], dtype=np.int64), n_choices,
            np.array([_scaled(e, e.target) for e in examples]),
            np.array([_scaled(e, int(p)) for e, p in zip(examples, pred)]))


def _scaled(e: SurveyExample, i: int) -> float:
    lo, hi = e.scale
    return float((e.scores[i] - lo) / (hi - lo))


# --------------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------------

def _calibrated(key):
    return lambda m: (m.get("calibrated") or {}).get(key)


def _gap(key):
    return lambda m: (m.get("group_gaps") or {}).get(key)


def _spread(key):
    return lambda m: ((m.get("group_gaps") or {}).get("between_group_spread") or {}).get(key)


# proper scores lead: they are what a model of answer probabilities is judged on
_COLUMNS = [
    ("NLL", lambda m: m.get("nll")),
    ("Brier", lambda m: m.get("brier")),
    ("RPS", lambda m: m.get("rps")),
    ("T", _calibrated("temperature")),
    ("NLL@T", _calibrated("nll")),
    ("Brier@T", _calibrated("brier")),
    ("RPS@T", _calibrated("rps")),
    ("acc", lambda m: m.get("accuracy")),
    ("macro-F1", lambda m: m.get("macro_f1")),
    ("EMD", lambda m: (m.get("emd") or {}).get("mean")),
    ("sigma-ineq", lambda m: (m.get("sigma_inequity") or {}).get("mean")),
    ("grp-macro-acc", lambda m: (m.get("group_macro_accuracy") or {}).get("mean")),
    ("grp-EMD", _gap("emd")),
    ("grp-JS", _gap("js")),
    ("grp-JS-soft", _gap("js_soft")),
    ("grp-TV-soft", _gap("tv_soft")),
    ("spread", _spread("ratio")),
    ("spread-soft", _spread("ratio_soft")),
    ("entropy", lambda m: (m.get("entropy") or {}).get("mean")),
]
_LEGEND = ("NLL (mean -log p of the true answer, nats; the floors use their training answer frequencies), Brier "
           "(sum of squared probability errors, 0-2), RPS (ranked probability score on the choices' score order, "
           "0-1): lower is better; T: the temperature fitted on validation answers, NLL@T/Brier@T/RPS@T the same "
           "scores of softmax(logits / T); acc/macro-F1/grp-macro-acc: higher is better; EMD (WorldValuesBench, "
           "mean over questions), sigma-ineq (std of group accuracies), grp-EMD/grp-JS (group answer distribution "
           "of the hard answers vs true), grp-JS-soft/grp-TV-soft (of the mean predicted probabilities): lower is "
           "better; spread: between-group JS predicted / true (1 = groups kept as far apart as they are, 0 = "
           "collapsed; spread-soft uses mean predicted probabilities instead of hard answers); entropy: mean answer "
           "entropy in nats; a row named <floor>~sampled is that floor with answers drawn from its own probabilities "
           "(expected accuracy and hard metrics; its proper scores are the floor's).")


def format_report(metrics_by_method: Mapping[str, Mapping]) -> str:
    """A plain-text table, one row per method, of the headline metrics of `evaluate_predictions` dicts, and the
    noise floor of the group distances under it."""
    rows = [[name] + [_fmt(get(m)) for _, get in _COLUMNS] for name, m in metrics_by_method.items()]
    header = ["method"] + [c for c, _ in _COLUMNS]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    noise = next((m["group_noise_floor"] for m in metrics_by_method.values() if m.get("group_noise_floor")), None)
    if noise and noise.get("js") is not None:
        lines.append(f"noise floor of grp-JS/grp-TV (two random halves of each cell's true answers, "
                     f"{noise['n_splits']} splits): JS {noise['js']:.4f}, TV {noise['tv']:.4f}")
    return "\n".join(lines)


def write_markdown_table(metrics_by_method: Mapping[str, Mapping], path: str | Path | None = None,
                         caption: str | None = None) -> str:
    """The `format_report` table as GitHub markdown (with a legend line); written to `path` when given."""
    header = ["method"] + [c for c, _ in _COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(_COLUMNS)) + "|"]
    for name, m in metrics_by_method.items():
        lines.append("| " + " | ".join([name] + [_fmt(get(m)) for _, get in _COLUMNS]) + " |")
    text = ((caption + "\n\n") if caption else "") + "\n".join(lines) + "\n\n" + _LEGEND + "\n"
    if path is not None:
        Path(path).write_text(text)
    return text


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}"


def _json_safe(x):
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


# --------------------------------------------------------------------------------------------------------------------
# Statistical floors
# --------------------------------------------------------------------------------------------------------------------

def _log_frequencies(counts: np.ndarray) -> np.ndarray:
    """Laplace-smoothed log answer frequencies: the argmax is the majority (lowest index on ties)."""
    return np.log((counts + 1.0) / (counts.sum() + counts.size)).astype(np.float32)


class QuestionMajority:
    """Each question's most common training answer (lowest index on ties; choice 0 for an unseen question).

    Logits are the log of the Laplace-smoothed training answer frequencies of the question, so entropy is that of
    the question's marginal answer distribution.
    """

    name = "question_majority"

    def fit(self, train: Sequence[SurveyExample]) -> "QuestionMajority":
        self.counts_: dict[str, np.ndarray] = {}
        for e in train:
            c = self.counts_.setdefault(e.question_id, np.zeros(len(e.choices)))
            c[e.target] += 1
        return self

    def _counts(self, e: SurveyExample) -> np.ndarray:
        c = self.counts_.get(e.question_id)
        return c if c is not None and c.size == len(e.choices) else np.zeros(len(e.choices))

    def predict(self, examples: Sequence[SurveyExample]) -> Predictions:
        logits = [_log_frequencies(self._counts(e)) for e in examples]
        return Predictions(np.array([int(z.argmax()) for z in logits], dtype=np.int64), logits)


def dimension_order(examples: Sequence[SurveyExample]) -> list[str]:
    """Every group dimension of the examples in the order of the spec's `profile_fields`.

    Each example's `groups` lists its dimensions in that order but lacks those it has no label on, so the first
    example alone can put a later field first. The orders of all examples are merged instead (a topological sort
    of "comes before"; dimensions the examples never order fall back to their first appearance)."""
    first_seen: dict[str, int] = {}
    after: dict[str, set[str]] = {}
    for e in examples:
        dims = list(e.groups)
        for d in dims:
            first_seen.setdefault(d, len(first_seen))
            after.setdefault(d, set())
        for earlier, later in zip(dims, dims[1:]):
            after[earlier].add(later)
    waiting = {d: 0 for d in first_seen}
    for later in after.values():
        for d in later:
            waiting[d] += 1
    order = []
    ready = sorted((d for d, n in waiting.items() if n == 0), key=first_seen.get)
    while ready:
        d = ready.pop(0)
        order.append(d)
        for later in after[d]:
            waiting[later] -= 1
            if waiting[later] == 0:
                ready.append(later)
        ready.sort(key=first_seen.get)
    if len(order) < len(first_seen):  # the examples disagree on the order (not from one spec): first appearance
        return list(first_seen)
    return order


class GroupMajority(QuestionMajority):
    """Per question, the training majority answer of the respondent's group, backing off when the group is thin.

    The group is the combination of the respondent's labels on `dimensions` (in that order; default: every dimension
    of the training examples in the spec's `profile_fields` order, `dimension_order`). A group with fewer than `min_count` training answers to
    the question backs off to the combination of the first len-1 dimensions, then len-2, ..., and finally to the
    question majority. So put the dimension that matters most first. `backoff_levels_` (after `predict`) counts how
    many test rows were answered at each number of dimensions used (0 = question majority). A few strong dimensions
    beat all of them: on GSS spending (80/20 respondent split) party or ideology alone gives 0.586 accuracy, all nine
    dimensions 0.572 with min_count 20 and 0.562 with 5, the question majority 0.571.
    """

    name = "group_majority"

    def __init__(self, dimensions: Sequence[str] | None = None, min_count: int = 20):
        self.dimensions = list(dimensions) if dimensions is not None else None
        self.min_count = min_count

    def fit(self, train: Sequence[SurveyExample]) -> "GroupMajority":
        super().fit(train)
        if self.dimensions is None:
            self.dimensions = dimension_order(train)
        self.group_counts_: dict[tuple, np.ndarray] = {}
        for e in train:
            labels = self._labels(e)
            for level in range(1, len(labels) + 1):
                c = self.group_counts_.setdefault((e.question_id, labels[:level]), np.zeros(len(e.choices)))
                c[e.target] += 1
        return self

    def _labels(self, e: SurveyExample) -> tuple:
        return tuple(str(e.groups.get(d)) for d in self.dimensions)

    def predict(self, examples: Sequence[SurveyExample]) -> Predictions:
        self.backoff_levels_ = {}
        logits = []
        for e in examples:
            labels = self._labels(e)
            counts, used = self._counts(e), 0
            for level in range(len(labels), 0, -1):
                c = self.group_counts_.get((e.question_id, labels[:level]))
                if c is not None and c.size == len(e.choices) and c.sum() >= self.min_count:
                    counts, used = c, level
                    break
            self.backoff_levels_[used] = self.backoff_levels_.get(used, 0) + 1
            logits.append(_log_frequencies(counts))
        return Predictions(np.array([int(z.argmax()) for z in logits], dtype=np.int64), logits)


class LogisticRegressionBaseline(QuestionMajority):
    """Per question, a multinomial logistic regression on the one-hot demographic labels (`groups`).

    One `OneHotEncoder` (unknown labels ignored) over `dimensions` (default: all) is fitted on all training rows;
    each question gets its own `LogisticRegression(C)`. A question seen with a single answer predicts it; an unseen
    question falls back to the question majority (choice 0). Logits are log-probabilities (clipped at 1e-12).
    """

    name = "logistic_regression"

    def __init__(self, dimensions: Sequence[str] | None = None, C: float = 1.0, max_iter: int = 1000):
        self.dimensions = list(dimensions) if dimensions is not None else None
        self.C = C
        self.max_iter = max_iter

    def _matrix(self, examples: Sequence[SurveyExample]) -> np.ndarray:
        return np.array([[str(e.groups.get(d)) for d in self.dimensions] for e in examples], dtype=object)

    def fit(self, train: Sequence[SurveyExample]) -> "LogisticRegressionBaseline":
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import OneHotEncoder

        super().fit(train)
        if self.dimensions is None:
            self.dimensions = list(dict.fromkeys(d for e in train for d in e.groups))
        self.encoder_ = OneHotEncoder(handle_unknown="ignore").fit(self._matrix(train))
        self.models_ = {}
        by_q: dict[str, list[SurveyExample]] = {}
        for e in train:
            by_q.setdefault(e.question_id, []).append(e)
        for qid, rows in by_q.items():
            y = np.array([e.target for e in rows])
            if np.unique(y).size < 2:
                continue  # the question majority answers it
            clf = LogisticRegression(C=self.C, max_iter=self.max_iter)
            self.models_[qid] = (clf.fit(self.encoder_.transform(self._matrix(rows)), y), len(rows[0].choices))
        return self

    def predict(self, examples: Sequence[SurveyExample]) -> Predictions:
        examples = list(examples)
        logits: list[np.ndarray | None] = [None] * len(examples)
        by_q: dict[str, list[int]] = {}
        for i, e in enumerate(examples):
            by_q.setdefault(e.question_id, []).append(i)
        for qid, idx in by_q.items():
            fitted = self.models_.get(qid)
            if fitted is None or fitted[1] != len(examples[idx[0]].choices):
                for i in idx:
                    logits[i] = _log_frequencies(self._counts(examples[i]))
                continue
            clf, k = fitted
            proba = clf.predict_proba(self.encoder_.transform(self._matrix([examples[i] for i in idx])))
            full = np.zeros((len(idx), k))
            full[:, clf.classes_] = proba
            for row, i in enumerate(idx):
                logits[i] = np.log(np.clip(full[row], 1e-12, 1.0)).astype(np.float32)
        return Predictions(np.array([int(z.argmax()) for z in logits], dtype=np.int64), logits)


class GroupScalePrior(GroupMajority):
    """For questions it has never seen: each group's answers on the training questions, carried to a new question
    through the answer scale.

    Every training answer is a point on its question's scale (its scaled score, 0 at the scale's minimum, 1 at its
    maximum, in the direction the survey codes it). A group's prior is the distribution of those points over all
    the training questions; a new question's choice j receives the share of the group's points that lie nearer to
    its scaled score s_j than to any other choice's (a point halfway between two choices is shared equally),
    Laplace-smoothed. So a group that answered at the top of the training questions' scales is predicted at the top
    of the new one. Groups and backoff as in `GroupMajority` (combinations of `dimensions`, the first ones kept when
    a combination has fewer than `min_count` training answers, finally everyone). It assumes the held-out question
    is coded in the same direction as the training questions (true of a survey's battery about one subject).
    """

    name = "group_scale_prior"

    def fit(self, train: Sequence[SurveyExample]) -> "GroupScalePrior":
        if self.dimensions is None:
            self.dimensions = dimension_order(train)
        self.points_: dict[tuple, dict[float, float]] = {}
        for e in train:
            point = round(_scaled(e, e.target), 9)
            labels = self._labels(e)
            for level in range(len(labels) + 1):
                counts = self.points_.setdefault(labels[:level], {})
                counts[point] = counts.get(point, 0.0) + 1.0
        return self

    def predict(self, examples: Sequence[SurveyExample]) -> Predictions:
        self.backoff_levels_ = {}
        logits = []
        for e in examples:
            labels = self._labels(e)
            used = 0
            for level in range(len(labels), -1, -1):
                points = self.points_.get(labels[:level], {})
                if sum(points.values()) >= self.min_count or level == 0:
                    used = level
                    break
            self.backoff_levels_[used] = self.backoff_levels_.get(used, 0) + 1
            logits.append(_log_frequencies(_carried(points, [_scaled(e, i) for i in range(len(e.choices))])))
        return Predictions(np.array([int(z.argmax()) for z in logits], dtype=np.int64), logits)


def _carried(points: Mapping[float, float], choice_points: Sequence[float]) -> np.ndarray:
    """Counts of the choices of a question: each training point's count goes to the nearest choice on the scale
    (split equally between equally near ones)."""
    s = np.asarray(choice_points, dtype=np.float64)
    counts = np.zeros(s.size)
    for x, n in points.items():
        d = np.abs(s - x)
        nearest = np.isclose(d, d.min(), rtol=0, atol=1e-9)
        counts[nearest] += n / nearest.sum()
    return counts


def run_baselines(train: Sequence[SurveyExample], test: Sequence[SurveyExample],
                  group_dimensions: Sequence[str] | None = None, min_count: int = 20,
                  group_prior: bool = False) -> dict[str, Predictions]:
    """Fit every floor on `train` and predict `test`: {name: Predictions}. `group_prior` adds `GroupScalePrior`,
    the floor for questions absent from `train`."""
    return {name: f.predict(test) for name, f in fitted_baselines(train, group_dimensions, min_count,
                                                                  group_prior).items()}


def fitted_baselines(train: Sequence[SurveyExample], group_dimensions: Sequence[str] | None = None,
                     min_count: int = 20, group_prior: bool = False) -> dict:
    """The floors of `run_baselines`, fitted on `train`: {name: floor} (each has `predict(examples)`)."""
    floors = [QuestionMajority(), GroupMajority(group_dimensions, min_count=min_count),
              LogisticRegressionBaseline(group_dimensions)]
    if group_prior:
        floors.append(GroupScalePrior(group_dimensions, min_count=min_count))
    return {f.name: f.fit(train) for f in floors}


# --------------------------------------------------------------------------------------------------------------------
# Scoring a model
# --------------------------------------------------------------------------------------------------------------------

def letter_token_ids(tokenizer, letters: Iterable[str]) -> dict[str, int]:
    """{letter: token id} of each answer letter as the model would emit it as the first token of its answer.

    With a chat template, the id is read off the template itself: render a one-question conversation with the
    generation prompt, render it again with the assistant turn `letter`, and take the first token after the common
    prefix that decodes to the letter. This picks "A" or " A" as the template dictates (ChatML templates such as
    SmolLM2's or Qwen's put the answer right after "assistant\\n", so the bare "A"). Without a template (or when the
    rendering does not extend the prompt) the letter must encode to a single known token on its own. Raises
    ValueError when a letter is not a single known token; pass `letter_ids=` to `score_choices` to override.
    """
    out = {}
    for letter in dict.fromkeys(letters):
        tid = _letter_id_from_template(tokenizer, letter)
        if tid is None:
            ids = tokenizer.encode(letter, add_special_tokens=False)
            if len(ids) != 1 or (tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id):
                raise ValueError(f"answer letter {letter!r} is not a single token ({ids}); pass letter_ids=")
            tid = ids[0]
        out[letter] = int(tid)
    return out


def _letter_id_from_template(tokenizer, letter: str) -> int | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    msgs = [{"role": "user", "content": "Which one?"}]
    try:
        prefix = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": letter}], tokenize=False)
    except Exception:  # a template that rejects this conversation: fall back to the bare letter
        return None
    if not isinstance(prefix, str) or not full.startswith(prefix):
        return None
    pre = tokenizer.encode(prefix, add_special_tokens=False)
    ids = tokenizer.encode(full, add_special_tokens=False)
    # a prompt ending in whitespace may tokenize differently on its own: search from the common prefix
    start = next((i for i, (a, b) in enumerate(zip(pre, ids)) if a != b), min(len(pre), len(ids)))
    for tid in ids[start: start + 8]:
        if tokenizer.decode([tid]).strip() == letter:
            return tid
    return None


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), each int64 [B, max_len], of token-id rows padded on the LEFT.

    The last column is every row's last real token; position_ids count from each row's first real token (0 on the
    padding), so a padded row sees exactly the positions it would see alone.
    """
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        if len(ids):
            input_ids[row, width - len(ids):] = torch.as_tensor(ids, dtype=torch.long)
            mask[row, width - len(ids):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, mask, position_ids


def _accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(type(base).forward).parameters
    except (TypeError, ValueError):
        return False


@torch.inference_mode()
def score_choices(model, tokenizer, prompts: Sequence[str], letters_per_example: Sequence[Sequence[str]],
                  demographic_embeds: torch.Tensor | None = None, batch_size: int = 16,
                  letter_ids: Mapping[str, int] | None = None, add_special_tokens: bool = False,
                  progress: bool = True, on_batch=None, prefix_groups: Sequence | None = None) -> list[np.ndarray]:
    """Logits of each example's answer letters at its last prompt token.

    prompts: N fully formatted prompt strings (e.g. `apply_chat_template(..., add_generation_prompt=True,
    tokenize=False)`; tokenized with `add_special_tokens` False by default since the template already holds them).
    letters_per_example: N sequences of letters (e.g. `example.letters`). demographic_embeds: optional [N, D] tensor
    aligned with `prompts`, passed to the model as `demographic_embeds=` with the rows of each batch (for a
    CuMA-patched model; leave None for a plain or PEFT model). Returns N float32 arrays [len(letters_i)].

    Prompts are sorted by length and batched, about `batch_size` prompts a batch; each batch is LEFT padded, so the
    last column is every row's last real token, and `position_ids` count from each row's first real token, so a
    padded row sees exactly what it would see alone. The head runs on the last position only (`logits_to_keep=1`)
    when the model's forward accepts it. prefix_groups: N keys (e.g. respondent ids); the prompts of one key share
    a row that computes their common token prefix once (`cuma_model.survey.packing`: same logits, up to float
    rounding), and their rows of `demographic_embeds` must be equal. Letter ids come from `letter_token_ids`
    (computed once) unless `letter_ids` is given. `on_batch(rows, token_weights)`, when given, is called after each
    forward pass with the prompt indices of each of its B rows and a [B, S] float tensor saying how many prompts
    each token stands for (0 on padding, the number of the row's prompts on a shared prefix), e.g. to read what
    `cuma_model.record_routing` recorded for that batch.
    """
    if len(prompts) != len(letters_per_example):
        raise ValueError(f"{len(prompts)} prompts but {len(letters_per_example)} letter lists")
    if demographic_embeds is not None and demographic_embeds.shape[0] != len(prompts):
        raise ValueError(f"demographic_embeds has {demographic_embeds.shape[0]} rows for {len(prompts)} prompts")
    if prefix_groups is not None and len(prefix_groups) != len(prompts):
        raise ValueError(f"{len(prefix_groups)} prefix_groups for {len(prompts)} prompts")
    all_letters = [l for ls in letters_per_example for l in ls]
    ids = dict(letter_ids) if letter_ids is not None else letter_token_ids(tokenizer, all_letters)
    missing = set(all_letters) - set(ids)
    if missing:
        raise ValueError(f"no token id for letters {sorted(missing)}")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    keeps = _accepts_logits_to_keep(model)

    encoded = [tokenizer.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
    if any(len(e) == 0 for e in encoded):
        raise ValueError("an empty prompt cannot be scored")
    # a row holds at most a batch
    rows = [[i] for i in range(len(prompts))] if prefix_groups is None else groups_of(prefix_groups, batch_size)
    if demographic_embeds is not None:
        for row in rows:
            if any(not torch.equal(demographic_embeds[i], demographic_embeds[row[0]]) for i in row[1:]):
                raise ValueError(f"prompts {row} share a prefix group but not their demographic_embeds")
    width = [sum(len(encoded[i]) for i in row) for row in rows]  # an upper bound of the packed width, to sort by
    order = sorted(range(len(rows)), key=lambda r: -width[r])
    out: list[np.ndarray | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc="scoring", disable=not progress) as bar:
        for batch_rows in _batches_of(order, rows, batch_size):
            prompts_in = [i for r in batch_rows for i in rows[r]]
            firsts = [rows[r][0] for r in batch_rows]
            if prefix_groups is None:
                input_ids, mask, position_ids = left_pad([encoded[i] for i in prompts_in], pad_id)
                kwargs = {"logits_to_keep": 1} if keeps else {}
                at_rows, at_columns = torch.arange(len(prompts_in)), torch.full((len(prompts_in),), -1)
            else:
                packed = pack([[encoded[i] for i in rows[r]] for r in batch_rows], pad_id)
                input_ids, position_ids = packed.input_ids, packed.position_ids
                mask = attention_mask_for(model, packed.attention_mask)
                columns, index = packed.logit_columns()
                kwargs = {"logits_to_keep": columns.to(device)} if keeps else {}
                at_rows, at_columns = packed.ends[:, 0], index if keeps else columns[index]
            kwargs.update(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                          position_ids=position_ids.to(device), use_cache=False)
            if demographic_embeds is not None:
                kwargs["demographic_embeds"] = demographic_embeds[torch.as_tensor(firsts if prefix_groups is not None
                                                                                  else prompts_in)].to(device)
            logits = model(**kwargs).logits
            last = logits[at_rows.to(logits.device), at_columns.to(logits.device)].float()
            if on_batch is not None:
                on_batch([rows[r] for r in batch_rows],
                         packed.token_weights if prefix_groups is not None else mask.float())
            for j, i in enumerate(prompts_in):
                sel = torch.tensor([ids[l] for l in letters_per_example[i]], device=last.device)
                out[i] = last[j, sel].cpu().numpy()
            bar.update(len(prompts_in))
    return out


def _batches_of(order: Sequence[int], rows: Sequence[Sequence[int]], batch_size: int):
    """Consecutive rows of `order` holding about `batch_size` prompts together (a larger row goes alone)."""
    batch: list[int] = []
    n = 0
    for r in order:
        if batch and n + len(rows[r]) > batch_size:
            yield batch
            batch, n = [], 0
        batch.append(r)
        n += len(rows[r])
    if batch:
        yield batch


def predict_from_logits(choice_logits: Sequence[np.ndarray]) -> np.ndarray:
    """Argmax choice index per example (lowest index on ties): int64 [N]."""
    return np.array([int(np.argmax(z)) for z in choice_logits], dtype=np.int64)


# --------------------------------------------------------------------------------------------------------------------
# Routing report
# --------------------------------------------------------------------------------------------------------------------

class RoutingUsage:
    """Counts, over batches, how often each expert is selected per (demographic group, router).

    Feed it one batch at a time with `add(records, token_mask, groups)`:
    - records: the routing records of one forward pass (e.g. `trace.records` of `cuma_model.record_routing`); each
      has `.router_key` (str), `.topk_idx` [B, S, k] int (torch or numpy) and, for `weighted=True`,
      `.topk_weights` [B, S, k] float. Plain tuples `(router_key, topk_idx[, topk_weights])` work too.
    - token_mask: [B, S] bool/int, the tokens to count (the attention mask drops padding; a narrower mask can keep
      only the profile or the answer position), or float weights: a token of weight w counts w times.
    - groups: B dicts {dimension: label}, the batch's examples' `groups`.
    Every token contributes its k selections (or, when `weighted`, its k gate weights). Counts are also kept under
    the dimension/group "all". `table()` gives the shares.
    """

    def __init__(self, weighted: bool = False):
        self.weighted = weighted
        self._counts: dict[tuple[str, str, str], np.ndarray] = {}

    def add(self, records: Iterable, token_mask, groups: Sequence[Mapping[str, str]]) -> None:
        weight = _to_numpy(token_mask).astype(np.float64)
        mask = weight != 0
        if mask.ndim != 2 or mask.shape[0] != len(groups):
            raise ValueError(f"token_mask {mask.shape} does not match {len(groups)} examples")
        dims = list(dict.fromkeys(d for g in groups for d in g))
        labels = {d: np.array([str(g.get(d)) for g in groups], dtype=object) for d in dims}
        for rec in records:
            key, idx, w = _record_fields(rec, self.weighted)
            if idx.shape[:2] != mask.shape:
                raise ValueError(f"router {key}: topk_idx {idx.shape} does not match token_mask {mask.shape}")
            n_exp = int(idx.max()) + 1 if idx.size else 0
            b, s = np.nonzero(mask)
            per_ex = np.zeros((mask.shape[0], n_exp))
            vals = w[b, s].reshape(-1) if w is not None else np.ones(b.size * idx.shape[2])
            vals = vals * np.repeat(weight[b, s], idx.shape[2])
            np.add.at(per_ex, (np.repeat(b, idx.shape[2]), idx[b, s].reshape(-1)), vals)
            self._accumulate(("all", "all", key), per_ex.sum(0))
            for d, lab in labels.items():
                for g in dict.fromkeys(lab):
                    self._accumulate((d, g, key), per_ex[lab == g].sum(0))

    def _accumulate(self, key: tuple[str, str, str], counts: np.ndarray) -> None:
        old = self._counts.get(key)
        if old is None:
            self._counts[key] = counts.astype(np.float64)
            return
        n = max(old.size, counts.size)
        self._counts[key] = np.pad(old, (0, n - old.size)) + np.pad(counts, (0, n - counts.size))

    def table(self, num_experts: int | None = None) -> pd.DataFrame:
        """DataFrame (dimension, group, router, expert, count, share); shares sum to 1 per (dimension, group,
        router) that saw any token. `num_experts` pads experts never selected (default: the largest index seen)."""
        n = max([c.size for c in self._counts.values()] + [num_experts or 0])
        rows = []
        for (dim, group, router), c in self._counts.items():
            c = np.pad(c, (0, n - c.size))
            total = c.sum()
            for e in range(n):
                rows.append((dim, group, router, e, float(c[e]), float(c[e] / total) if total > 0 else float("nan")))
        return pd.DataFrame(rows, columns=["dimension", "group", "router", "expert", "count", "share"])


def routing_usage_table(batches: Iterable[tuple[Iterable, object, Sequence[Mapping[str, str]]]],
                        num_experts: int | None = None, weighted: bool = False) -> pd.DataFrame:
    """`RoutingUsage` over an iterable of (records, token_mask [B, S], groups [B]) batches; see its docstring."""
    usage = RoutingUsage(weighted=weighted)
    for records, token_mask, groups in batches:
        usage.add(records, token_mask, groups)
    return usage.table(num_experts)


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _record_fields(rec, weighted: bool):
    if isinstance(rec, (tuple, list)):
        key, idx, w = rec[0], rec[1], (rec[2] if len(rec) > 2 else None)
    else:
        key, idx, w = rec.router_key, rec.topk_idx, getattr(rec, "topk_weights", None)
    idx = _to_numpy(idx).astype(np.int64)
    if idx.ndim != 3:
        raise ValueError(f"router {key}: topk_idx must be [B, S, k], got {idx.shape}")
    if weighted:
        if w is None:
            raise ValueError(f"router {key}: weighted usage needs topk_weights")
        w = _to_numpy(w).astype(np.float64)
    else:
        w = None
    return str(key), idx, w


# --------------------------------------------------------------------------------------------------------------------
# Files and command line
# --------------------------------------------------------------------------------------------------------------------

def example_from_dict(d: Mapping) -> SurveyExample:
    """A SurveyExample from a JSON dict (extra keys such as pred / choice_logits are ignored)."""
    return SurveyExample(
        respondent_id=str(d["respondent_id"]), question_id=str(d["question_id"]), profile=d.get("profile", ""),
        groups=dict(d.get("groups", {})), question=d.get("question", ""), choices=tuple(d["choices"]),
        scores=tuple(float(s) for s in d["scores"]), scale=tuple(float(s) for s in d["scale"]),
        target=int(d["target"]), letters=tuple(d.get("letters", ())))


def write_examples_jsonl(path: str | Path, examples: Iterable[SurveyExample]) -> Path:
    """One JSON object per example (its dataclass fields)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for e in examples:
            f.write(json.dumps(dataclasses.asdict(e)) + "\n")
    return path


def read_examples_jsonl(path: str | Path) -> list[SurveyExample]:
    with Path(path).open() as f:
        return [example_from_dict(json.loads(line)) for line in f if line.strip()]


def write_predictions_jsonl(path: str | Path, examples: Sequence[SurveyExample], pred_choice_idx: Sequence[int],
                            choice_logits: Sequence[np.ndarray] | None = None) -> Path:
    """The run's predictions file: each example's fields plus "pred" (int) and "choice_logits" (floats or null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, e in enumerate(examples):
            row = dataclasses.asdict(e)
            row["pred"] = int(pred_choice_idx[i])
            row["choice_logits"] = None if choice_logits is None else [float(v) for v in choice_logits[i]]
            f.write(json.dumps(row) + "\n")
    return path


def read_predictions_jsonl(path: str | Path) -> tuple[list[SurveyExample], np.ndarray, list[np.ndarray] | None]:
    """(examples, pred_choice_idx int64 [N], choice_logits or None when any row lacks them)."""
    with Path(path).open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    examples = [example_from_dict(r) for r in rows]
    pred = np.array([int(r["pred"]) for r in rows], dtype=np.int64)
    logits = None
    if rows and all(r.get("choice_logits") is not None for r in rows):
        logits = [np.asarray(r["choice_logits"], dtype=np.float32) for r in rows]
    return examples, pred, logits


VAL_PREDICTIONS = "val_predictions.jsonl"


def temperature_of(examples: Sequence[SurveyExample], choice_logits: Sequence[np.ndarray] | None) -> float | None:
    """The temperature fitted on these (validation) answers; None without logits or answers."""
    if choice_logits is None or not len(examples):
        return None
    return C.fit_temperature(choice_logits, [e.target for e in examples])


def evaluate_run(run_dir: str | Path, plot_dimensions: Sequence[str] | None = None,
                 set_intervals: bool = True) -> dict:
    """DIR/predictions.jsonl -> DIR/metrics.json, DIR/answer_shares_<dim>.png per dimension (default: all),
    DIR/reliability.png (with logits), and DIR/routing_<dim>.png when DIR/routing_usage.csv (a
    `routing_usage_table` saved with `to_csv(index=False)`) exists. With DIR/val_predictions.jsonl (the same form,
    on validation answers) the temperature is fitted on it and the calibrated scores are reported. Returns the
    metrics dict, with the set metrics' intervals unless `set_intervals` is False (a caller that has them
    already)."""
    from cuma_model.survey import plots

    run_dir = Path(run_dir)
    examples, pred, logits = read_predictions_jsonl(run_dir / "predictions.jsonl")
    temperature = None
    if (run_dir / VAL_PREDICTIONS).exists() and logits is not None:
        val_examples, _, val_logits = read_predictions_jsonl(run_dir / VAL_PREDICTIONS)
        temperature = temperature_of(val_examples, val_logits)
    metrics = evaluate_predictions(examples, pred, logits, temperature=temperature)
    if set_intervals:
        metrics["intervals"].update(set_metric_intervals(examples, {"run": Predictions(pred, logits)})[0]["run"])
    path = run_dir / "metrics.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    if "metrics" in saved:  # a training run's summary: refresh its metrics, keep the rest (config, timings, floors)
        saved["metrics"] = metrics
        path.write_text(json.dumps(saved, indent=1))
    else:
        path.write_text(json.dumps(metrics, indent=1))
    groups = example_groups(examples)
    dims = list(plot_dimensions) if plot_dimensions is not None else list(groups)
    choice_sets = {e.choices for e in examples}
    names = list(next(iter(choice_sets))) if len(choice_sets) == 1 else None
    for d in dims:
        if d in groups and any(not M.is_missing(x) for x in groups[d]):
            plots.plot_group_answer_shares([e.question_id for e in examples], [e.target for e in examples], pred,
                                           groups[d], d, run_dir / f"answer_shares_{_safe(d)}.png", names)
    if logits is not None and examples:
        curves = {"as scored": logits}
        if temperature is not None:
            curves[f"temperature {temperature:.2f}"] = C.scaled_logits(logits, temperature)
        plot_reliability(examples, curves, run_dir / "reliability.png", title=run_dir.name)
    usage_csv = run_dir / "routing_usage.csv"
    if usage_csv.exists():
        usage = pd.read_csv(usage_csv, dtype={"group": str, "router": str})
        for d in dims:
            if (usage["dimension"] == d).any():
                plots.plot_routing_heatmap(usage, d, run_dir / f"routing_{_safe(d)}.png")
    return metrics


def plot_reliability(examples: Sequence[SurveyExample], logits_by_label: Mapping[str, Sequence[np.ndarray]],
                     path: str | Path, title: str = "") -> Path:
    """The reliability diagram of each set of logits on `examples` (`plots.plot_reliability`)."""
    from cuma_model.survey import plots

    true = np.array([e.target for e in examples], dtype=np.int64)
    curves = {}
    for label, logits in logits_by_label.items():
        proba = M.softmax_rows(logits)
        curves[label] = (np.array([p.max() for p in proba]), np.array([p.argmax() for p in proba]) == true)
    return plots.plot_reliability(curves, path, title)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cuma_model.survey.evaluate", description=(
        "Evaluate saved runs (DIR/predictions.jsonl -> DIR/metrics.json + PNGs) and compare them, "
        "or compute the statistical floors for a train/test split of examples."))
    p.add_argument("--run-dir", action="append", default=[], help="a run directory (repeatable)")
    p.add_argument("--plot-dimension", action="append", default=None,
                   help="demographic dimension to plot (repeatable; default: all)")
    p.add_argument("--baselines", action="store_true", help="fit the floors on --train and evaluate on --test")
    p.add_argument("--train", help="train examples JSONL (one SurveyExample per line)")
    p.add_argument("--test", help="test examples JSONL")
    p.add_argument("--val", help="validation examples JSONL: each floor's temperature is fitted on them")
    p.add_argument("--survey", help="instead of --train/--test: a survey name of cuma_model.survey.data.load_survey, "
                                    "split by respondent with --test-fraction and --seed (and --val-fraction of the "
                                    "training respondents for validation, as the training script does)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output directory of --baselines (one run directory per floor)")
    p.add_argument("--group-dims", help="comma-separated dimensions of the group floors, most important first")
    p.add_argument("--markdown", help="also write the comparison table as markdown to this path")
    p.add_argument("--curves", help="also draw the validation NLL curves of the --run-dir runs trained with "
                                    "--select-every into this PNG")
    a = p.parse_args(argv)
    if not a.run_dir and not a.baselines:
        p.error("give --run-dir and/or --baselines")
    results = {}
    if a.baselines:
        if not a.out or not (a.survey or (a.train and a.test)):
            p.error("--baselines needs --out and either --survey or --train and --test")
        val = []
        if a.survey:
            from cuma_model.survey.data import load_survey, split_by_respondent

            train_val, test = split_by_respondent(load_survey(a.survey), a.test_fraction, a.seed)
            train, val = split_by_respondent(train_val, a.val_fraction, a.seed + 1)
        else:
            train, test = read_examples_jsonl(a.train), read_examples_jsonl(a.test)
            val = read_examples_jsonl(a.val) if a.val else []
        dims = a.group_dims.split(",") if a.group_dims else None
        floors = fitted_baselines(train, dims)
        predictions = {}
        for name, floor in floors.items():
            predictions[name] = pr = floor.predict(test)
            write_predictions_jsonl(Path(a.out) / name / "predictions.jsonl", test, pr.choice_idx, pr.choice_logits)
            if val:
                vp = floor.predict(val)
                write_predictions_jsonl(Path(a.out) / name / VAL_PREDICTIONS, val, vp.choice_idx, vp.choice_logits)
            results[name] = evaluate_run(Path(a.out) / name, a.plot_dimension)
        results.update(sampled_twins(test, predictions, results))
    for d in a.run_dir:
        results[Path(d).name] = evaluate_run(d, a.plot_dimension)
    print(format_report(results))
    if a.markdown:
        write_markdown_table(results, a.markdown)
    if a.curves:
        print(f"written {plot_selection_curves(a.run_dir, a.curves)}")
    return 0


def plot_selection_curves(run_dirs: Sequence[str | Path], path: str | Path) -> Path:
    """The validation NLL curves (metrics.json's train.selection) of the runs that recorded them, in one PNG."""
    from . import plots

    curves = {}
    for d in run_dirs:
        selection = ((json.loads((Path(d) / "metrics.json").read_text()).get("train") or {}).get("selection"))
        if selection:
            curves[Path(d).name] = selection
    if not curves:
        raise ValueError(f"none of {[str(d) for d in run_dirs]} scored validation answers during training "
                         "(train.selection in metrics.json): train with --select-every N")
    return plots.plot_validation_curves(curves, path)


if __name__ == "__main__":
    raise SystemExit(main())

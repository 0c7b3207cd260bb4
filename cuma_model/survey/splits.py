"""Splits and subsets of examples, seeded (never depending on set iteration order or string hashing), and groups'
answer distributions."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from .example import SurveyExample


def _n_test(n: int, test_fraction: float) -> int:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if n < 2:
        raise ValueError(f"need at least 2 units to split, got {n}")
    return min(max(int(round(test_fraction * n)), 1), n - 1)


def split_by_respondent(
    examples: Sequence[SurveyExample], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[SurveyExample], list[SurveyExample]]:
    """(train, test) with no respondent in both; about `test_fraction` of the respondents go to test.

    Respondents are sorted before the seeded permutation, so the split depends only on the ids and the seed.
    Both lists keep the input order.
    """
    ids = sorted({e.respondent_id for e in examples})
    n_test = _n_test(len(ids), test_fraction)
    perm = np.random.default_rng(seed).permutation(len(ids))
    test_ids = {ids[i] for i in perm[:n_test]}
    train = [e for e in examples if e.respondent_id not in test_ids]
    test = [e for e in examples if e.respondent_id in test_ids]
    return train, test


def split_heldout_profiles(
    examples: Sequence[SurveyExample], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[SurveyExample], list[SurveyExample]]:
    """(train, test) where no test profile text occurs in train (zero-shot profiles).

    Whole profiles are held out: distinct profile texts are sorted, permuted with `seed`, and taken until about
    `test_fraction` of the respondents are in test. Respondents sharing a profile therefore land on the same side,
    so the split is also disjoint by respondent (given one profile per respondent).
    """
    respondents_per_profile: dict[str, set[str]] = {}
    for e in examples:
        respondents_per_profile.setdefault(e.profile, set()).add(e.respondent_id)
    profiles = sorted(respondents_per_profile)
    if len(profiles) < 2:
        raise ValueError(f"need at least 2 distinct profiles to split, got {len(profiles)}")
    n_respondents = len({e.respondent_id for e in examples})
    target = _n_test(n_respondents, test_fraction)
    held: set[str] = set()
    count = 0
    for i in np.random.default_rng(seed).permutation(len(profiles)):
        if count >= target or len(held) == len(profiles) - 1:
            break
        held.add(profiles[i])
        count += len(respondents_per_profile[profiles[i]])
    train = [e for e in examples if e.profile not in held]
    test = [e for e in examples if e.profile in held]
    return train, test


def subsample(examples: Sequence[SurveyExample], n: int, seed: int = 0) -> list[SurveyExample]:
    """A seeded random subset of `n` examples (all of them if fewer), in input order."""
    if n >= len(examples):
        return list(examples)
    keep = np.sort(np.random.default_rng(seed).choice(len(examples), size=n, replace=False))
    return [examples[i] for i in keep]


def subsample_respondents(examples: Sequence[SurveyExample], n: int, seed: int = 0) -> list[SurveyExample]:
    """All examples of a seeded random subset of `n` respondents, in input order."""
    ids = sorted({e.respondent_id for e in examples})
    if n >= len(ids):
        return list(examples)
    keep = {ids[i] for i in np.random.default_rng(seed).choice(len(ids), size=n, replace=False)}
    return [e for e in examples if e.respondent_id in keep]


def subsample_questions_of_respondents(examples: Sequence[SurveyExample], n: int, per_respondent: int,
                                       seed: int = 0) -> list[SurveyExample]:
    """At most `n` examples: `per_respondent` seeded random questions (all of them where it has fewer) of each of
    seeded random respondents, until `n` are taken or the respondents run out; in input order. Questions of one
    respondent share the profile prefix that packing computes once."""
    by_respondent: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_respondent.setdefault(e.respondent_id, []).append(i)
    rng = np.random.default_rng(seed)
    ids = list(by_respondent)
    keep: list[int] = []
    for j in rng.permutation(len(ids)):
        rows = by_respondent[ids[j]]
        take = min(per_respondent, len(rows), n - len(keep))
        keep += [rows[i] for i in rng.choice(len(rows), size=take, replace=False)]
        if len(keep) >= n:
            break
    return [examples[i] for i in sorted(keep)]


def group_distributions(examples: Sequence[SurveyExample], dimensions: Sequence[str], min_count: int = 20
                        ) -> tuple[list[SurveyExample], list[np.ndarray]]:
    """One example per (group, question) with at least `min_count` answers, and its target: the group's answer
    distribution over the question's choices (the recipe of SubPOP, Suh et al., ACL 2025).

    A group is one combination of labels on `dimensions` (examples missing one of them belong to none). The
    example's profile names the group ("party: Democrat; sex: Female"), its `groups` holds those labels, its
    `target` is the group's most frequent answer, its respondent id is the group's. In order of first appearance.
    """
    if not dimensions:
        raise ValueError("group_distributions needs at least one dimension")
    known = {d for e in examples for d in e.groups}
    unknown = [d for d in dimensions if d not in known]
    if unknown:
        raise ValueError(f"unknown group dimensions {unknown}; the examples have {sorted(known)}")
    cells: dict[tuple, list[SurveyExample]] = {}
    for e in examples:
        labels = tuple(e.groups.get(d) for d in dimensions)
        if any(label is None or (isinstance(label, float) and np.isnan(label)) for label in labels):
            continue
        cells.setdefault((labels, e.question_id), []).append(e)
    out, targets = [], []
    for (labels, _), members in cells.items():
        if len(members) < min_count:
            continue
        first = members[0]
        counts = np.bincount([m.target for m in members], minlength=len(first.choices)).astype(np.float64)
        profile = "; ".join(f"{d}: {label}" for d, label in zip(dimensions, labels))
        out.append(dataclasses.replace(first, respondent_id="group: " + profile, profile=profile,
                                       groups=dict(zip(dimensions, labels)), target=int(counts.argmax())))
        targets.append(counts / counts.sum())
    return out, targets


def pick_heldout_questions(examples: Sequence[SurveyExample], named: Sequence[str] | None = None,
                           count: int | None = None, fraction: float = 0.2, seed: int = 0) -> list[str]:
    """The question ids to hold out: those `named`, or `count` of them drawn with `seed` (default: about
    `fraction` of the questions, at least one), from the sorted ids. At least one question stays for training."""
    ids = sorted({e.question_id for e in examples})
    if len(ids) < 2:
        raise ValueError(f"holding out questions needs at least 2 questions, the survey has {len(ids)}")
    if named:
        unknown = sorted(set(named) - set(ids))
        if unknown:
            raise ValueError(f"--heldout-questions {unknown} are not questions of the survey; its questions: {ids}")
        held = list(dict.fromkeys(named))
    else:
        n = count if count is not None else max(int(round(fraction * len(ids))), 1)
        if not 1 <= n < len(ids):
            raise ValueError(f"--heldout-question-count {n}: hold out at least 1 and at most {len(ids) - 1} of the "
                             f"survey's {len(ids)} questions")
        held = [ids[i] for i in np.sort(np.random.default_rng(seed).permutation(len(ids))[:n])]
    if len(held) >= len(ids):
        raise ValueError(f"--heldout-questions names every question of the survey ({len(ids)}); leave at least one "
                         "to train on")
    return held


def split_by_question(examples: Sequence[SurveyExample], heldout_questions: Sequence[str],
                      test_fraction: float = 0.2, seed: int = 0) -> tuple[list[SurveyExample], list[SurveyExample]]:
    """(train, test) for questions never trained on: the respondents are split as in `split_by_respondent`; train
    keeps the training respondents' answers to every other question, test the held-out respondents' answers to the
    `heldout_questions`. No answer to a held-out question is in train, and no test respondent either."""
    held = set(heldout_questions)
    train, test = split_by_respondent(examples, test_fraction, seed)
    return [e for e in train if e.question_id not in held], [e for e in test if e.question_id in held]

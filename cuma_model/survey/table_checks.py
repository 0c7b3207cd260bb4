"""Checks of a table against the `SurveySpec` that reads it: nothing the spec names may be absent or unusable.

A missing column, a column with no values, labels or codes that match none of the values, and a `row_filter` that
keeps nothing are errors naming the spec's key and showing what the table holds. Cells skipped on purpose (answer
codes outside `codes`, such as "don't know"; values without a label) are counted, and a warning lists them when
they are a large share of a column's values.
"""
from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable

import numpy as np
import pandas as pd

from .codes import _code

# A column whose skipped share of non-empty cells reaches this is reported in the warning.
SKIPPED_SHARE_TO_WARN = 0.1


def checked_rows(spec, frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of `frame` that `spec` reads (its `row_filter` applied), once the checks above pass."""
    where = f"survey {spec.name!r}"
    _check_columns(spec, frame, where)
    if len(frame) == 0:
        raise ValueError(f"{where}: the table has no rows")
    filtered = _filtered(spec, frame, where)
    skipped = []
    for i, f in enumerate(spec.profile_fields):
        key = f"profile_fields[{i}] ({f.name!r})"
        _check_field(f, code_counts(frame[f.column]), key, where)
        counts = code_counts(filtered[f.column])
        if not counts:  # e.g. a question not asked in the waves that row_filter keeps
            skipped.append(f"{key}: column {f.column!r} is empty in the rows row_filter keeps: the field is left out "
                           "of every profile")
        elif f.labels is not None:
            unlabelled = Counter({c: n for c, n in counts.items() if c not in f.labels})
            if unlabelled.total() >= SKIPPED_SHARE_TO_WARN * counts.total():
                skipped.append(f"{key}: {_share(unlabelled, counts)} have no label and count as missing: "
                               f"{_most_common(unlabelled)}")
    for q in spec.questions:
        _, index, _, _ = spec._answer_coding(q)
        key = f"question {q.id!r}"
        _check_question(q, index, code_counts(frame[q.column]), key, where)
        counts = code_counts(filtered[q.column])
        if not counts:  # e.g. a question not asked in the waves that row_filter keeps
            skipped.append(f"{key}: column {q.column!r} has no answers in the rows row_filter keeps")
            continue
        outside = Counter({c: n for c, n in counts.items() if c not in index})
        if outside.total() >= SKIPPED_SHARE_TO_WARN * counts.total():
            skipped.append(f"{key}: {_share(outside, counts)} have codes outside 'codes' and are skipped: "
                           f"{_most_common(outside)}")
    if skipped:
        warnings.warn(f"{where}: cells skipped:\n  " + "\n  ".join(skipped), stacklevel=3)
    return filtered


def code_counts(column: pd.Series) -> Counter:
    """{code: number of cells} of the non-missing cells, most common first (each distinct value coded once)."""
    counts = Counter()
    for value, n in column.value_counts(dropna=True, sort=True).items():
        code = _code(value)
        if code is not None:
            counts[code] += int(n)
    return counts


def _check_question(q, index: dict, answers: Counter, key: str, where: str) -> None:
    """A question with no answers, or whose codes match none of them, in the whole table."""
    if not answers:
        raise ValueError(f"{where}: {key}: column {q.column!r} has no answers; fill it or remove the question")
    if not any(a in index for a in answers):
        raise ValueError(f"{where}: {key}: its codes {list(index)} match none of the answers in column "
                         f"{q.column!r}, which holds {_few(answers)}; write 'codes' as the table stores them")


def _check_field(f, codes: Counter, key: str, where: str) -> None:
    """A field whose column is empty, or whose labels match none of its values, in the whole table."""
    if not codes:
        raise ValueError(f"{where}: {key}: column {f.column!r} is empty; fill it or remove the field")
    if f.labels is not None and not any(c in f.labels for c in codes):
        raise ValueError(f"{where}: {key}: none of the codes of 'labels' ({_few(f.labels)}) occurs in column "
                         f"{f.column!r}, which holds {_few(codes)}; write them as the table stores them")


def _check_columns(spec, frame: pd.DataFrame, where: str) -> None:
    named = [("respondent_columns", c) for c in spec.respondent_columns]
    named += [(f"profile_fields[{i}] ({f.name!r})", f.column) for i, f in enumerate(spec.profile_fields)]
    named += [(f"question {q.id!r}", q.column) for q in spec.questions]
    named += [("row_filter", c) for c in spec.row_filter or ()]
    missing = [f"{key}: {column!r}" for key, column in named if column not in frame.columns]
    if missing:
        raise KeyError(f"{where}: columns not in the table: {'; '.join(missing)}. Its columns: "
                       f"{_few(map(str, frame.columns), 30)}")


def _filtered(spec, frame: pd.DataFrame, where: str) -> pd.DataFrame:
    if not spec.row_filter:
        return frame
    keep = np.ones(len(frame), dtype=bool)
    for column, allowed in spec.row_filter.items():
        values = frame[column]
        kept_values = [v for v in values.dropna().unique() if _code(v) in set(allowed)]
        matches = values.isin(kept_values).to_numpy()
        if not matches.any():
            raise ValueError(f"{where}: row_filter[{column!r}] keeps no row: none of {list(allowed)} occurs in the "
                             f"column, which holds {_few(code_counts(values))}")
        keep &= matches
    if not keep.any():
        raise ValueError(f"{where}: row_filter {dict(spec.row_filter)} keeps no row (each column matches some "
                         "rows, but no row matches them all)")
    return frame.loc[keep]


def _few(codes: Iterable, n: int = 8) -> str:
    distinct = list(dict.fromkeys(codes))
    shown = ", ".join(repr(c) for c in distinct[:n])
    return f"[{shown}{', ...' if len(distinct) > n else ''}]"


def _share(part: Counter, whole: Counter) -> str:
    return f"{part.total()} of {whole.total()} ({100 * part.total() / whole.total():.0f}%)"


def _most_common(counts: Counter, n: int = 5) -> str:
    common = counts.most_common()
    text = ", ".join(f"{code!r} x{count}" for code, count in common[:n])
    return text + (", ..." if len(common) > n else "")

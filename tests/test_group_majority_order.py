"""The group-majority floor backs off over the group dimensions in the spec's `profile_fields` order, also when the
first training respondents lack the first field."""
import dataclasses

import numpy as np
import pandas as pd

from cuma_model.survey import evaluate as E
from cuma_model.survey.data import SurveySpec

SPEC = SurveySpec.from_dict({
    "name": "order",
    "respondent_columns": ["id"],
    "profile_fields": [{"name": "party", "column": "party"}, {"name": "sex", "column": "sex"}],
    "profile_parts": [["{party}"], ["{sex}"]],
    "questions": [{"column": "q", "text": "Yes or no?"}],
    "choices": ["Yes", "No"],
    "codes": ["yes", "no"],
})


def _training_examples():
    rows = [(np.nan, "f", "yes")]  # the first respondent has no party: their groups start with sex
    rows += [("d", "f", "yes")] * 4 + [("d", "m", "yes")] + [("r", "m", "no")] * 5 + [("r", "f", "no")]
    party, sex, answer = zip(*rows)
    return SPEC.to_examples(pd.DataFrame({"id": range(len(rows)), "party": party, "sex": sex, "q": answer}))


def test_the_dimensions_follow_the_profile_fields():
    train = _training_examples()
    assert list(train[0].groups) == ["sex"]  # first appearance would put sex first
    assert E.dimension_order(train) == ["party", "sex"]
    floor = E.GroupMajority(min_count=3).fit(train)
    assert floor.dimensions == ["party", "sex"]
    # (d, m) has one answer, under min_count: back off to party d (5 x yes), not to sex m (5 of 6 say no)
    person = dataclasses.replace(train[5], respondent_id="new", groups={"party": "d", "sex": "m"})
    assert floor.predict([person]).choice_idx.tolist() == [0]
    assert floor.backoff_levels_ == {1: 1}
    assert E.GroupMajority(["sex", "party"], min_count=3).fit(train).predict([person]).choice_idx.tolist() == [1]


def test_examples_that_disagree_on_the_order_fall_back_to_first_appearance():
    train = _training_examples()
    flipped = dataclasses.replace(train[1], groups={"sex": "f", "party": "d"})
    assert E.dimension_order([train[1], flipped]) == ["party", "sex"]

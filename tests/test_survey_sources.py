"""A survey spec's `source` as local files (CSV, Parquet, a saved datasets.Dataset, joined tables) and `--data`,
through `load_survey` and through the training script's own loading."""
import json
import warnings

import numpy as np
import pandas as pd
import pytest

from cuma_model.survey.data import SurveySpec, load_survey

SPEC = {
    "name": "bikes",
    "respondent_columns": ["id"],
    "profile_fields": [{"name": "party", "column": "pid", "labels": {"1": "a Democrat", "2": "a Republican"},
                        "group_labels": {"1": "Democrat", "2": "Republican"}}],
    "profile_parts": [["{party}"]],
    "questions": [{"column": "q1", "text": "Should the city build more bike lanes?"},
                  {"column": "q2", "text": "Should the city build more roads?"}],
    "choices": ["Yes", "No"],
    "codes": [1, 2],
}


def _table(n=40, seed=0):
    rng = np.random.default_rng(seed)
    pid = rng.integers(1, 3, n)
    return pd.DataFrame({"id": np.arange(n), "pid": pid, "q1": pid, "q2": 3 - pid})


def _write_spec(folder, source=None, name="spec.json", **changes):
    spec = dict(SPEC, **changes)
    if source is not None:
        spec["source"] = source
    path = folder / name
    path.write_text(json.dumps(spec))
    return path


def _reference(table):
    return SurveySpec.from_dict(SPEC).to_examples(table)


def test_csv_source_relative_to_the_spec_file(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    _table().to_csv(tmp_path / "data" / "answers.csv", index=False)
    spec_path = _write_spec(tmp_path, {"path": "data/answers.csv"})
    monkeypatch.chdir("/")  # the path is read from the spec's folder, not from the working directory
    examples = load_survey(str(spec_path))
    assert examples == _reference(_table()) and len(examples) == 80
    assert examples[0].profile in ("You are a Democrat.", "You are a Republican.")


def test_parquet_source(tmp_path):
    _table().to_parquet(tmp_path / "answers.parquet")
    assert load_survey(str(_write_spec(tmp_path, {"path": "answers.parquet"}))) == _reference(_table())


def test_saved_dataset_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_pandas(_table(), preserve_index=False).save_to_disk(str(tmp_path / "saved"))
    assert load_survey(str(_write_spec(tmp_path, {"path": "saved"}))) == _reference(_table())
    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(_table(), preserve_index=False)}).save_to_disk(
        str(tmp_path / "splits"))
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train'\]; name one split's folder"):
        load_survey(str(_write_spec(tmp_path, {"path": "splits"})))


def test_joined_files(tmp_path):
    table = _table()
    table[["id", "pid"]].to_csv(tmp_path / "profiles.csv", index=False)
    answers = table[["id", "q1", "q2"]].assign(id=table["id"].astype(str))  # ids as text: joined by code
    answers.iloc[::-1].to_parquet(tmp_path / "answers.parquet")  # another row order
    examples = load_survey(str(_write_spec(tmp_path, {"paths": ["profiles.csv", "answers.parquet"]})))
    assert sorted(examples, key=lambda e: (int(e.respondent_id), e.question_id)) == _reference(table)


def test_a_join_keeps_respondents_missing_from_one_file_and_says_so(tmp_path):
    table = _table()
    table[["id", "pid"]].iloc[:30].to_csv(tmp_path / "profiles.csv", index=False)
    table[["id", "q1", "q2"]].to_csv(tmp_path / "answers.csv", index=False)
    with pytest.warns(UserWarning, match=r"profiles.csv' lacks 10 of 40"):
        examples = load_survey(str(_write_spec(tmp_path, {"paths": ["profiles.csv", "answers.csv"]})))
    assert len({e.respondent_id for e in examples}) == 40  # the 10 without a profile keep their answers
    assert sum(e.profile == "" for e in examples) == 20


def test_join_errors_name_the_file(tmp_path):
    table = _table()
    table[["id", "pid", "q1"]].to_csv(tmp_path / "a.csv", index=False)
    table[["id", "q1", "q2"]].to_csv(tmp_path / "b.csv", index=False)
    table[["pid", "q2"]].to_csv(tmp_path / "no_id.csv", index=False)
    pd.concat([table, table]).to_csv(tmp_path / "twice.csv", index=False)
    table[["id"]].assign(extra=1).to_csv(tmp_path / "extra.csv", index=False)
    with pytest.raises(ValueError, match=r"column 'q1' is in both .*a.csv' and .*b.csv'"):
        load_survey(str(_write_spec(tmp_path, {"paths": ["a.csv", "b.csv"]})))
    with pytest.raises(KeyError, match=r"no_id.csv' lacks the respondent columns \['id'\]"):
        load_survey(str(_write_spec(tmp_path, {"paths": ["a.csv", "no_id.csv"]})))
    with pytest.raises(ValueError, match="several rows for one respondent"):
        load_survey(str(_write_spec(tmp_path, {"paths": ["twice.csv", "extra.csv"]})))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.csv' does not exist"):
        load_survey(str(_write_spec(tmp_path, {"path": "nowhere.csv"})))
    (tmp_path / "answers.xlsx").write_text("")
    with pytest.raises(ValueError, match=r"cannot read .*answers.xlsx'.*\.parquet"):
        load_survey(str(_write_spec(tmp_path, {"path": "answers.xlsx"})))
    with pytest.raises(FileNotFoundError, match="survey spec file .*absent.json' does not exist"):
        load_survey(str(tmp_path / "absent.json"))


def test_data_overrides_the_source(tmp_path, monkeypatch):
    _table(seed=1).to_csv(tmp_path / "other.csv", index=False)
    spec_path = _write_spec(tmp_path)  # no source
    with pytest.raises(ValueError, match="has no 'source'.*--data"):
        load_survey(str(spec_path))
    monkeypatch.chdir(tmp_path)  # --data paths are the command line's: relative to the working directory
    assert load_survey(str(spec_path), data="other.csv") == _reference(_table(seed=1))
    assert load_survey(str(spec_path), data=["other.csv"]) == _reference(_table(seed=1))


def test_a_spec_file_whose_name_starts_with_a_bracket_is_a_file(tmp_path):
    _table().to_csv(tmp_path / "answers.csv", index=False)
    path = _write_spec(tmp_path, {"path": "answers.csv"}, name="[v2] good.json")
    assert load_survey(str(path)) == _reference(_table())
    assert SurveySpec.from_json(path).folder == tmp_path.resolve()
    with pytest.raises(FileNotFoundError, match="survey spec file 'no such spec' does not exist"):
        SurveySpec.from_json("no such spec")


def test_the_training_script_trains_on_a_csv_spec(tmp_path):
    """`python -m cuma_model.train --survey spec.json` end to end on a tiny model, and `--data` in its place."""
    pytest.importorskip("accelerate")
    from cuma_model.survey import train as T
    from test_train import parts

    _table(n=60).to_csv(tmp_path / "answers.csv", index=False)
    spec_path = _write_spec(tmp_path, {"path": "answers.csv"})

    def injected():  # a fresh tiny model each run; the script loads the survey itself
        return {k: v for k, v in parts().items() if k != "examples"}

    argv = ["--survey", str(spec_path), "--method", "lora", "--max-steps", "2", "--batch-size", "4",
            "--train-examples", "16", "--eval-examples", "8", "--r", "4", "--no-plots",
            "--output-dir", str(tmp_path / "run")]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=UserWarning, module="cuma_model")  # nothing here is skipped
        result = T.train(argv, **injected())
    assert result["data"]["survey"] == str(spec_path)
    assert result["data"]["n_train_split"] + result["data"]["n_test"] + result["data"]["n_val"] == 120

    _write_spec(tmp_path, name="no_source.json")
    result = T.train(argv[:1] + [str(tmp_path / "no_source.json"), "--data", str(tmp_path / "answers.csv")]
                     + argv[2:-1] + [str(tmp_path / "run-data")], **injected())
    assert result["data"]["n_train_split"] + result["data"]["n_test"] + result["data"]["n_val"] == 120
    with pytest.raises(ValueError, match=r"--data: \['.*nowhere.csv'\] do not exist"):
        T.train(argv + ["--data", str(tmp_path / "nowhere.csv")], **injected())

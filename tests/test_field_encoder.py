"""FieldEncoder: indicators of the demographic field values, and z from them in the training script."""
import json

import pytest
import torch
from test_train import options, parts

from cuma_model.survey import train as T
from cuma_model.survey.field_encoder import FieldEncoder


def test_indicators_by_hand():
    enc = FieldEncoder.fit([{"sex": "Male", "party": "Dem"}, {"sex": "Female", "party": "Rep"}, {"sex": "Male"}])
    assert enc.vocabulary == [("party", "Dem"), ("party", "Rep"), ("sex", "Female"), ("sex", "Male")]
    assert enc.dim == 4
    z = enc.encode([{"party": "Rep", "sex": "Male"}, {"sex": "Female"}, {"party": "Ind", "sex": "Male"}, {}])
    expected = torch.tensor([[0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.float32)
    assert z.dtype == torch.float32 and torch.equal(z, expected)  # an unseen label or a missing field: zeros


def test_encode_unique_shares_rows_whatever_the_key_order():
    enc = FieldEncoder([("a", "1"), ("b", "2")])
    table, index = enc.encode_unique([{"a": "1", "b": "2"}, {"b": "2"}, {"b": "2", "a": "1"}])
    assert table.shape == (2, 2) and index.tolist() == [0, 1, 0]
    assert torch.equal(table[index], enc.encode([{"a": "1", "b": "2"}, {"b": "2"}, {"a": "1", "b": "2"}]))


def test_json_round_trip_and_bad_input():
    enc = FieldEncoder.fit([{"age": "18-29"}, {"age": "65+"}])
    again = FieldEncoder.from_json(json.loads(json.dumps(enc.to_json())))
    assert again.vocabulary == enc.vocabulary
    with pytest.raises(ValueError, match="at least one"):
        FieldEncoder.fit([{}])
    with pytest.raises(ValueError, match="twice"):
        FieldEncoder([("a", "1"), ("a", "1")])
    with pytest.raises(TypeError, match="group mappings"):
        enc.encode(["a 30-year-old man"])
    with pytest.raises(ValueError, match="not a FieldEncoder"):
        FieldEncoder.from_json({"type": "sentence"})


def test_without_the_profile_in_the_prompt_field_z_carries_who_is_asking(tmp_path):
    """The tiny survey's answer is a function of party and question; with nothing about the respondent in the
    prompt, only z can tell the parties apart."""
    p = parts()
    del p["encoder"]
    common = {"profile_in_prompt": False, "max_steps": 300, "lr": 3e-3, "label_smoothing": 0.0}  # one-hot targets
    res = T.train(options(tmp_path, method="cuma", encoder=T.FIELDS, **common), **p)
    routed = res["metrics"]["accuracy"]
    blind = T.train(options(tmp_path, method="mixlora", output_dir=str(tmp_path / "blind"), **common),
                    **parts())["metrics"]["accuracy"]
    assert routed >= 0.75 and routed > blind + 0.25, (routed, blind)
    saved = FieldEncoder.from_json(json.loads((tmp_path / "run" / "final" / T.FIELD_ENCODER_NAME).read_text()))
    assert saved.vocabulary == [("party", "democrat"), ("party", "independent"), ("party", "republican")]


def test_preference_training_refuses_an_adapter_trained_on_field_z(tmp_path):
    from cuma_model.survey import preference as P

    p = parts()
    del p["encoder"]
    T.train(options(tmp_path, method="cuma", encoder=T.FIELDS, max_steps=1, do_eval=False), **p)
    argv = ["--stage", "dpo", "--sft-checkpoint", str(tmp_path / "run" / "final"), "--max-steps", "1",
            "--output-dir", str(tmp_path / "dpo")]
    with pytest.raises(ValueError, match="--encoder fields"):
        P.run_preference(argv, model=parts()["model"], tokenizer=p["tokenizer"], encoder=lambda texts: None)

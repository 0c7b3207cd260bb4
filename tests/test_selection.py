"""--select-every: the adapter of the step with the lowest validation NLL is the one kept, exactly, resumes included."""
import io
import math
import shutil

import numpy as np
import pytest
import torch

from cuma_model.survey import calibration as C
from cuma_model.survey import evaluate as E
from cuma_model.survey import run_checkpoint as R
from cuma_model.survey import train as T
from cuma_model.survey.selection import BestOnValidation
from test_resume import assert_same_run, final_weights
from test_train import options, parts


def two_choice_scorer(model):
    """The validation 'logits' are the model's weight itself: NLL falls as w[0] grows past w[1]."""
    w = model.weight.detach().flatten()
    return [np.array([float(w[0]), float(w[1])])] * 3, [0, 0, 0]


def test_the_lowest_nll_step_is_kept_and_restored():
    model = torch.nn.Linear(1, 2, bias=False)
    selector = BestOnValidation(2, two_choice_scorer)
    for step, w0 in [(2, 0.0), (4, 3.0), (6, 1.0)]:  # best at step 4
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[w0], [0.5]]))
        entry = selector.observe(model, step)
        assert entry["val_nll"] == pytest.approx(math.log1p(math.exp(0.5 - w0)))
    assert selector.best_step == 4 and model.weight[0, 0] == 1.0
    assert selector.restore(model) == 4
    assert model.weight[0, 0] == 3.0 and model.training
    # the calibrated NLL is never above the raw one (T = 1 is among the temperatures searched)
    assert all(s["val_nll_calibrated"] <= s["val_nll"] + 1e-12 for s in selector.scores)


def test_due_steps_and_state_round_trip_as_plain_data():
    selector = BestOnValidation(3, two_choice_scorer)
    assert [s for s in range(1, 11) if selector.due(s, 10)] == [3, 6, 9, 10]
    model = torch.nn.Linear(1, 2, bias=False)
    selector.observe(model, 3)
    assert not selector.due(3, 10)  # scored once only
    buf = io.BytesIO()
    torch.save(selector.state_dict(), buf)
    again = BestOnValidation(3, two_choice_scorer)
    again.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert again.scores == selector.scores and again.best_step == 3
    torch.testing.assert_close(again.best_params["weight"], model.weight.detach())
    with pytest.raises(ValueError, match="every 3 steps, this run every 4"):
        BestOnValidation(4, two_choice_scorer).load_state_dict(selector.state_dict())
    with pytest.raises(ValueError, match="at least 1 step"):
        BestOnValidation(0, two_choice_scorer)
    with pytest.raises(RuntimeError, match="nothing to select"):
        BestOnValidation(3, two_choice_scorer).restore(model)


SELECT = dict(method="cuma", max_steps=8, select_every=2, calibration_examples=24, save_steps=2, eval_examples=12,
              lr=5e-2)


def test_training_keeps_the_best_validation_step(tmp_path):
    """A learning rate that overshoots: validation NLL ends above its best, so an earlier step's adapter is kept."""
    from safetensors.torch import load_file

    res = T.train(options(tmp_path, **{**SELECT, "lr": 0.5}), **parts())
    sel = res["train"]["selection"]
    scores = {s["step"]: s["val_nll"] for s in sel["scores"]}
    assert sorted(scores) == [2, 4, 6, 8]
    assert sel["best_step"] == min(scores, key=scores.get) < 8, scores
    assert [h["step"] for h in res["train"]["history"] if "val_nll" in h] == [2, 4, 6, 8]
    # final/ holds exactly the kept step's adapter (its checkpoint was written at that step)
    run = tmp_path / "run"
    kept = final_weights(run)
    best = load_file(str(run / f"checkpoint-{sel['best_step']}" / "adapter_model.safetensors"))
    assert set(kept) == set(best)
    for k in kept:
        torch.testing.assert_close(kept[k], best[k], rtol=0, atol=0, msg=k)
    # and the evaluation scored that adapter: the validation answers it wrote have the kept step's NLL
    examples, _, logits = E.read_predictions_jsonl(run / E.VAL_PREDICTIONS)
    assert C.mean_nll_at(logits, [e.target for e in examples], 1.0) == pytest.approx(scores[sel["best_step"]],
                                                                                      rel=1e-4)


def test_a_resume_selects_exactly_what_the_straight_run_selects(tmp_path):
    straight = T.train(options(tmp_path, output_dir=str(tmp_path / "straight"), **SELECT), **parts())
    split = tmp_path / "split"
    T.train(options(tmp_path, output_dir=str(split), **SELECT), **parts())
    for d in split.iterdir():
        if d.name == "final" or d.name in ("checkpoint-6", "checkpoint-8"):
            shutil.rmtree(d)
    resumed = T.train(options(tmp_path, output_dir=str(split), resume="latest", **SELECT), **parts())
    assert_same_run(resumed, straight, split, tmp_path / "straight")
    assert resumed["train"]["selection"] == straight["train"]["selection"]


def test_selection_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="--calibration-examples 0 leaves none"):
        T.validate_args(T._args_from(options(tmp_path, select_every=5, calibration_examples=0)))
    with pytest.raises(ValueError, match="--select-every must be a finite number >= 0"):
        T.validate_args(T._args_from(options(tmp_path, select_every=-1)))
    T.train(options(tmp_path, **{**SELECT, "max_steps": 4, "do_eval": False}), **parts())
    resume = dict(SELECT, max_steps=4, do_eval=False, resume=str(tmp_path / "run" / "checkpoint-2"))
    with pytest.raises(ValueError, match="scored 24, this run would score 12"):
        T.train(options(tmp_path, **{**resume, "calibration_examples": 12}), **parts())
    with pytest.raises(ValueError, match="--select-every: 2 in the checkpoint, 0 now"):
        T.train(options(tmp_path, **{**resume, "select_every": 0}), **parts())


def test_every_help_text_renders():
    text = T.build_parser().format_help()
    assert "option_strings" not in text and "1% are" in text


def test_the_validation_curves_of_runs_are_drawn(tmp_path):
    from PIL import Image

    T.train(options(tmp_path, **{**SELECT, "max_steps": 4, "do_eval": False}), **parts())
    plain = tmp_path / "plain"
    T.train(options(tmp_path, method="lora", max_steps=2, do_eval=False, output_dir=str(plain)), **parts())
    png = E.plot_selection_curves([tmp_path / "run", plain], tmp_path / "curves.png")
    assert Image.open(png).size[0] > 300
    with pytest.raises(ValueError, match="train with --select-every N"):
        E.plot_selection_curves([plain], tmp_path / "none.png")

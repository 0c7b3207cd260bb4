"""The training script loses nothing: exact resume everywhere, refused resumes of another run, signals, bad paths."""
import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from cuma_model.survey import data as D
from cuma_model.survey import run_checkpoint as R
from cuma_model.survey import train as T
from test_train import options, parts, survey


def final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "final" / "adapter_model.safetensors"))


def assert_same_run(a, b, run_a, run_b):
    wa, wb = final_weights(run_a), final_weights(run_b)
    assert set(wa) == set(wb) and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)
    assert [h["loss"] for h in a["train"]["history"]] == [h["loss"] for h in b["train"]["history"]]
    assert [h["lr"] for h in a["train"]["history"]] == [h["lr"] for h in b["train"]["history"]]


COMMON = dict(method="cuma", epochs=3, dropout=0.1, warmup_steps=3, train_examples=90, do_eval=False)


# 90 examples in micro-batches of 8: 12 per epoch. The resume point is an epoch boundary (dropout's random stream
# must continue as if uninterrupted: the old failure) or falls inside an epoch.
@pytest.mark.parametrize("grad_accum, save_steps, resume_at, scheduler", [
    (2, 6, 6, "linear"), (2, 6, 12, "cosine"), (2, 4, 8, "cosine"), (1, 12, 12, "linear"),
], ids=["boundary-accum-linear", "boundary-accum-cosine", "mid-epoch-accum-cosine", "boundary-linear"])
def test_resume_is_exact(tmp_path, grad_accum, save_steps, resume_at, scheduler):
    common = dict(COMMON, grad_accum=grad_accum, scheduler=scheduler)
    straight = T.train(options(tmp_path, output_dir=str(tmp_path / "straight"), **common), **parts())
    split = tmp_path / "split"
    T.train(options(tmp_path, output_dir=str(split), save_steps=save_steps, **common), **parts())
    for d in split.iterdir():
        m = R.CHECKPOINT_RE.match(d.name)
        if d.name == "final" or (m and int(m.group(1)) > resume_at):
            shutil.rmtree(d)
    resumed = T.train(options(tmp_path, output_dir=str(split), save_steps=save_steps, resume="latest", **common),
                      **parts())
    assert_same_run(resumed, straight, split, tmp_path / "straight")


def test_a_resume_with_other_options_is_refused(tmp_path):
    run = tmp_path / "run"
    T.train(options(tmp_path, method="cuma", max_steps=4, save_steps=2, do_eval=False, shared_A=True), **parts())
    resume = dict(method="cuma", max_steps=4, save_steps=2, do_eval=False, shared_A=True,
                  resume=str(run / "checkpoint-2"))
    for changed, flag in [({"lr": 5e-3}, "--lr"), ({"seed": 1}, "--seed"), ({"lora_alpha": 64.0}, "--lora-alpha"),
                          ({"shared_A": False}, "--shared-A")]:
        with pytest.raises(ValueError, match=f"these options differ.*\n  {flag}: ") as info:
            T.train(options(tmp_path, **{**resume, **changed}), **parts())
        assert "in the checkpoint" in str(info.value)
    with pytest.raises(ValueError, match="--lr: .*\n  --seed: "):  # every difference is listed
        T.train(options(tmp_path, **{**resume, "lr": 5e-3, "seed": 3}), **parts())
    with pytest.raises(ValueError, match="other training data"):
        T.train(options(tmp_path, **resume), **{**parts(), "examples": survey(seed=5)})
    with pytest.raises(ValueError, match="it is a cuma run, this is lora"):
        T.train(options(tmp_path, **{**resume, "method": "lora"}), **parts())
    # what a resume may change: where outputs go and how the run is evaluated
    T.train(options(tmp_path, **{**resume, "save_steps": 3, "eval_examples": 12, "do_eval": True}), **parts())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_writes_a_checkpoint_and_the_run_resumes_exactly(tmp_path, monkeypatch, sig):
    common = dict(COMMON, epochs=2)
    straight = T.train(options(tmp_path, output_dir=str(tmp_path / "straight"), **common), **parts())
    calls = {"n": 0}
    real = T._forward_loss

    def signalled(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # a real signal, delivered while step 5 runs
            os.kill(os.getpid(), sig)
        return real(*a, **k)

    run = tmp_path / "run"
    handler = signal.getsignal(sig)
    with monkeypatch.context() as m:
        m.setattr(T, "_forward_loss", signalled)
        with pytest.raises(T.TrainingInterrupted) as stopped:  # --save-steps 0: only the signal saves
            T.train(options(tmp_path, **common), **parts())
    assert stopped.value.signum == sig and stopped.value.step == 5
    assert stopped.value.checkpoint == run / "checkpoint-5"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-5"]
    assert signal.getsignal(sig) is handler  # put back after training
    resumed = T.train(options(tmp_path, resume="latest", **common), **parts())
    assert_same_run(resumed, straight, run, tmp_path / "straight")


def test_the_output_dir_is_checked_before_anything_loads(tmp_path, monkeypatch):
    def never(*a, **k):
        raise AssertionError("loaded data or a model before checking --output-dir")

    monkeypatch.setattr(T, "load_model_and_tokenizer", never)
    monkeypatch.setattr(D, "load_survey", never)
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
            T.train(options(tmp_path, output_dir=str(out)))


def test_damaged_checkpoints_name_the_file(tmp_path):
    T.train(options(tmp_path, method="cuma", max_steps=2, save_steps=1, do_eval=False), **parts())
    ck = tmp_path / "run" / "checkpoint-1"
    state = ck / R.STATE_NAME
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"{state}.*truncated or corrupt"):
        T.train(options(tmp_path, method="cuma", max_steps=2, save_steps=1, do_eval=False, resume=str(ck)), **parts())
    final = tmp_path / "run" / "final"
    weights = final / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(ValueError, match=f"{weights} is corrupt or truncated"):
        T.train(options(tmp_path, method="cuma", max_steps=2, save_steps=1, do_eval=False, resume=str(final)),
                **parts())


def test_latest_finds_a_checkpoint_whose_replacement_was_interrupted(tmp_path):
    T.train(options(tmp_path, method="lora", max_steps=4, save_steps=2, do_eval=False), **parts())
    run = tmp_path / "run"
    shutil.rmtree(run / "final")
    os.rename(run / "checkpoint-2", run / ".checkpoint-2.cuma-old-x1y2z3")  # the gap between two renames
    os.mkdir(run / ".checkpoint-2.cuma-tmp-a1b2c3")
    assert R.find_latest_checkpoint(run).name == "checkpoint-2"
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == [".checkpoint-2.cuma-tmp-a1b2c3",
                                                                                 "checkpoint-2"]


def test_a_missing_model_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a model in the local Hugging Face cache"):
        T.load_model_and_tokenizer(str(tmp_path / "no-such-model"))


def test_train_args_record_what_the_run_used(tmp_path):
    T.train(options(tmp_path, method="lora", max_steps=2, do_eval=False), **parts())
    saved = json.loads((tmp_path / "run" / "final" / R.RUN_ARGS_NAME).read_text())
    assert saved["method"] == "lora" and saved["args"]["max_steps"] == 2


def test_main_exits_with_the_signal_code(monkeypatch):
    def interrupted(args):
        raise T.TrainingInterrupted(signal.SIGTERM, Path("runs/x/checkpoint-3"), 3)

    monkeypatch.setattr(T, "train", interrupted)
    assert T.main(["--method", "lora"]) == 128 + signal.SIGTERM


def test_a_resume_may_change_what_is_evaluated_with_per_respondent_profiles(tmp_path):
    """z of the evaluation profiles is not part of the training data: another eval split resumes fine."""
    examples = [dataclasses.replace(e, profile=f"{e.profile} {e.respondent_id}") for e in survey()]
    common = dict(method="cuma", max_steps=4, save_steps=2, do_eval=False)
    T.train(options(tmp_path, **common), **{**parts(), "examples": examples})
    run = tmp_path / "run"
    shutil.rmtree(run / "final")
    T.train(options(tmp_path, resume="latest", eval_split="val", eval_examples=10, **common),
            **{**parts(), "examples": examples})
    assert R.read_training_state(run / "final")["step"] == 4


def never_load(monkeypatch):
    def never(*a, **k):
        raise AssertionError("loaded data or a model before the check")

    monkeypatch.setattr(T, "load_model_and_tokenizer", never)
    monkeypatch.setattr(D, "load_survey", never)


def test_a_new_run_into_a_used_output_dir_is_refused_before_anything_loads(tmp_path, monkeypatch, capsys):
    common = dict(method="cuma", max_steps=2, save_steps=1, do_eval=False)
    T.train(options(tmp_path, **common), **parts())
    run = tmp_path / "run"
    before = (run / "final" / "adapter_model.safetensors").read_bytes()
    with monkeypatch.context() as m:
        never_load(m)
        with pytest.raises(FileExistsError, match="holds a previous run .*checkpoint-1/.*final/.*--resume latest.*"
                                                  "new --output-dir.*--overwrite"):
            T.train(options(tmp_path, **common))
        with pytest.raises(SystemExit):
            T.main(["--output-dir", str(run), "--max-steps", "2"])
        assert "--overwrite" in capsys.readouterr().err
        (tmp_path / "seeds").mkdir()
        (tmp_path / "seeds" / "seed-2").mkdir()
        (tmp_path / "seeds" / "seed-2" / "metrics.json").write_text("{}")
        with pytest.raises(FileExistsError, match="seed-2 holds a previous run"):  # before the first seed trains
            T.train_seeds(options(tmp_path, output_dir=str(tmp_path / "seeds"), seeds=[1, 2], **common))
    assert (run / "final" / "adapter_model.safetensors").read_bytes() == before
    # a folder with other files is not a previous run; --resume and --overwrite reuse a used one
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "notes.txt").write_text("mine")
    T.train(options(tmp_path, output_dir=str(tmp_path / "fresh"), **common), **parts())
    T.train(options(tmp_path, overwrite=True, **{**common, "max_steps": 3}), **parts(seed=1))
    assert R.read_training_state(run / "final")["step"] == 3


def test_a_crafted_training_state_is_refused_and_runs_nothing(tmp_path):
    T.train(options(tmp_path, method="cuma", max_steps=2, save_steps=1, do_eval=False), **parts())
    ck = tmp_path / "run" / "checkpoint-1"
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    state = torch.load(ck / R.STATE_NAME, weights_only=True)  # what the script wrote is plain data
    torch.save({**state, "history": [Payload()]}, ck / R.STATE_NAME)
    with pytest.raises(ValueError, match=f"{ck / R.STATE_NAME} holds objects other than plain data.*could run code"):
        T.train(options(tmp_path, method="cuma", max_steps=2, save_steps=1, do_eval=False, resume=str(ck)),
                **parts())
    assert not marker.exists()
    torch.load(ck / R.STATE_NAME, weights_only=False)  # the payload is live: unpickled, it runs
    assert marker.is_dir()


def test_options_that_cannot_hold_plain_data_are_stored_as_plain_data(tmp_path):
    """A Path among the options (a notebook's train(output_dir=Path(...))) is stored as its string."""
    result = T.train({**options(tmp_path, method="cuma", max_steps=2, do_eval=False), "output_dir": tmp_path / "run"},
                     **parts())
    state = torch.load(tmp_path / "run" / "final" / R.STATE_NAME, weights_only=True)
    assert state["args"]["output_dir"] == str(tmp_path / "run") and result["train"]["steps"] == 2


def test_a_state_without_optimizer_and_a_missing_encoder_are_refused_before_anything_loads(tmp_path, monkeypatch):
    T.train(options(tmp_path, method="cuma", max_steps=2, save_steps=1, do_eval=False), **parts())
    ck = tmp_path / "run" / "checkpoint-1"
    state = torch.load(ck / R.STATE_NAME, weights_only=True)
    del state["optimizer"]
    torch.save(state, ck / R.STATE_NAME)
    never_load(monkeypatch)
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint-1: its training_state.pt lacks "
                                         r"\['optimizer'\]"):
        T.train(options(tmp_path, method="cuma", max_steps=2, save_steps=1, do_eval=False, resume=str(ck)))
    with pytest.raises(ValueError, match="--encoder '/nonexistent' is neither a local folder nor a model"):
        T.train(options(tmp_path, method="cuma", encoder="/nonexistent", output_dir=str(tmp_path / "other")))


def test_a_checkpoint_of_an_earlier_release_is_refused_by_name(tmp_path):
    """Before config version 5 the shared routers sat on the attention module, so an optimizer state of that release
    lists the parameters in another order: its run cannot continue exactly, and says so."""
    run = tmp_path / "run"
    T.train(options(tmp_path, method="cuma", max_steps=4, save_steps=2, do_eval=False), **parts())
    config = run / "checkpoint-2" / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"cuma_config_version": 4}))
    with pytest.raises(ValueError, match="an earlier cuma release wrote it .*version 4"):
        T.train(options(tmp_path, method="cuma", max_steps=4, save_steps=2, do_eval=False,
                        resume=str(run / "checkpoint-2")), **parts())

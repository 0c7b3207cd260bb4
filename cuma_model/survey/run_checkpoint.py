"""Checkpoints of the training script: the adapter plus the training state, written as one folder.

A checkpoint folder holds the adapter (CuMA's or PEFT's files), `training_state.pt` (step, epoch position,
optimizer, scheduler, loss history, the run's options and a fingerprint of its training data) and
`train_args.json` (the options, readable). A resume continues only the same run: `resume_differences` lists every
option that changes the math and differs, and the training script refuses the resume while the list is not empty.
The state holds plain data only (tensors, numbers, strings, lists, dicts) and is read with
`torch.load(weights_only=True)`: a crafted file cannot run code on resume, it is refused.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from ..atomic import recover_folders, replace_folder
from ..checkpoint import differing_tensors, load_adapter_tensors, read_adapter_weights, write_adapter

STATE_NAME = "training_state.pt"
RUN_ARGS_NAME = "train_args.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Options a resume may change: where outputs go and how the run is evaluated, none of which the training math sees.
RESUMABLE_CHANGES = frozenset({"output_dir", "resume", "overwrite", "save_steps", "do_eval", "plots",
                               "eval_batch_size", "routing_examples", "eval_split", "eval_examples",
                               "calibration_examples", "z_permutation"})
# What a resume reads from the state; a state without one of them is refused before any model loads.
RESUME_KEYS = ("method", "step", "total_steps", "epoch", "batches_done", "optimizer", "scheduler", "history")
# What an option newer than a checkpoint meant before it existed: a checkpoint without it ran with this value
# (not with today's default, which may differ: --demographic-norm came as "none" and is "whiten" by default now).
ABSENT_MEANS = {"data_seed": None, "seeds": None, "objective": "answer", "group_by": None, "group_min_count": 20,
                "demographic_norm": "none", "lr_ratio_router": 1.0, "questions_per_respondent": 0,
                "demographic_projection_layers": 0, "data": None, "heldout_questions": None,
                "heldout_question_count": None, "select_every": 0,
                "label_smoothing": 0.0}


def save_adapter(model, method: str, directory: Path) -> None:
    """The method's adapter files into `directory` (a folder being assembled)."""
    if method == "lora":
        model.save_pretrained(str(directory))
    else:
        write_adapter(model, directory)


def load_adapter_weights(model, method: str, directory: Path) -> None:
    """Copy the adapter weights saved in `directory` into the (already adapted) `model`, names and shapes checked."""
    tensors = read_adapter_weights(directory)
    if method != "lora":
        load_adapter_tensors(model, tensors, directory)
        return
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    differ = differing_tensors({k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()},
                               {k: tuple(v.shape) for k, v in tensors.items()})
    if differ:
        raise ValueError(f"checkpoint {directory} does not match this LoRA adapter ({len(differ)} tensors differ in "
                         f"name or shape, e.g. {differ[0]})")
    set_peft_model_state_dict(model, tensors)


def write_checkpoint(directory: Path, model, method: str, state: dict, args,
                     files: Mapping[str, str] | None = None) -> Path:
    """Write the adapter + training state (+ `files`, name -> text) into `directory`, replacing any previous one as
    a unit. The state must be plain data (what `read_training_state` accepts); the options are stored as
    train_args.json has them (paths as strings)."""
    if "args" in state:
        state = {**state, "args": _normal(dict(state["args"]))}
    buf = io.BytesIO()
    torch.save(state, buf)
    try:  # what cannot be read back without unpickling arbitrary objects is refused now, not at the resume
        torch.load(io.BytesIO(buf.getvalue()), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).rpartition("WeightsUnpickler error:")[2].strip().splitlines()[0] if str(e) else ""
        raise TypeError(f"the training state for {directory} holds objects other than plain data, which a resume "
                        f"would refuse ({detail}); store them as plain types") from None

    def build(tmp: Path) -> None:
        save_adapter(model, method, tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        (tmp / STATE_NAME).write_bytes(buf.getvalue())
        (tmp / RUN_ARGS_NAME).write_text(json.dumps({"method": method, "step": state.get("step"), "args": vars(args)},
                                                    indent=1, default=str) + "\n")

    return replace_folder(directory, build)


def read_training_state(directory: Path) -> dict:
    """The state of a checkpoint, read as plain data only: a file holding anything else (which unpickling would
    construct, running whatever code it names) is refused, and nothing of it runs."""
    path = Path(directory) / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {STATE_NAME} in {directory}: not a training checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's advice (weights_only=False) is exactly what must not be done
        detail = str(e).rpartition("WeightsUnpickler error:")[2].strip().splitlines()[0] if str(e) else ""
        raise ValueError(f"{path} holds objects other than plain data (tensors, numbers, strings, lists, dicts), or "
                         f"is corrupt ({detail}); unpickling other objects could run code, so it is refused. The "
                         "training script writes plain data only: resume from a checkpoint it wrote, or start a new "
                         "run") from None
    except Exception as e:
        raise ValueError(f"{path} cannot be read (truncated or corrupt checkpoint: {type(e).__name__}: {e}); "
                         "resume from another checkpoint") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a training state")
    return state


def check_training_state(state: Mapping, directory: Path) -> None:
    """Refuse a state that lacks what a resume needs (checked before any model loads)."""
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise ValueError(f"cannot resume from {directory}: its {STATE_NAME} lacks {missing} (not written by a "
                         "training run of this script, or damaged); resume from another checkpoint, or start a new "
                         "run")


def find_latest_checkpoint(output_dir: Path) -> Path:
    """The checkpoint of `output_dir` with the highest step (final/ counts with its own step).

    Folders whose replacement a crash interrupted are repaired first, so the checkpoint that held the name is found.
    """
    output_dir = Path(output_dir)
    recover_folders(output_dir)
    found = []
    for d in output_dir.iterdir() if output_dir.is_dir() else []:
        m = CHECKPOINT_RE.match(d.name)
        if (d / STATE_NAME).is_file() and (m or d.name == "final"):
            step = int(m.group(1)) if m else _final_step(d)
            if step is not None:
                found.append((step, d.name == "final", d))
    if not found:
        raise FileNotFoundError(f"--resume latest: no checkpoint with {STATE_NAME} in {output_dir}")
    return max(found, key=lambda t: (t[0], t[1]))[2]


def _final_step(directory: Path) -> int | None:
    """final/'s step, from train_args.json (cheap) or the state; None, with a warning, when neither can be read."""
    try:
        if not (directory / RUN_ARGS_NAME).is_file():  # absent, or a FIFO or a device, which could block a read
            raise ValueError(f"no readable {RUN_ARGS_NAME}")
        step = json.loads((directory / RUN_ARGS_NAME).read_text()).get("step")
        return int(step) if step is not None else int(read_training_state(directory)["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"skipping {directory}: {e}", stacklevel=3)
        return None


def saved_args(directory: Path, state: Mapping) -> dict | None:
    """The options of the run that wrote the checkpoint (from the state, else from train_args.json)."""
    if "args" in state:
        return dict(state["args"])
    path = Path(directory) / RUN_ARGS_NAME
    if path.is_file():
        return dict(json.loads(path.read_text())["args"])
    return None


def resume_differences(saved: Mapping, now: Mapping, absent_means: Mapping = ABSENT_MEANS) -> list[str]:
    """'--name: saved -> now' for every option that changes the training math and differs between the two runs.

    An option absent from the checkpoint (newer than it) is compared as the value it had before it existed
    (`absent_means`)."""
    out = []
    for name in sorted((set(saved) | set(now)) - RESUMABLE_CHANGES):
        a, b = saved.get(name, "(absent)"), now.get(name, "(absent)")
        if a == "(absent)" and name in absent_means:
            a = absent_means[name]
        if _normal(a) != _normal(b):
            out.append(f"--{name.replace('_', '-')}: {a!r} in the checkpoint, {b!r} now")
    return out


def _normal(value):
    """Compare as train_args.json stores values (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(value, default=str))


def data_fingerprint(*parts) -> str:
    """sha256 over the training rows (token ids, labels, z): a resume on other data is refused."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(part).encode())
    return h.hexdigest()


def finished_run(run_dir: Path) -> dict:
    """The `train_args.json` of a finished training run's `final/` ({"method", "step", "args"})."""
    final = Path(run_dir) / "final"
    if not (final / RUN_ARGS_NAME).is_file():
        raise FileNotFoundError(f"{final} holds no {RUN_ARGS_NAME}: --run takes the --output-dir of a finished "
                                "`python -m cuma_model.train` run")
    return json.loads((final / RUN_ARGS_NAME).read_text())


def run_encoder(final: Path, encoder_name):
    """The z encoder a cuma run trained with: the field encoder saved in `final/`, else the named sentence
    encoder."""
    from .field_encoder import FIELD_ENCODER_NAME, FieldEncoder

    if (Path(final) / FIELD_ENCODER_NAME).is_file():
        return FieldEncoder.from_json(json.loads((Path(final) / FIELD_ENCODER_NAME).read_text()))
    from .encoder import DemographicEncoder

    return DemographicEncoder(encoder_name)

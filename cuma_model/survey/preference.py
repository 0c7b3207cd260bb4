"""Preference training of a CuMA adapter with TRL: DPO on survey answer pairs, GRPO with a survey-answer reward.

Data:
- `survey_preference_pairs(examples, seed, tokenizer)`: one pair per (respondent, question): prompt = the rendered
  survey prompt (profile system turn, question, lettered choices), chosen = the respondent's answer letter,
  rejected = another choice: the one farthest from the answer on the question's ordinal scale (ties broken by the
  seed), or (`rejected="random"`) a seeded uniform pick among the other choices. Each pair keeps its `profile`.
- any dataset with columns prompt / chosen / rejected / profile (`load_preference_data`).

How z reaches the model. TRL 1.16 calls the model with `fused_lm_head=True`, a forward it installs in front of the
model's own: it runs the backbone directly and never passes through the patched top-level forward. So the trainers
here open the per-forward conditioning scope themselves around each model call (`patch.forward_scope`: the same state the
patched forward builds: z, attention mask for the aux loss, gradient-checkpoint replay) and add the load-balancing
loss to the training loss.
- DPO: `DataCollatorForPreference` stacks the batch as [chosen rows; rejected rows] (2B rows); the collator here adds
  the B pairs' z rows and the trainer expands them explicitly to [z; z] (never a silent tiling).
- GRPO: TRL's `RepeatSampler` puts each prompt num_generations times in a row in the generation batch, so the rows'
  z, taken from each row's own profile, are exactly the prompts' z repeat_interleaved by num_generations; they go to
  `generate` and to every log-prob forward, and travel with the rows through TRL's shuffle and split.

Reference model (DPO `--reference`):
- `base` (default): the frozen base model, i.e. the policy with its adapters disabled (`cuma_model.adapters_disabled`),
  the reference the published DPO used, without a second model copy;
- `sft`: the SFT adapter the run starts from. By default the reference log-probs are precomputed once before training
  (TRL's `precompute_ref_log_probs`), so no second copy either; with precomputing off, a frozen copy of the SFT model
  is kept.

CLI: `python -m cuma_model.survey.preference --stage dpo|grpo --sft-checkpoint DIR [--model PATH] [--survey gss_abortion]
[--max-steps N] [--output-dir DIR]`; the adapter is saved with `cuma_model.save_pretrained` to OUTPUT_DIR/final.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import save_pretrained
from ..context import adapters_disabled, conditioning
from ..integrations.collator import EMBEDS_KEY, embeds_of
from ..loaders import clear_gguf_marker, load_smollm2
from ..patch import forward_scope
from .data import DEFAULT_SURVEY, SurveyExample, build_messages, render_prompts

logger = logging.getLogger(__name__)

REFERENCES = ("base", "sft")
REJECTED_MODES = ("farthest", "random")


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------


def rejected_choice(example: SurveyExample, rng: np.random.Generator, mode: str = "farthest") -> int:
    """Index of the rejected option for `example`: never the respondent's answer.

    "farthest": the option farthest from the answer on the ordinal scale (`example.scores`), ties broken by `rng`;
    "random": uniform over the other options.
    """
    if len(example.choices) < 2:
        raise ValueError(f"question {example.question_id!r} has fewer than two choices: no pair can be built")
    others = [i for i in range(len(example.choices)) if i != example.target]
    if mode == "farthest":
        dist = np.array([abs(example.scores[i] - example.scores[example.target]) for i in others])
        others = [i for i, d in zip(others, dist) if d == dist.max()]
    elif mode != "random":
        raise ValueError(f"rejected must be one of {REJECTED_MODES}, got {mode!r}")
    return int(others[int(rng.integers(len(others)))])


def survey_preference_pairs(
    examples: Sequence[SurveyExample],
    seed: int = 0,
    tokenizer=None,
    rejected: str = "farthest",
    profile_in_prompt: bool = True,
) -> list[dict]:
    """One preference pair per survey example: chosen = the respondent's answer letter, rejected = another option.

    With `tokenizer`, `prompt` is the rendered chat prompt string (`render_prompts`, generation prompt included) and
    chosen / rejected are bare letters; without it, the pair is conversational (prompt = [system, user] messages,
    chosen / rejected = one assistant message), which TRL renders itself. Every pair also carries `profile` (the text
    z is computed from), `answer` (the chosen letter), `letters`, `scores` (for the GRPO reward), `question_id` and
    `respondent_id`. The rejected option follows `rejected_choice(..., mode=rejected)` with one generator seeded by
    `seed`, drawn in input order.
    """
    rng = np.random.default_rng(seed)
    prompts = render_prompts(tokenizer, examples, profile_in_prompt=profile_in_prompt) if tokenizer else None
    pairs = []
    for i, e in enumerate(examples):
        j = rejected_choice(e, rng, rejected)
        chosen, other = e.letters[e.target], e.letters[j]
        if prompts is not None:
            prompt, c, r = prompts[i], chosen, other
        else:
            prompt = build_messages(e, profile_in_prompt=profile_in_prompt)
            c, r = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": other}]
        pairs.append({
            "prompt": prompt, "chosen": c, "rejected": r, "profile": e.profile, "answer": chosen,
            "letters": list(e.letters), "scores": [float(s) for s in e.scores],
            "question_id": e.question_id, "respondent_id": e.respondent_id,
        })
    return pairs


PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected", "profile")


def load_preference_data(path: str | Path):
    """A user preference dataset (JSON lines, JSON or CSV) with columns prompt / chosen / rejected / profile.

    A `demographic_embeds` column (one list of D floats per row) may replace `profile`.
    """
    from datasets import load_dataset

    path = Path(path)
    kind = {".jsonl": "json", ".json": "json", ".csv": "csv"}.get(path.suffix)
    if kind is None:
        raise ValueError(f"preference data must be .jsonl, .json or .csv, got {path}")
    ds = load_dataset(kind, data_files=str(path), split="train")
    needed = {"prompt", "chosen", "rejected"}
    missing = needed - set(ds.column_names)
    if missing or not ({"profile", EMBEDS_KEY} & set(ds.column_names)):
        raise ValueError(f"{path} needs columns prompt, chosen, rejected and profile (or {EMBEDS_KEY}); "
                         f"it has {ds.column_names}")
    return ds


# ------------------------------------------------------------------------------------------------------------------
# Reward
# ------------------------------------------------------------------------------------------------------------------

_LEADING = re.compile(r"^[\s\(\[\*\"'`]*")


def first_letter(completion: Any) -> str | None:
    """The answer letter a completion starts with ("B", " B.", "(B) ...", "**B**"), or None.

    Accepts a string or a conversational completion (a list of messages: the last message's content).
    """
    if isinstance(completion, list):
        completion = completion[-1]["content"] if completion else ""
    if isinstance(completion, Mapping):
        completion = completion.get("content", "")
    text = _LEADING.sub("", str(completion))
    if not text or not text[0].isalpha() or not text[0].isupper():
        return None
    if len(text) > 1 and text[1].isalpha():  # a word ("Because ...", "About right"), not a letter
        return None
    return text[0]


def survey_answer_reward(
    completions: Sequence[Any],
    answer: Sequence[str],
    letters: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    partial: float = 0.5,
    **kwargs,
) -> list[float]:
    """GRPO reward from the respondent's answer: 1.0 for the answer letter, `partial * (1 - d / range)` for another
    valid letter at ordinal distance d on the question's scale (so the far end gets 0), 0.0 when no valid letter
    starts the completion. Signature as TRL's reward functions (dataset columns arrive as keyword lists).
    """
    out = []
    for completion, ans, ls, sc in zip(completions, answer, letters, scores, strict=True):
        got = first_letter(completion)
        if got is None or got not in ls:
            out.append(0.0)
            continue
        if got == ans:
            out.append(1.0)
            continue
        sc = [float(s) for s in sc]
        span = max(sc) - min(sc)
        d = abs(sc[list(ls).index(got)] - sc[list(ls).index(ans)])
        out.append(float(partial * (1.0 - d / span)) if span > 0 else 0.0)
    return out


# ------------------------------------------------------------------------------------------------------------------
# Conditioning around TRL's model calls
# ------------------------------------------------------------------------------------------------------------------


def handle_of(model):
    handle = getattr(model, "cuma", None)
    if handle is None:
        raise ValueError("the model is not patched with CuMA: load it with cuma_model.from_pretrained(base, sft_dir) "
                         "or cuma_model.patch_model(model, ...)")
    return handle


@contextlib.contextmanager
def _forward_scope(models: Sequence[nn.Module], z: torch.Tensor, attention_mask: torch.Tensor | None,
                   compute_aux: bool):
    """`patch.forward_scope` for several models at once (policy and a reference copy); yields their states."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(forward_scope(m, z, attention_mask, compute_aux)) for m in models]


def _check_rows(z: torch.Tensor, rows: int, what: str) -> None:
    if z.dim() != 2 or z.shape[0] != rows:
        raise ValueError(f"{EMBEDS_KEY} has shape {tuple(z.shape)} but the {what} has {rows} rows")


def pair_embeds(z: torch.Tensor, rows: int) -> torch.Tensor:
    """z [B, D] of B preference pairs -> [2B, D] for TRL's concatenated batch [chosen rows; rejected rows]."""
    if rows != 2 * z.shape[0]:
        raise ValueError(f"the concatenated preference batch has {rows} rows, expected 2 x {z.shape[0]} pairs")
    return torch.cat([z, z], dim=0)


class BaseReference(nn.Module):
    """The frozen base of a CuMA model as a reference model: calls the policy with its adapters disabled.

    Holds no parameters and no second copy of the weights (the policy is not registered as a submodule).
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        handle_of(policy)
        self.__dict__["policy"] = policy
        self.config = policy.config
        self.generation_config = getattr(policy, "generation_config", None)

    def forward(self, *args, **kwargs):
        with torch.no_grad(), adapters_disabled(self.policy):
            return self.policy(*args, **kwargs)


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of a patched model (the copy's forward and conditioning are its own)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def _embed_rows(encoder: Callable, examples: Sequence[Mapping], dim: int) -> torch.Tensor:
    """z [N, D] float32 for a list of rows: each row's `demographic_embeds` if present, else encoder(profile)."""
    z = embeds_of(list(examples), encoder)
    if z.dim() != 2 or z.shape[1] != dim:
        raise ValueError(f"demographic embeddings must be [rows, {dim}], got {tuple(z.shape)}")
    return z


# ------------------------------------------------------------------------------------------------------------------
# DPO
# ------------------------------------------------------------------------------------------------------------------


def _trl():
    import trl
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return trl, DataCollatorForPreference


@dataclasses.dataclass
class PreferenceCollator:
    """TRL's preference collator plus `demographic_embeds` [B, D]: one z row per pair (chosen and rejected share it).

    `encoder` maps profile texts to [N, D] (a `DemographicEncoder`, which caches per text); rows may instead carry
    their own `demographic_embeds`.
    """

    pad_token_id: int
    encoder: Callable | None
    demographic_dim: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        _, base = _trl()
        self._base = base(pad_token_id=self.pad_token_id, max_length=self.max_length,
                          truncation_mode=self.truncation_mode, pad_to_multiple_of=self.pad_to_multiple_of)

    def __call__(self, examples: list[dict]) -> dict:
        batch = self._base(examples)
        batch[EMBEDS_KEY] = _embed_rows(self.encoder, examples, self.demographic_dim)
        return batch


def make_dpo_trainer(model, args, train_dataset, processing_class, encoder, reference: str = "base", **kwargs):
    """A `CuMADPOTrainer` (the class is built on first use so importing this module does not import TRL)."""
    return _dpo_class()(model, args, train_dataset, processing_class, encoder, reference=reference, **kwargs)


_CLASSES: dict[str, type] = {}


def _dpo_class():
    if "dpo" in _CLASSES:
        return _CLASSES["dpo"]
    from trl import DPOTrainer

    class CuMADPOTrainer(DPOTrainer):
        """DPOTrainer for a CuMA-patched model: z rows through the batch, [z; z] for the concatenated forward, a
        base (adapters disabled) or SFT reference without a second copy, and the load-balancing loss in the loss."""

        def __init__(self, model, args, train_dataset, processing_class, encoder, reference: str = "base",
                     eval_dataset=None, **kwargs):
            if reference not in REFERENCES:
                raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
            handle = handle_of(model)
            clear_gguf_marker(model)
            self.cuma_policy, self.cuma_reference = model, reference
            ref_model = None
            if not args.precompute_ref_log_probs:
                if reference == "base":
                    ref_model = BaseReference(model)
                else:  # a frozen copy of the SFT model: the policy moves away from it during training
                    ref_model = _frozen_copy(model)
            self._cuma_ref_copy = ref_model if isinstance(ref_model, nn.Module) and hasattr(ref_model, "cuma") else None
            tok = getattr(processing_class, "tokenizer", processing_class)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            collator = PreferenceCollator(tok.pad_token_id, encoder, handle.config.demographic_dim,
                                          max_length=args.max_length, truncation_mode=args.truncation_mode,
                                          pad_to_multiple_of=args.pad_to_multiple_of)
            super().__init__(model=model, ref_model=ref_model, args=args, data_collator=collator,
                             train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=processing_class, **kwargs)
            if isinstance(self.ref_model, BaseReference):
                # TRL puts its fused head in front of the reference's forward; the policy already has one
                self.ref_model.__dict__.pop("forward", None)
            self._cuma_last_aux = None

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns = list(self._signature_columns) + ["profile", EMBEDS_KEY]

        def _conditioned_models(self):
            return [self.cuma_policy] + ([self._cuma_ref_copy] if self._cuma_ref_copy is not None else [])

        def _split_inputs(self, inputs):
            z = inputs[EMBEDS_KEY]
            rest = {k: v for k, v in inputs.items() if k != EMBEDS_KEY}
            z2 = pair_embeds(z, rest["input_ids"].shape[0]).to(rest["input_ids"].device)
            return z2, rest

        def _precompute_ref_logps(self, dataset, name, batch_size):
            # the cache key must tell a base reference from an SFT one computed from the same weights
            if self._precompute_model_hash and not str(self._precompute_model_hash).endswith(self.cuma_reference):
                self._precompute_model_hash = f"{self._precompute_model_hash}-cuma-reference-{self.cuma_reference}"
            return super()._precompute_ref_logps(dataset, name, batch_size)

        def compute_ref_log_probs(self, model, inputs):
            z2, rest = self._split_inputs(inputs)
            disabled = adapters_disabled(self.cuma_policy) if self.cuma_reference == "base" else contextlib.nullcontext()
            with _forward_scope([self.cuma_policy], z2, rest["attention_mask"], compute_aux=False), disabled:
                return super().compute_ref_log_probs(model, rest)

        def _compute_loss(self, model, inputs, return_outputs):
            z2, rest = self._split_inputs(inputs)
            compute_aux = self.model.training
            with _forward_scope(self._conditioned_models(), z2, rest["attention_mask"], compute_aux) as states:
                result = super()._compute_loss(model, rest, return_outputs)
            aux = states[0].aux_loss()
            self._cuma_last_aux = aux
            if aux is None:
                return result
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux.detach()).mean().item())
            if return_outputs:
                loss, outputs = result
                return loss + aux.to(loss.dtype), outputs
            return result + aux.to(result.dtype)

    _CLASSES["dpo"] = CuMADPOTrainer
    return CuMADPOTrainer


# ------------------------------------------------------------------------------------------------------------------
# GRPO
# ------------------------------------------------------------------------------------------------------------------


def make_grpo_trainer(model, reward_funcs, args, *, train_dataset, processing_class, encoder, **kwargs):
    """A TRL `GRPOTrainer` that conditions every generated row, and every log-prob forward, on its prompt's z.

    - `model`: the policy, patched with CuMA (`patch_model` or `from_pretrained`; a GGUF-loaded model is accepted
      as de-quantized). With `args.beta > 0` the KL reference is the same model with its adapter disabled.
    - `reward_funcs`: TRL reward functions (or one), as `GRPOTrainer` takes them; `survey_answer_reward` scores
      the answer letter of a survey row.
    - `args`: a `trl.GRPOConfig`; `num_generations` completions of each prompt are conditioned on its z.
    - `train_dataset`: rows with a `prompt` and either a `demographic_embeds` (one list of D floats) or a
      `profile` text for `encoder`, plus the columns the reward functions read.
    - `processing_class`: the tokenizer.
    - `encoder`: texts -> z [N, D] (a `DemographicEncoder`), applied to `profile` where a row has no
      `demographic_embeds`.
    - `**kwargs`: passed to `GRPOTrainer` (`eval_dataset`, `callbacks`, ...).
    """
    return _grpo_class()(model, reward_funcs, args, train_dataset, processing_class, encoder, **kwargs)


def _grpo_class():
    if "grpo" in _CLASSES:
        return _CLASSES["grpo"]
    from trl import GRPOTrainer

    class CuMAGRPOTrainer(GRPOTrainer):
        """GRPOTrainer for a CuMA-patched model: each generated row is conditioned on its own profile's z (rows of
        one prompt are consecutive, so this is z repeat_interleaved by num_generations), for `generate` and for every
        log-prob forward; the load-balancing loss goes through TRL's MoE aux-loss hook. With beta > 0 the KL
        reference is the base model (adapters disabled), without a second copy."""

        def __init__(self, model, reward_funcs, args, train_dataset, processing_class, encoder, **kwargs):
            handle = handle_of(model)
            clear_gguf_marker(model)
            self.cuma_policy, self.cuma_encoder = model, encoder
            self._cuma_dim = handle.config.demographic_dim
            self._cuma_rows: torch.Tensor | None = None
            beta = args.beta
            args.beta = 0.0  # TRL would load a second model from the config's path as the reference
            try:
                super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                                 processing_class=processing_class, **kwargs)
            finally:
                args.beta = beta
            self.beta = beta
            if beta != 0.0:
                self.ref_model = BaseReference(model)
            self.aux_loss_enabled = handle.config.aux_loss_coef > 0
            self.router_aux_loss_coef = 1.0  # our aux loss comes weighted by the adapter's aux_loss_coef

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns = list(self._signature_columns) + ["profile", EMBEDS_KEY]

        def _generate_and_score_completions(self, inputs):
            z = _embed_rows(self.cuma_encoder, inputs, self._cuma_dim).to(self.accelerator.device)
            self._cuma_rows = z
            with conditioning(self.cuma_policy, z):  # generate: one z row per generated row
                output = super()._generate_and_score_completions(inputs)
            _check_rows(z, output["prompt_ids"].shape[0], "generation batch")
            output[EMBEDS_KEY] = z  # shuffled and split with the other rows by TRL
            return output

        def _compute_loss(self, model, inputs):
            self._cuma_rows = inputs[EMBEDS_KEY]
            return super()._compute_loss(model, inputs)

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                               **kwargs):
            if any(v is not None for v in kwargs.values()):
                raise NotImplementedError("multimodal inputs are not supported with CuMA conditioning")
            z = self._cuma_rows
            _check_rows(z, input_ids.shape[0], "log-prob batch")
            step = batch_size or input_ids.shape[0]
            logps, entropies, aux_terms = [], [], []
            for start in range(0, input_ids.shape[0], step):
                rows = slice(start, start + step)
                with _forward_scope([self.cuma_policy], z[rows], attention_mask[rows],
                                    compute_aux_loss and self.model.training) as states:
                    lp, ent, _ = super()._get_per_token_logps_and_entropies(
                        model, input_ids[rows], attention_mask[rows], logits_to_keep,
                        compute_entropy=compute_entropy, compute_aux_loss=False)
                logps.append(lp)
                if compute_entropy:
                    entropies.append(ent)
                aux = states[0].aux_loss()
                if aux is not None:
                    aux_terms.append(aux)
            aux = None
            if compute_aux_loss:
                aux = torch.stack(aux_terms).mean() if aux_terms else logps[0].new_zeros(())
            return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), aux

    _CLASSES["grpo"] = CuMAGRPOTrainer
    return CuMAGRPOTrainer


# ------------------------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------------------------


def load_base_model(model: str | None = None):
    """(model, tokenizer) in float32: a local Hugging Face directory, or SmolLM2-135M-Instruct (GGUF) by default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:
        return load_smollm2()
    tok = AutoTokenizer.from_pretrained(model)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    return clear_gguf_marker(base), tok


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cuma_model.survey.preference",
                                description="DPO or GRPO of a CuMA adapter on survey preferences, with TRL.")
    p.add_argument("--stage", choices=("dpo", "grpo"), required=True)
    p.add_argument("--sft-checkpoint", default=None,
                   help="adapter directory from cuma_model.save_pretrained (the SFT run) to continue from; "
                        "without it a freshly patched adapter (default CuMAConfig) is used")
    p.add_argument("--model", default=None, help="local base model directory (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--encoder", default=None, help="local sentence-encoder directory (default: all-MiniLM-L6-v2)")
    p.add_argument("--survey", default=DEFAULT_SURVEY, help="built-in survey name or a SurveySpec JSON path")
    p.add_argument("--data", default=None, help="a preference file (.jsonl/.json/.csv: prompt, chosen, rejected, "
                                                "profile) instead of survey pairs (DPO)")
    p.add_argument("--max-respondents", type=int, default=None)
    p.add_argument("--max-pairs", type=int, default=None,
                   help="training rows to use (default: what --max-steps consumes, else all)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="respondents held out (not trained on)")
    p.add_argument("--rejected", choices=REJECTED_MODES, default="farthest")
    p.add_argument("--reference", choices=REFERENCES, default="base")
    p.add_argument("--no-precompute-ref", dest="precompute_ref", action="store_false",
                   help="reference log-probs per step (sft: keeps a frozen copy) instead of once before training")
    p.add_argument("--beta", type=float, default=None, help="DPO beta (default 0.1) / GRPO KL beta (default 0)")
    p.add_argument("--learning-rate", type=float, default=5e-6)
    p.add_argument("--batch-size", type=int, default=8, help="pairs (DPO) or completions (GRPO) per device step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--logging-steps", type=int, default=1)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="runs/preference")
    return p


def _rows_needed(a) -> int | None:
    if a.max_pairs is not None:
        return a.max_pairs
    if a.max_steps > 0:
        per_step = a.batch_size * a.grad_accum
        if a.stage == "grpo":
            per_step //= a.num_generations
        return max(per_step * a.max_steps, 1)
    return None


def _survey_rows(a, tokenizer) -> list[dict]:
    from .data import load_survey, split_by_respondent, subsample

    examples = load_survey(a.survey, max_respondents=a.max_respondents, seed=a.seed)
    train, _ = split_by_respondent(examples, test_fraction=a.test_fraction, seed=a.seed)
    n = _rows_needed(a)
    if n is not None:
        train = subsample(train, n, seed=a.seed)
    return survey_preference_pairs(train, seed=a.seed, tokenizer=tokenizer, rejected=a.rejected)


def run_preference(argv: Sequence[str] | None = None, model=None, tokenizer=None, encoder=None) -> dict:
    """Run the CLI in-process; returns {"output_dir", "adapter_dir", "log_history", "train_runtime_s", ...}.

    `model` (a base model, unpatched), `tokenizer` and `encoder` may be passed to skip loading them (tests).
    """
    import cuma_model
    from datasets import Dataset

    a = build_parser().parse_args(argv)
    torch.manual_seed(a.seed)
    out = Path(a.output_dir)
    t0 = time.perf_counter()
    if model is None:
        model, tok = load_base_model(a.model)
        tokenizer = tokenizer or tok
    if tokenizer is None:
        raise ValueError("pass a tokenizer with the model")
    if cuma_model.is_patched(model):
        pass
    elif a.sft_checkpoint:
        from .field_encoder import FIELD_ENCODER_NAME

        if (Path(a.sft_checkpoint) / FIELD_ENCODER_NAME).is_file():
            raise ValueError(f"{a.sft_checkpoint} was trained on z from field values (--encoder fields); preference "
                             "training encodes profile texts and needs an adapter trained with a sentence encoder")
        cuma_model.from_pretrained(model, a.sft_checkpoint)
    else:
        logger.warning("no --sft-checkpoint: starting from a freshly patched adapter (experts are a no-op at step 0)")
        cuma_model.patch_model(model)
    if encoder is None:
        from .encoder import DemographicEncoder

        encoder = DemographicEncoder(a.encoder)
    load_s = time.perf_counter() - t0

    if a.data:
        ds = load_preference_data(a.data)
        n = _rows_needed(a)
        if n is not None and n < len(ds):
            ds = ds.select(range(n))
    else:
        ds = Dataset.from_list(_survey_rows(a, tokenizer))
    common = dict(output_dir=str(out), learning_rate=a.learning_rate, per_device_train_batch_size=a.batch_size,
                  gradient_accumulation_steps=a.grad_accum, max_steps=a.max_steps, num_train_epochs=a.epochs,
                  logging_steps=a.logging_steps, save_strategy="no", report_to="none", bf16=False, seed=a.seed,
                  gradient_checkpointing=a.gradient_checkpointing, dataloader_num_workers=0)
    trl, _ = _trl()
    if a.stage == "dpo":
        cfg = trl.DPOConfig(beta=0.1 if a.beta is None else a.beta, max_length=a.max_length,
                            precompute_ref_log_probs=a.precompute_ref, **common)
        trainer = make_dpo_trainer(model, cfg, ds, tokenizer, encoder, reference=a.reference)
    else:
        if "answer" not in ds.column_names:
            raise ValueError("GRPO needs survey rows (answer, letters, scores): use --survey, not --data")
        ds = ds.remove_columns([c for c in ("chosen", "rejected") if c in ds.column_names])
        cfg = trl.GRPOConfig(beta=0.0 if a.beta is None else a.beta, num_generations=a.num_generations,
                             max_completion_length=a.max_completion_length, temperature=a.temperature, **common)
        trainer = make_grpo_trainer(model, [survey_answer_reward], cfg, train_dataset=ds,
                                    processing_class=tokenizer, encoder=encoder)
    t1 = time.perf_counter()
    train_out = trainer.train()
    train_s = time.perf_counter() - t1
    adapter_dir = save_pretrained(model, out / "final", overwrite=True)  # this run's own output, replaced as a unit
    result = {
        "stage": a.stage, "reference": a.reference if a.stage == "dpo" else ("base" if cfg.beta else None),
        "output_dir": str(out), "adapter_dir": str(adapter_dir), "rows": len(ds),
        "global_step": trainer.state.global_step, "train_runtime_s": round(train_s, 2),
        "load_runtime_s": round(load_s, 2), "train_loss": train_out.training_loss,
        "log_history": trainer.state.log_history,
    }
    (out / "preference_result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = run_preference(argv)
    for row in result["log_history"]:
        print(json.dumps(row))
    print(f"saved adapter to {result['adapter_dir']} ({result['global_step']} steps, "
          f"{result['train_runtime_s']:.1f} s training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

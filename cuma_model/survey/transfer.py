"""`python -m cuma_model.survey.transfer`: trained survey runs scored on another survey's people and questions.

    python -m cuma_model.survey.transfer --run runs/cuma --run runs/lora --survey anes_prochoice --out runs/transfer

No answer, respondent or question of the target survey reaches training, and no floor fitted on the source survey
can answer the target's questions (other wording, other choices): this is where a model of people, not a table per
question, has to carry what it learned. Predictors: each run's adapter; the frozen base model asked the same prompts
(the first run's prompt format); the uniform guess. Each run's proper scores are also given at the temperature
fitted on its own source-survey validation answers (metrics.json): nothing is fitted on the target. For cuma runs
the target answers are scored again with z shuffled across respondents: does z still carry information? Intervals
are respondent-bootstrap 95% intervals; paired differences are the first run minus every other predictor.
Written to `<out>/transfer.json` and printed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

import cuma_model
from cuma_model.atomic import atomic_write_bytes

from . import evaluate as E
from . import splits as S
from . import train as T
from .encoder import examples_z
from .run_checkpoint import finished_run, run_encoder

TRANSFER_NAME = "transfer.json"
UNIFORM = "uniform"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cuma_model.survey.transfer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True,
                   help="a finished training run's --output-dir (repeatable; the first is compared to the rest)")
    p.add_argument("--survey", required=True, help="the target survey: a built-in name or a SurveySpec JSON path")
    p.add_argument("--data", nargs="+", default=None, help="local data files of the target survey's spec")
    p.add_argument("--respondents", type=int, default=250,
                   help="target respondents scored, drawn by --seed, with all their answers (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", required=True, help="output folder for transfer.json")
    return p


def load_run(run_dir: Path, load_base: Callable | None = None):
    """(options, method, model with the run's adapter in eval mode, tokenizer, encoder or None, source temperature)."""
    final = run_dir / "final"
    saved = finished_run(run_dir)
    args, method = T._args_from(saved["args"]), saved["method"]
    model, tokenizer = load_base(args) if load_base else T.load_model_and_tokenizer(args.model, args.gguf_file)
    if method == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, final)
    elif method != "base":
        model = cuma_model.from_pretrained(model, final, is_trainable=False)
    encoder = run_encoder(final, args.encoder) if method == "cuma" else None
    metrics = run_dir / "metrics.json"
    temperature = (json.loads(metrics.read_text()).get("calibration") or {}).get("temperature") \
        if metrics.is_file() else None
    return args, method, model.eval(), tokenizer, encoder, temperature


def transfer(runs: Sequence[str | Path], examples, batch_size: int = 32, load_base: Callable | None = None) -> dict:
    """Score each run on `examples` (SurveyExamples of the target survey) beside the base model and the uniform
    guess; returns the dict written to transfer.json (without writing it). `load_base(args) -> (model, tokenizer)`
    stands in for loading each run's base model (by default its --model, read locally)."""
    runs = [Path(r) for r in runs]
    if not runs:
        raise ValueError("give at least one --run")
    if len({r.name for r in runs}) < len(runs):
        raise ValueError(f"two --run folders share a name, which names them in the report: {[str(r) for r in runs]}")
    predictions, temperatures, z_tests, names = {}, {}, {}, []
    respondents = [e.respondent_id for e in examples]
    base_logits = None
    for i, run_dir in enumerate(runs):
        args, method, model, tokenizer, encoder, temperature = load_run(run_dir, load_base)
        letter_ids = E.letter_token_ids(tokenizer, sorted({l for e in examples for l in e.letters}))
        args.eval_batch_size = batch_size
        z = examples_z(encoder, examples) if encoder is not None else None
        logits = T.score_examples(model, tokenizer, examples, z, args=args, letter_ids=letter_ids)
        name = f"{method} ({run_dir.name})"
        names.append(name)
        predictions[name], temperatures[name] = E.Predictions(E.predict_from_logits(logits), logits), temperature
        if z is not None:
            shuffled = T.score_examples(model, tokenizer, examples, E.shuffled_across_respondents(z, respondents),
                                        args=args, letter_ids=letter_ids)
            z_tests[name] = E.z_permutation_test(examples, logits, shuffled, seed=0)
        if i == 0:  # the frozen base model, asked what the first run is asked
            with T.adapters_off(model, method) if method != "base" else contextlib.nullcontext():
                base_logits = T.score_examples(model, tokenizer, examples, z, args=args, letter_ids=letter_ids)
        del model
    predictions[T.BASE_FLOOR] = E.Predictions(E.predict_from_logits(base_logits), base_logits)
    flat = [np.zeros(len(e.letters), dtype=np.float32) for e in examples]
    predictions[UNIFORM] = E.Predictions(E.predict_from_logits(flat), flat)
    metrics = {name: E.evaluate_predictions(examples, p.choice_idx, p.choice_logits, temperature=temperatures.get(name))
               for name, p in predictions.items()}
    first, others = names[0], {n: p for n, p in predictions.items() if n != names[0]}
    paired = E.paired_differences(examples, predictions[first], others, temperatures[first], temperatures)
    set_intervals, set_paired = E.set_metric_intervals(examples, predictions, reference=first)
    for name, m in metrics.items():
        m["intervals"].update(set_intervals[name])
    for name in paired:
        paired[name].update(set_paired[name])
    report = E.format_report(metrics) + "\n" + E.format_intervals(first, metrics[first], paired)
    for name, test in z_tests.items():
        report += f"\n{name}: " + E.format_z_permutation(test)
    return E._json_safe({"runs": [str(r) for r in runs], "n": len(examples),
                         "n_respondents": len(set(respondents)), "n_questions": len({e.question_id for e in examples}),
                         "source_temperatures": temperatures, "metrics": metrics, "paired": paired,
                         "z_permutation": z_tests, "report": report})


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.respondents < 0:
        parser.error(f"--respondents must be >= 0, got {a.respondents}")
    examples = T.D.load_survey(a.survey, data=a.data)
    if a.respondents:
        examples = S.subsample_respondents(examples, a.respondents, seed=a.seed)
    result = transfer(a.run, examples, batch_size=a.batch_size)
    result.update(survey=a.survey, seed=a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / TRANSFER_NAME, (json.dumps(result, indent=1) + "\n").encode())
    print(result["report"])
    print(f"written {out / TRANSFER_NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

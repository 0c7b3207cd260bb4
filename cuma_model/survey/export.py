"""`python -m cuma_model.export`: a trained survey run's CuMA adapter as one plain LoRA per demographic group.

    python -m cuma_model.export --run runs/cuma --group-by party --ranks full 16 --evaluate

reads the run's `final/` adapter and options, rebuilds its data splits, and for each group (the distinct values of
`--group-by`'s dimensions, or each distinct profile without it) averages the routers' gates over up to
`--calibration-prompts` of the group's training prompts, each with its own z (`cuma_model.static_lora`). Written:
`<output>/rank-<R>/<group>/` (PEFT LoRA folders that vLLM, SGLang, LoRAX, TGI and PEFT load) and
`<output>/rank-<R>/manifest.json` (which folder is which group). `full` keeps every expert (exact for the averaged
gates); a number truncates each layer's update to that rank by SVD.

With `--evaluate`, the run's evaluation answers are scored with the adapter of each answer's group, loaded through
PEFT as a plain LoRA on the base model, next to exact CuMA: NLL, accuracy, soft group JS, agreement with exact
CuMA's answers and the mean KL from exact CuMA's answer probabilities, on the answers whose group has an adapter.
Written to `<output>/fidelity.json` and printed.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import cuma_model
from cuma_model.atomic import replace_folder
from cuma_model.static_lora import average_gates, static_lora_factors, write_lora

from . import evaluate as E
from . import metrics as M
from . import train as T
from .encoder import examples_z
from .prompts import render_prompts
from .run_checkpoint import finished_run, run_encoder

MANIFEST_NAME = "manifest.json"
FIDELITY_NAME = "fidelity.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cuma_model.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a training run's --output-dir (holds final/)")
    p.add_argument("--group-by", nargs="*", default=None,
                   help="profile dimensions whose value combinations are the groups (default: each distinct profile)")
    p.add_argument("--ranks", nargs="+", default=["full"],
                   help="ranks to export: 'full' (every expert, exact for the averaged gates) and/or numbers")
    p.add_argument("--calibration-prompts", type=int, default=64,
                   help="at most this many training prompts per group, drawn by the run's data seed")
    p.add_argument("--min-group-prompts", type=int, default=8,
                   help="groups with fewer training prompts get no adapter")
    p.add_argument("--output", default=None, help="default: <run>/export")
    p.add_argument("--evaluate", action="store_true", help="score the run's evaluation answers (see above)")
    p.add_argument("--eval-examples", type=int, default=None, help="evaluate on this many of them (seeded)")
    p.add_argument("--batch-size", type=int, default=16)
    return p


def _ranks(values: Sequence[str]) -> list[int | None]:
    out = []
    for v in values:
        if v == "full":
            out.append(None)
        elif v.isdigit() and int(v) > 0:
            out.append(int(v))
        else:
            raise ValueError(f"--ranks takes 'full' or positive numbers, got {v!r}")
    return out


def group_key(example, dims: Sequence[str] | None) -> str:
    """The group an example belongs to: `dim=value` pairs joined by '|', or its profile text."""
    if not dims:
        return example.profile
    return "|".join(f"{d}={example.groups.get(d, '?')}" for d in dims)


def _slug(key: str, i: int) -> str:
    return f"group-{i:03d}-" + (re.sub(r"[^A-Za-z0-9]+", "-", key).strip("-")[:48] or "empty")


def _load_run(run_dir: Path, model=None, tokenizer=None, encoder=None, examples=None):
    """(training options, model with the run's adapter, tokenizer, encoder, splits). The keywords stand in for what
    the run's options name (as in `train`): a model and tokenizer already loaded, an encoder, the survey's examples."""
    final = run_dir / "final"
    saved = finished_run(run_dir)
    if saved.get("method") != "cuma":
        raise ValueError(f"{run_dir} trained {saved.get('method')!r}: export takes a cuma run (a LoRA run is already "
                         "a plain LoRA: load its final/ folder directly)")
    args = T._args_from(saved["args"])
    if examples is None:
        examples = T.D.load_survey(args.survey, data=getattr(args, "data", None))
    splits = T.make_splits(examples, args)
    if model is None:
        model, tokenizer = T.load_model_and_tokenizer(args.model, args.gguf_file)
    model = cuma_model.from_pretrained(model, final, is_trainable=False).eval()
    if encoder is None:
        encoder = run_encoder(final, args.encoder)
    return args, model, tokenizer, encoder, splits


def _batches(model, tokenizer, prompts: Sequence[str], z: torch.Tensor, batch_size: int, max_length: int):
    pad = T.pad_token_id(tokenizer)
    rows = [tokenizer.encode(p, add_special_tokens=False)[-max_length:] for p in prompts]
    head = {"logits_to_keep": 1} if E._accepts_logits_to_keep(model) else {}  # only the routing is wanted
    for start in range(0, len(rows), batch_size):
        ids, mask, positions = E.left_pad(rows[start:start + batch_size], pad)
        yield dict(input_ids=ids, attention_mask=mask, position_ids=positions,
                   demographic_embeds=z[start:start + batch_size], **head)


def calibration_groups(examples, dims, per_group: int, min_prompts: int, seed: int) -> dict[str, list]:
    """{group: up to `per_group` of its examples, drawn by `seed`} for the groups with at least `min_prompts`."""
    by_group = defaultdict(list)
    for e in examples:
        by_group[group_key(e, dims)].append(e)
    rng = np.random.default_rng(seed)
    out = {}
    for key in sorted(by_group):
        rows = by_group[key]
        if len(rows) < min_prompts:
            continue
        if len(rows) > per_group:
            rows = [rows[i] for i in np.sort(rng.choice(len(rows), size=per_group, replace=False))]
        out[key] = rows
    return out


def export_run(a: argparse.Namespace, **given) -> dict:
    """Export (and with `a.evaluate` score) the run `a.run`; `given`: model, tokenizer, encoder, examples (see
    `_load_run`)."""
    run_dir = Path(a.run)
    out = Path(a.output) if a.output else run_dir / "export"
    ranks = _ranks(a.ranks)
    args, model, tokenizer, encoder, splits = _load_run(run_dir, **given)
    dims = a.group_by
    if dims:
        known = {d for e in splits.train_all for d in e.groups}
        unknown = sorted(set(dims) - known)
        if unknown:
            raise ValueError(f"--group-by {unknown}: not profile dimensions of this survey ({sorted(known)})")
    groups = calibration_groups(splits.train_all, dims, a.calibration_prompts, a.min_group_prompts,
                                T.data_seed(args))
    if not groups:
        raise ValueError(f"no group has --min-group-prompts {a.min_group_prompts} training prompts")
    names = {key: _slug(key, i) for i, key in enumerate(groups)}
    t = time.perf_counter()
    gates = {}
    for key, rows in tqdm(groups.items(), desc="calibrating groups", unit="group"):
        prompts = render_prompts(tokenizer, rows, profile_in_prompt=args.profile_in_prompt)
        batches = _batches(model, tokenizer, prompts, examples_z(encoder, rows), a.batch_size, args.max_length)
        gates[key] = average_gates(model, batches)
    calibrate_s = time.perf_counter() - t
    base_name = model.cuma.config.base_model_name_or_path
    for rank in ranks:
        entries = [{"adapter": names[key], "group": key, "calibration_prompts": len(rows)}
                   for key, rows in groups.items()]
        manifest = {"run": str(run_dir), "base_model": base_name, "group_by": dims or "profile",
                    "rank": rank or "full", "groups": entries,
                    "how": "each router's gates averaged over the group's calibration prompts (each with its own z);"
                           " the experts' updates under those gates as one LoRA per layer"}

        def build(tmp: Path) -> None:  # the rank's folder as a unit: no group of an earlier export is left in it
            for key in groups:
                write_lora(model, static_lora_factors(model, gates[key], rank), tmp / names[key])
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")

        folder = replace_folder(out / f"rank-{rank or 'full'}", build)
        print(f"wrote {len(entries)} LoRA adapters of rank {rank or 'full'} to {folder}")
    result = {"groups": len(groups), "calibrate_s": calibrate_s, "output": str(out)}
    if a.evaluate:
        result["fidelity"] = evaluate_export(a, args, model, tokenizer, encoder, splits, groups, names, ranks, out)
    return result


def _scores(model, tokenizer, examples, z, args, batch_size, letter_ids, progress=False) -> list[np.ndarray]:
    prompts = render_prompts(tokenizer, examples, profile_in_prompt=args.profile_in_prompt)
    return E.score_choices(model, tokenizer, prompts, [e.letters for e in examples], demographic_embeds=z,
                           batch_size=batch_size, letter_ids=letter_ids, progress=progress)


def fidelity_metrics(examples, logits: Sequence[np.ndarray], exact: Sequence[np.ndarray]) -> dict:
    """NLL, accuracy, soft group JS of `logits`, their answer agreement with `exact` and the mean KL(exact || them)."""
    pred = E.predict_from_logits(logits)
    metrics = E.evaluate_predictions(examples, pred, logits)
    p, q = M.softmax_rows(exact), M.softmax_rows(logits)
    kl = [float(np.sum(a * (np.log(a + 1e-12) - np.log(b + 1e-12)))) for a, b in zip(p, q)]
    return {"n": metrics["n"], "nll": metrics["nll"], "accuracy": metrics["accuracy"],
            "js_soft": metrics["group_gaps"]["js_soft"],
            "agreement": float(np.mean(pred == E.predict_from_logits(exact))), "kl_from_exact": float(np.mean(kl))}


def evaluate_export(a, args, model, tokenizer, encoder, splits, groups, names, ranks, out: Path) -> dict:
    """Score the evaluation answers exactly, then through each rank's adapters. `model` is unpatched on the way:
    the adapters are loaded onto its base, as a server would."""
    from peft import PeftModel

    pool = splits.eval
    if a.eval_examples and a.eval_examples < len(pool):
        pool = T.D.subsample(pool, a.eval_examples, seed=T.data_seed(args) + 3)
    covered = [e for e in pool if group_key(e, a.group_by) in groups]
    if not covered:
        raise ValueError("no evaluation answer belongs to an exported group")
    letter_ids = E.letter_token_ids(tokenizer, sorted({l for e in covered for l in e.letters}))
    t = time.perf_counter()
    exact = _scores(model, tokenizer, covered, examples_z(encoder, covered), args, a.batch_size, letter_ids,
                    progress=True)
    report = {"n_eval": len(pool), "n_covered": len(covered), "exact": fidelity_metrics(covered, exact, exact)}
    base = cuma_model.unpatch_model(model)
    by_group = defaultdict(list)
    for i, e in enumerate(covered):
        by_group[group_key(e, a.group_by)].append(i)
    for rank in ranks:
        folder = out / f"rank-{rank or 'full'}"
        logits: list = [None] * len(covered)
        for key, rows in tqdm(by_group.items(), desc=f"scoring rank {rank or 'full'}", unit="group"):
            lora = PeftModel.from_pretrained(base, folder / names[key]).eval()  # as a server would load it
            scored = _scores(lora, tokenizer, [covered[i] for i in rows], None, args, a.batch_size, letter_ids)
            for i, row in zip(rows, scored):
                logits[i] = row
            base = lora.unload()
        report[f"rank-{rank or 'full'}"] = fidelity_metrics(covered, logits, exact)
    report["score_s"] = time.perf_counter() - t
    (out / FIDELITY_NAME).write_text(json.dumps(report, indent=1) + "\n")
    print(format_fidelity(report))
    return report


def format_fidelity(report: dict) -> str:
    lines = [f"{report['n_covered']} of {report['n_eval']} evaluation answers have their group's adapter",
             "| | NLL | accuracy | soft group JS | agreement with exact | KL from exact |", "|---|---:|---:|---:|---:|---:|"]
    for name, m in report.items():
        if isinstance(m, dict) and "nll" in m:
            lines.append(f"| {name} | {m['nll']:.3f} | {100 * m['accuracy']:.1f}% | {m['js_soft']:.3f} | "
                         f"{100 * m['agreement']:.1f}% | {m['kl_from_exact']:.4f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, **given) -> int:
    a = build_parser().parse_args(argv)
    try:
        _ranks(a.ranks)
    except ValueError as e:
        build_parser().error(str(e))
    export_run(a, **given)
    return 0

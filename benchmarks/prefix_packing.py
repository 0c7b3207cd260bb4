"""Shared-prefix packing against today's left-padded rows: training and scoring examples per second, side by side.

    python benchmarks/prefix_packing.py [--batches 12] [--repeats 3] [--threads 1] [--json out.json] [--smoke]

The default run's model and adapter (SmolLM2-135M-Instruct, CuMA E=8 k=2 r=8 on q/v, whitened z) on the default
run's training batches (8 answers: 4 questions of each of 2 respondents) and on its evaluation examples (the
default's random test examples, about 4 per respondent):
  train  one forward + backward of the script's loss (cross-entropy at the answer + aux loss) per batch
  score  `score_choices`, batches of 32 prompts, with and without `prefix_groups` (the respondents)
The two paths take turns on the same batches (padded, packed, padded, packed, ...) so machine noise hits both
alike; the table gives each pass's examples per second and the median ratio packed / padded. Each packed result
is also checked against the padded one (losses and logits to float rounding). --smoke: a few batches, to check the
script runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=12, help="training batches per pass")
    p.add_argument("--score-examples", type=int, default=256, help="evaluation examples per scoring pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    if a.smoke:
        a.batches, a.score_examples, a.repeats = 2, 16, 1
    torch.set_num_threads(a.threads)

    import cuma_model
    from cuma_model.survey import data as D
    from cuma_model.survey import evaluate as E
    from cuma_model.survey import train as T
    from cuma_model.survey.encoder import DemographicEncoder
    from cuma_model.survey.packing import prefix_groups

    args = T._args_from({"do_eval": False, "plots": False})
    model, tokenizer = T.load_model_and_tokenizer()
    encoder = DemographicEncoder()
    splits = T.make_splits(D.load_survey(args.survey), args)
    rows = splits.train
    table, index = encoder.encode_unique([e.profile for e in rows] + [e.profile for e in splits.eval])
    table = table.float()
    index_train, index_eval = index[: len(rows)], index[len(rows):]
    model = T.apply_method(model, args, demographic_dim=encoder.dim)
    cuma_model.fit_demographic_norm(model, table[index_train.unique()])
    with torch.no_grad():  # trained-looking experts: B away from zero, so the adapters change the logits
        for name, param in model.named_parameters():
            if param.requires_grad and "cuma_B" in name:
                param.normal_(0, 0.02)
    letter_ids = E.letter_token_ids(tokenizer, sorted({l for e in rows + splits.eval for l in e.letters}))
    prompt_ids = T.tokenize_prompts(tokenizer, rows, args.profile_in_prompt, args.max_length)
    groups = prefix_groups([e.respondent_id for e in rows], args.questions_per_respondent)
    dataset = T.TrainSet(prompt_ids, [letter_ids[e.target_letter] for e in rows], index_train.tolist(), None, groups)
    sampler = T.EpochBatchSampler(len(dataset), args.batch_size, args.seed, groups)
    batches = [[dataset[i] for i in b] for _, b in zip(range(a.batches), sampler)]
    pad_id = T.pad_token_id(tokenizer)
    collate = {"padded": T.make_collate(pad_id), "packed": T.make_collate(pad_id, packed_for=model)}
    keep = {"logits_to_keep": 2}

    def train_pass(path):
        model.train()
        losses, t = [], time.perf_counter()
        for b in batches:
            ce, aux = T._forward_loss(model, collate[path](b), table, keep, True, True)
            (ce + aux).backward()
            losses.append((float(ce.detach()), float(aux.detach())))
        model.zero_grad(set_to_none=True)
        return len(batches) * args.batch_size / (time.perf_counter() - t), losses

    ev = splits.eval[: a.score_examples]
    prompts = D.render_prompts(tokenizer, ev, profile_in_prompt=args.profile_in_prompt)
    z_eval = table[index_eval[: len(ev)]]

    def score_pass(path):
        model.eval()
        t = time.perf_counter()
        out = E.score_choices(model, tokenizer, prompts, [e.letters for e in ev], demographic_embeds=z_eval,
                              batch_size=args.eval_batch_size, letter_ids=letter_ids, progress=False,
                              prefix_groups=[e.respondent_id for e in ev] if path == "packed" else None)
        return len(ev) / (time.perf_counter() - t), out

    rates = {(kind, path): [] for kind in ("train", "score") for path in ("padded", "packed")}
    worst = {"train_loss": 0.0, "score_logit": 0.0}
    for _ in range(a.repeats):
        results = {}
        for kind, fn in (("train", train_pass), ("score", score_pass)):
            for path in ("padded", "packed"):
                rate, results[kind, path] = fn(path)
                rates[kind, path].append(rate)
        worst["train_loss"] = max(worst["train_loss"], max(
            abs(x - y) for u, v in zip(results["train", "padded"], results["train", "packed"]) for x, y in zip(u, v)))
        worst["score_logit"] = max(worst["score_logit"], max(
            float(abs(u - v).max()) for u, v in zip(results["score", "padded"], results["score", "packed"])))

    report = {"threads": a.threads, "batch_size": args.batch_size, "batches": a.batches,
              "score_examples": len(ev), "respondents_scored": len({e.respondent_id for e in ev}),
              "examples_per_s": {f"{k}_{p}": v for (k, p), v in rates.items()},
              "ratio_packed_over_padded": {k: statistics.median(
                  x / y for x, y in zip(rates[k, "packed"], rates[k, "padded"])) for k in ("train", "score")},
              "max_abs_difference": worst}
    print(f"{'pass':<8}{'padded ex/s':>14}{'packed ex/s':>14}{'ratio':>8}")
    for k in ("train", "score"):
        pad, pk = statistics.median(rates[k, "padded"]), statistics.median(rates[k, "packed"])
        print(f"{k:<8}{pad:>14.2f}{pk:>14.2f}{report['ratio_packed_over_padded'][k]:>8.2f}")
    print(f"largest difference: loss {worst['train_loss']:.2e}, logit {worst['score_logit']:.2e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The training script's own loop against stock `transformers.Trainer` on the same CuMA training, side by side.

    python benchmarks/trainer_vs_loop.py [--steps 20] [--repeats 2] [--threads 1] [--json out.json]

Both train the default run's model (SmolLM2-135M-Instruct, CuMA E=8 k=2 r=8 on q/v) on the default run's first
training answers (batch 8, AdamW at the script's learning rate, linear schedule), with the answer-position logits
only:
  loop     `cuma_model.train.train` (its loop, sampler, per-batch seeding, checkpoint at the end), its train_s
  trainer  stock `Trainer` with a demographic_embeds column, a left-padding collator that asks the model for the
           last two positions' logits (`logits_to_keep=2`), and `compute_loss_func` = cross-entropy at the answer
           plus the aux loss, a checkpoint (adapter, optimizer, scheduler) at the end; its train_runtime
Runs alternate (loop, trainer, loop, trainer, ...) so machine noise hits both alike; the table gives each run's
seconds per step and the median ratio trainer / loop.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    import datasets
    from transformers import Trainer, TrainingArguments

    from cuma_model.survey import data as D
    from cuma_model.survey import evaluate as E
    from cuma_model.survey import train as T
    from cuma_model.survey.encoder import DemographicEncoder
    from cuma_model.survey.preference import _drop_gguf_quantizer

    # padded rows on both sides (the Trainer path has no packing collator): the loops compare, not the layouts
    args = T._args_from({"max_steps": a.steps, "do_eval": False, "plots": False, "questions_per_respondent": 0})
    base, tokenizer = T.load_model_and_tokenizer()
    _drop_gguf_quantizer(base)  # de-quantized at load, still marked quantized: Trainer would refuse it
    encoder = DemographicEncoder()
    splits = T.make_splits(D.load_survey(args.survey), args)
    rows = splits.train[: a.steps * args.batch_size]
    letter_ids = E.letter_token_ids(tokenizer, sorted({l for e in rows for l in e.letters}))
    prompt_ids = T.tokenize_prompts(tokenizer, rows, args.profile_in_prompt, args.max_length)
    labels = [letter_ids[e.target_letter] for e in rows]
    table, index = encoder.encode_unique([e.profile for e in rows])
    pad_id = T.pad_token_id(tokenizer)

    def run_loop():
        with tempfile.TemporaryDirectory() as out:
            res = T.train({**vars(args), "output_dir": out}, model=copy.deepcopy(base), tokenizer=tokenizer,
                          encoder=encoder, examples=rows + splits.val + splits.test)
        return res["timings"]["train_s"] / res["train"]["steps"]

    def collate(batch):
        input_ids, mask, position_ids = E.left_pad([b["input_ids"] for b in batch], pad_id)
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "logits_to_keep": 2,
                "labels": torch.tensor([b["labels"] for b in batch]),
                "demographic_embeds": torch.tensor([b["demographic_embeds"] for b in batch])}

    def answer_loss(outputs, labels, num_items_in_batch=None):
        ce = torch.nn.functional.cross_entropy(outputs.logits[:, -2].float(), labels)
        return ce + outputs.aux_loss if outputs.get("aux_loss") is not None else ce

    data = datasets.Dataset.from_dict({"input_ids": [p_ + [y] for p_, y in zip(prompt_ids, labels)],
                                       "labels": labels, "demographic_embeds": table[index].tolist()})

    def run_trainer():
        model = T.apply_method(copy.deepcopy(base), args, demographic_dim=encoder.dim)
        with tempfile.TemporaryDirectory() as out:
            targs = TrainingArguments(output_dir=out, max_steps=a.steps, per_device_train_batch_size=args.batch_size,
                                      learning_rate=args.lr, weight_decay=args.weight_decay, lr_scheduler_type="linear",
                                      warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm, seed=args.seed,
                                      report_to=[], use_cpu=True, logging_steps=a.steps,
                                      save_strategy="steps", save_steps=a.steps,  # the loop writes one at the end too
                                      disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0)
            trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=collate,
                              compute_loss_func=answer_loss)
            out_ = trainer.train()
        return out_.metrics["train_runtime"] / a.steps

    times = {"loop": [], "trainer": []}
    for _ in range(a.repeats):
        times["loop"].append(run_loop())
        times["trainer"].append(run_trainer())
    ratios = [t / l for t, l in zip(times["trainer"], times["loop"])]
    report = {"steps": a.steps, "threads": a.threads, "seconds_per_step": times, "ratio_trainer_over_loop": ratios,
              "median_ratio": statistics.median(ratios), "torch": torch.__version__}
    print("| run | loop s/step | Trainer s/step | Trainer / loop |\n|---|---:|---:|---:|")
    for i, (l, t) in enumerate(zip(times["loop"], times["trainer"])):
        print(f"| {i + 1} | {l:.2f} | {t:.2f} | {t / l:.3f} |")
    print(f"median ratio {report['median_ratio']:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

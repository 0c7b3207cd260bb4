"""transformers.Trainer without glue: z as a dataset column, the aux loss in the logs.

A patched model takes `demographic_embeds` in its forward signature, so Trainer keeps a `demographic_embeds`
column and the stock collators stack it into a [batch, D] tensor. The aux loss is already in `outputs.loss` and
weighted correctly under gradient accumulation (see `patch._batch_share`); `CuMACallback` adds it to the logs.
"""
from __future__ import annotations

from transformers import TrainerCallback

from ..handle import patched_submodule


class CuMACallback(TrainerCallback):
    """Logs `aux_loss`, the mean load-balancing loss (weighted, as in `outputs.aux_loss`) of the training forwards
    since the previous log, next to Trainer's `loss`: `Trainer(..., callbacks=[CuMACallback()])`. Under TRL's
    trainers, which compute their loss from the backbone, it also gives the model the gradient accumulation steps
    that weight the aux loss there.

    Trainer calls its reporting integrations (TensorBoard, W&B) before the callbacks it is given; for them to
    record `aux_loss` too, put the callback first: `trainer.callback_handler.callbacks.insert(0, CuMACallback())`.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        found = patched_submodule(model) if model is not None else None
        if found is not None:  # TRL's fused LM head weights the aux loss by it (see `cuma_model.aux_backward`)
            found[1].cuma.accumulation_steps = args.gradient_accumulation_steps

    def on_train_end(self, args, state, control, model=None, **kwargs):
        found = patched_submodule(model) if model is not None else None
        if found is not None:
            found[1].cuma.accumulation_steps = None

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        found = patched_submodule(model) if model is not None else None
        if found is None or logs is None or "loss" not in logs:
            return
        mean = found[1].cuma.aux_meter.pop_mean()
        if mean is not None:
            logs["aux_loss"] = mean
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["aux_loss"] = mean


def add_demographic_embeds(dataset, encoder, text_column: str = "profile", batch_size: int = 256):
    """`dataset` (a `datasets.Dataset`) with a `demographic_embeds` column: `encoder` applied to `text_column`.

    `encoder` is a `cuma_model.survey.encoder.DemographicEncoder` or anything with
    `encode_unique(texts) -> (table, index)`; each distinct profile is encoded once.
    """
    def encode(batch):
        table, index = encoder.encode_unique(list(batch[text_column]))
        return {"demographic_embeds": table.float()[index].tolist()}

    return dataset.map(encode, batched=True, batch_size=batch_size, desc="encoding profiles")

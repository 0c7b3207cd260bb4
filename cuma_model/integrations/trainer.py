"""transformers.Trainer without glue: z as a dataset column, the aux loss in the logs.

A patched model takes `demographic_embeds` in its forward signature, so Trainer keeps a `demographic_embeds`
column and the stock collators stack it into a [batch, D] tensor. The aux loss is already in `outputs.loss` and
weighted correctly under gradient accumulation (see `patch._batch_share`); `CuMACallback` adds it to the logs.
"""
from __future__ import annotations

import inspect

from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from ..handle import patched_submodule
from .routing_stats import RoutingStatsMeter


class CuMACallback(TrainerCallback):
    """Logs `aux_loss`, the mean load-balancing loss (weighted, as in `outputs.aux_loss`) of the training forwards
    since the previous log, next to Trainer's `loss`: `Trainer(..., callbacks=[CuMACallback()])`.

    - Trainer runs its reporting integrations (TensorBoard, W&B) before the callbacks it is given, and they consume
      the logs in their own `on_log`; so the callback moves itself to the front of the trainer's callbacks when
      Trainer starts it (`on_init_end`, or `on_train_begin` for one added later), and every integration sees
      `aux_loss`.
    - `routing_stats=True` also logs `router_entropy` (the mean entropy, in nats, of each token's router softmax,
      over routers; log(num_experts) is uniform routing) and `expert_load/<e>` (expert e's share of the top-k
      slots over all routers; 1 / num_experts each is balanced), padding left out.
    - Under TRL's trainers, which compute their loss from the backbone, it also gives the model the gradient
      accumulation steps that weight the aux loss there.
    - Trainer resumes only PEFT models from an adapter folder, and saves a PeftModel of another method (a LoRA with
      CuMA patched inside it) without CuMA's tensors. With Trainer checkpoints on, either model gets a warning when
      Trainer is created, and is refused when its arguments ask to resume (`resume_from_checkpoint`); the message
      says what works instead.
    """

    def __init__(self, routing_stats: bool = False):
        self.routing_stats = routing_stats
        self._stats = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        _move_to_front(self)
        if model is not None:
            _check_checkpoints(args, model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        _move_to_front(self)
        found = patched_submodule(model) if model is not None else None
        if found is not None:  # TRL's fused LM head weights the aux loss by it (see `cuma_model.aux_backward`)
            found[1].cuma.accumulation_steps = args.gradient_accumulation_steps
            if self.routing_stats:
                self._stats = RoutingStatsMeter(found[1].cuma)
                self._stats.attach()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        found = patched_submodule(model) if model is not None else None
        if found is not None:
            found[1].cuma.accumulation_steps = None
        if self._stats is not None:
            self._stats.detach()
            self._stats = None

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        found = patched_submodule(model) if model is not None else None
        if found is None or logs is None or "loss" not in logs:
            return
        added = {}
        mean = found[1].cuma.aux_meter.pop_mean()
        if mean is not None:
            added["aux_loss"] = mean
        if self._stats is not None:
            added.update(self._stats.pop())
        logs.update(added)
        # Trainer appended its copy of the logs to the history before the callbacks ran
        if added and state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)


def _move_to_front(callback: TrainerCallback) -> None:
    """Put `callback` first in the CallbackHandler that is calling it, so that its `on_log` runs before the
    reporting integrations'. The handler passes no reference to itself; it is the caller's `self`. Moving an item
    from position i to 0 of the list being iterated leaves the items after i where they were, so the handler's
    loop goes on with the next callback, and no callback runs twice."""
    frame = inspect.currentframe()
    try:
        for _ in range(4):
            frame = frame.f_back
            if frame is None:
                return
            handler = frame.f_locals.get("self")
            if isinstance(handler, CallbackHandler) and callback in handler.callbacks:
                if handler.callbacks[0] is not callback:
                    handler.callbacks.remove(callback)
                    handler.callbacks.insert(0, callback)
                return
    finally:
        del frame


def _check_checkpoints(args, model) -> None:
    """Warn of Trainer checkpoints that cannot resume the CuMA adapter, and refuse them when the run asks to resume."""
    import warnings

    from peft import PeftModel

    from ..checkpoint import is_cuma_peft_model

    found = patched_submodule(model)
    if found is None or is_cuma_peft_model(model) or args.save_strategy == "no":
        return
    if isinstance(model, PeftModel):
        why = ("Trainer saves this PeftModel (another PEFT method, with CuMA patched inside it) without CuMA's "
               "tensors, so its checkpoints cannot resume CuMA. Save CuMA's adapter yourself "
               "(cuma_model.save_pretrained(model, folder)), or give Trainer a model that is CuMA's own PeftModel")
    else:
        why = ("Trainer resumes only PEFT models from the adapter folders a model patched with "
               "cuma_model.patch_model saves. Build the model with peft.get_peft_model(base_model, "
               "cuma_model.CuMAConfig(..., task_type='CAUSAL_LM')) instead (it computes exactly what patch_model "
               "computes, and resumes exactly), or set save_strategy='no' and save with trainer.save_model(folder) "
               "(cuma_model.from_pretrained loads it)")
    if getattr(args, "resume_from_checkpoint", None):
        raise ValueError(f"cannot resume from {args.resume_from_checkpoint}: {why}")
    warnings.warn(f"these Trainer checkpoints cannot be resumed: {why}", stacklevel=2)


def add_demographic_embeds(dataset, encoder, text_column: str = "profile", batch_size: int = 256):
    """`dataset` (a `datasets.Dataset`) with a `demographic_embeds` column: `encoder` applied to `text_column`.

    `encoder` is a `cuma_model.survey.encoder.DemographicEncoder` or anything with
    `encode_unique(texts) -> (table, index)`; each distinct profile is encoded once.
    """
    def encode(batch):
        table, index = encoder.encode_unique(list(batch[text_column]))
        return {"demographic_embeds": table.float()[index].tolist()}

    return dataset.map(encode, batched=True, batch_size=batch_size, desc="encoding profiles")

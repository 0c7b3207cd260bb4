"""Stock transformers.Trainer on a patched model: z as a dataset column, bf16, the aux loss logged and weighted
once per batch under gradient accumulation."""
import warnings

import datasets
import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

import cuma_model
from cuma_model.integrations import CuMACallback, add_demographic_embeds
from tiny_models import tiny_decoder

D = 4


def patched(aux_loss_coef=0.01):
    model = tiny_decoder("llama")
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=4, demographic_dim=D, router_hidden_dim=8,
                           aux_loss_coef=aux_loss_coef)
    return model


def rows(n=8, seq=6, seed=0, z_scale=1.0, masked=None):
    """`masked[i]` label positions of row i are -100 (prompt tokens), so micro-batches hold unequal label counts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (n, seq), generator=g)
    labels = ids.clone()
    for i, m in enumerate(masked or []):
        labels[i, :m] = -100
    return datasets.Dataset.from_dict({
        "input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist(),
        "demographic_embeds": (torch.randn(n, D, generator=g) * z_scale).tolist()})


def arguments(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-2,
                logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                train_sampling_strategy="sequential")
    return TrainingArguments(**{**base, **kw})


def adapter_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_stock_trainer_trains_on_a_z_column(tmp_path, bf16):
    runs = []
    for z_scale in (1.0, 3.0):
        model = patched()
        trainer = Trainer(model=model, args=arguments(tmp_path, bf16=bf16), train_dataset=rows(z_scale=z_scale),
                          data_collator=default_data_collator, callbacks=[CuMACallback()])
        trainer.train()
        logged = [h for h in trainer.state.log_history if "loss" in h]
        assert len(logged) == 4 and all(h["aux_loss"] > 0 for h in logged)  # logged next to the loss, every step
        runs.append(adapter_weights(model))
    assert any(not torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # z reached the routers
    assert all(p.abs().sum() > 0 for n, p in runs[0].items() if "cuma_B" in n)


class GradsBeforeStep(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_aux_loss_counts_once_per_batch_under_gradient_accumulation(tmp_path):
    model = patched(aux_loss_coef=0.5)
    seen = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: seen.append({k: kw[k] for k in ("input_ids", "labels", "demographic_embeds")}),
        with_kwargs=True)
    capture = GradsBeforeStep()
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=1, per_device_train_batch_size=2,
                                                  gradient_accumulation_steps=2, learning_rate=0.0),
                      train_dataset=rows(n=4, masked=[4, 4, 0, 1]), data_collator=default_data_collator,
                      callbacks=[capture])
    trainer.train()
    hook.remove()
    assert len(seen) == 2
    counts = [int(b["labels"][:, 1:].ne(-100).sum()) for b in seen]
    assert counts[0] != counts[1]  # unequal shares: a plain 1 / accumulation-steps weight would not pass
    # expected: the whole batch's token-mean LM loss, plus each micro-batch's aux weighted by its share of the
    # batch's labels (shares sum to 1; the old behaviour summed them to 2)
    model.zero_grad()
    total = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in seen)
    for b in seen:
        out = model(input_ids=b["input_ids"], labels=b["labels"], demographic_embeds=b["demographic_embeds"])
        share = b["labels"][:, 1:].ne(-100).sum() / total
        lm = out.loss - out.aux_loss  # the loss of one micro-batch alone: token mean plus its aux at weight 1
        (lm * share + out.aux_loss * share).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(capture.grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    assert any(capture.grads[n].abs().sum() > 0 for n in capture.grads if "router" in n)  # the aux term is in


def test_profile_texts_become_a_z_column():
    class LengthEncoder:
        dim = D

        def encode_unique(self, texts):
            unique = sorted(set(texts))
            table = torch.tensor([[len(t), t.count("a"), 1.0, 0.0] for t in unique])
            return table, torch.tensor([unique.index(t) for t in texts])

    data = datasets.Dataset.from_dict({"profile": ["a democrat", "a republican", "a democrat"]})
    out = add_demographic_embeds(data, LengthEncoder())
    assert out["demographic_embeds"][0] == out["demographic_embeds"][2] == [10.0, 2.0, 1.0, 0.0]
    assert out["demographic_embeds"][1] == [12.0, 2.0, 1.0, 0.0]


def test_trainer_checkpoints_are_adapters(tmp_path):
    """The plain patched model: Trainer's checkpoints and save_model write the adapter, never the renamed model."""
    model = patched()
    args = arguments(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=rows(), data_collator=default_data_collator)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "run" / "checkpoint-2", tmp_path / "final"):
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
        assert not (folder / "model.safetensors").exists()
        loaded = cuma_model.from_pretrained(tiny_decoder("llama"), folder)
        batch = default_data_collator([rows()[i] for i in range(2)])
        with torch.no_grad():
            model.eval()
            torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_peft_model_trains_saves_and_resumes_with_trainer(tmp_path):
    from peft import PeftModel, get_peft_model

    def peft_model():
        return get_peft_model(tiny_decoder("llama"), cuma_model.CuMAConfig(
            num_experts=4, top_k=2, r=4, demographic_dim=D, router_hidden_dim=8, task_type="CAUSAL_LM"))

    class StopAfterTwoSteps(TrainerCallback):  # an interrupted run: same schedule, stopped after checkpoint-2
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    def run(out, callbacks=(), resume=None):
        model = peft_model()
        trainer = Trainer(model=model, args=arguments(out, max_steps=4, save_strategy="steps", save_steps=2,
                                                      per_device_train_batch_size=2),
                          train_dataset=rows(), data_collator=default_data_collator, callbacks=list(callbacks))
        trainer.train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "straight")
    run(tmp_path / "split", callbacks=[StopAfterTwoSteps()])
    assert not (tmp_path / "split" / "checkpoint-4").exists()
    resumed = run(tmp_path / "split", resume=str(tmp_path / "split" / "checkpoint-2"))
    ours = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    theirs = dict(resumed.named_parameters())
    for n, p in ours.items():
        torch.testing.assert_close(theirs[n], p, rtol=0, atol=0, msg=n)
    loaded = PeftModel.from_pretrained(tiny_decoder("llama"), str(tmp_path / "straight" / "checkpoint-4"))
    batch = default_data_collator([rows()[i] for i in range(2)])
    with torch.no_grad():
        straight.eval()
        torch.testing.assert_close(loaded(**batch).logits, straight(**batch).logits)


class RecordingReporter(TrainerCallback):
    """Stands in for a reporting integration (TensorBoard, W&B): it consumes what its `on_log` receives, then."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def test_reporting_integrations_receive_aux_loss_and_routing_stats(tmp_path):
    """The README's form, `callbacks=[CuMACallback()]`: the integrations run before the given callbacks (the
    reporter is put ahead of ours as Trainer puts them), yet they see aux_loss and the routing statistics."""
    reporter = RecordingReporter()
    model = patched()
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=2), train_dataset=rows(),
                      data_collator=default_data_collator, callbacks=[reporter, CuMACallback(routing_stats=True)])
    assert trainer.callback_handler.callbacks.index(reporter) < len(trainer.callback_handler.callbacks) - 1
    trainer.train()
    logged = [h for h in reporter.seen if "loss" in h]
    assert len(logged) == 2
    for h in logged:
        assert h["aux_loss"] > 0
        assert 0 < h["router_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
        loads = [h[f"expert_load/{e}"] for e in range(4)]
        assert all(0 <= x <= 1 for x in loads) and abs(sum(loads) - 1) < 1e-6
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["aux_loss"] for h in history] == [h["aux_loss"] for h in logged]
    assert not any("route_flat" in r.__dict__ for r in cuma_model.routers(model))  # measuring stops with training


def test_routing_stats_count_each_token_once_per_router(tmp_path):
    """expert_load is the share of the top-k slots: recomputed here from the routing the model records."""
    model = patched()
    reporter = RecordingReporter()
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=1, learning_rate=0.0), train_dataset=rows(),
                      data_collator=default_data_collator, callbacks=[reporter])
    trainer.add_callback(CuMACallback(routing_stats=True))  # added after Trainer was created: it moves at train begin
    trainer.train()
    logged = next(h for h in reporter.seen if "loss" in h)
    batch = default_data_collator([rows()[i] for i in range(4)])
    model.train()
    with cuma_model.record_routing(model) as trace:
        model(**batch)
    counts = torch.zeros(4)
    for record in trace.records:
        counts += torch.bincount(record.topk_idx.flatten(), minlength=4)
    expected = (counts / counts.sum()).tolist()
    assert [logged[f"expert_load/{e}"] for e in range(4)] == pytest.approx(expected, abs=1e-6)


def test_checkpoints_trainer_cannot_resume_are_named_up_front(tmp_path):
    """usage.md's Trainer example (patch_model, CuMACallback) with save_steps: Trainer could not resume from its
    checkpoints, so Trainer's creation warns with the fix, and a run that asks to resume is refused."""
    model = patched()
    args = arguments(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    with pytest.warns(UserWarning, match="cannot be resumed.*get_peft_model"):
        Trainer(model=model, args=args, train_dataset=rows(), data_collator=default_data_collator,
                callbacks=[CuMACallback()])
    resume = arguments(tmp_path, max_steps=2, save_strategy="steps", save_steps=1,
                       resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    with pytest.raises(ValueError, match="cannot resume from .*get_peft_model"):
        Trainer(model=model, args=resume, train_dataset=rows(), data_collator=default_data_collator,
                callbacks=[CuMACallback()])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        Trainer(model=model, args=arguments(tmp_path), train_dataset=rows(), data_collator=default_data_collator,
                callbacks=[CuMACallback()])  # no checkpoints: nothing to say


def test_a_lora_with_cuma_inside_is_named_as_dropping_cuma_from_checkpoints(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_decoder("llama"), LoraConfig(target_modules=["o_proj"]))
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=4, demographic_dim=D)
    args = arguments(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    with pytest.warns(UserWarning, match="without CuMA's tensors"):
        Trainer(model=model, args=args, train_dataset=rows(), data_collator=default_data_collator,
                callbacks=[CuMACallback()])

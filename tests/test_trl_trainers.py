"""Stock TRL SFTTrainer and DPOTrainer on a CuMA model, with `CuMACollator` as the only cuma piece: z reaches every
row, and the load-balancing loss reaches the gradient although TRL computes its loss from the backbone (its fused
LM head), weighted 1 / accumulation steps as TRL weights a MoE model's."""
import datasets
import pytest
import torch
from transformers import TrainerCallback

import cuma_model
from cuma_model.integrations import CuMACallback, CuMACollator
from tiny_models import tiny_decoder, word_tokenizer

D = 4
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran"]


class Capture(TrainerCallback):
    """Every forward's keyword arguments, and the gradients just before the (first) optimizer step."""

    def __init__(self, model):
        self.calls = []
        self.hook = model.register_forward_pre_hook(lambda m, a, kw: self.calls.append(dict(kw)), with_kwargs=True)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not hasattr(self, "grads"):
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def tokenizer():
    tok = word_tokenizer(WORDS)
    tok.eos_token = "<|im_end|>"
    return tok


def patched(aux_loss_coef=0.5, vocab=None):
    model = tiny_decoder("llama", vocab_size=vocab or len(tokenizer()), pad_token_id=tokenizer().pad_token_id)
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=4, demographic_dim=D, router_hidden_dim=8,
                           aux_loss_coef=aux_loss_coef)
    return model.train()


def z_rows(n, seed=0, scale=1.0):
    return (torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * scale).tolist()


def sft_data(n=4, seed=0, scale=1.0):
    texts = ["the cat sat on the mat", "the dog ran", "the mat sat on the cat", "a dog sat on the mat the cat ran"]
    return datasets.Dataset.from_dict({"text": (texts * n)[:n], "demographic_embeds": z_rows(n, seed, scale)})


def sft_trainer(model, tmp_path, data, callbacks=(), **kw):
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tok = tokenizer()
    base = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=5e-2,
                logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, max_length=16,
                remove_unused_columns=False, bf16=False, train_sampling_strategy="sequential")
    args = SFTConfig(**{**base, **kw})
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=list(callbacks),
                      data_collator=CuMACollator(DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)))


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_sft_trainer_trains_on_a_z_column_and_logs_the_aux_loss(tmp_path):
    runs = []
    for scale in (1.0, 3.0):
        model = patched()
        capture = Capture(model)
        trainer = sft_trainer(model, tmp_path, sft_data(scale=scale), callbacks=[capture, CuMACallback()])
        trainer.train()
        z = torch.tensor(sft_data(scale=scale)["demographic_embeds"])
        fed = [c["demographic_embeds"] for c in capture.calls if c.get("fused_lm_head")]
        assert len(fed) == 2 and torch.equal(torch.cat(fed), z)  # every row got its own z, in order
        logged = [h for h in trainer.state.log_history if "loss" in h]
        assert len(logged) == 2 and all(h["aux_loss"] > 0 for h in logged)
        runs.append(trainable(model))
    assert any(not torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # z reached the routers


def test_sft_gradient_holds_the_aux_loss_once_per_batch_under_gradient_accumulation(tmp_path):
    """Same weights, same batches: the gradient with the aux loss on minus the one with it off is exactly the
    gradient of sum over micro-batches of aux / accumulation steps."""
    grads, calls = {}, None
    for coef in (0.0, 0.5):
        model = patched(aux_loss_coef=coef)
        capture = Capture(model)
        trainer = sft_trainer(model, tmp_path, sft_data(), callbacks=[capture, CuMACallback()], max_steps=1,
                              per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=0.0)
        trainer.train()
        capture.hook.remove()
        grads[coef] = capture.grads
        calls = [c for c in capture.calls if c.get("fused_lm_head")]
    assert len(calls) == 2
    model.zero_grad()
    for c in calls:
        with cuma_model.forward_scope(model, c["demographic_embeds"], c["attention_mask"], compute_aux=True) as s:
            model.model(input_ids=c["input_ids"], attention_mask=c["attention_mask"])
        (s.aux_loss() / 2).backward()
    routers = [n for n in grads[0.5] if "router" in n]
    assert routers and any(model.get_parameter(n).grad.abs().sum() > 0 for n in routers)
    for n, g in grads[0.5].items():
        expected = grads[0.0][n] + (model.get_parameter(n).grad if model.get_parameter(n).grad is not None else 0)
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-7, msg=n)


def test_sft_without_the_callback_warns_where_the_aux_weight_comes_from(tmp_path):
    with pytest.warns(UserWarning, match="without CuMACallback"):
        sft_trainer(patched(), tmp_path, sft_data(), max_steps=1).train()


def test_sft_refuses_packed_rows_and_a_dropped_z_column(tmp_path):
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        sft_trainer(patched(), tmp_path, sft_data(), remove_unused_columns=True).train()
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = CuMACollator(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True))
    examples = [{"input_ids": [3, 4, 5], "demographic_embeds": [0.0] * D},
                {"input_ids": [6, 7], "demographic_embeds": [1.0] * D}]
    with pytest.raises(ValueError, match="made 1 rows from 2 examples"):
        collator(examples)


def test_collator_encodes_a_profile_column():
    from transformers import default_data_collator

    def encoder(texts):
        return torch.tensor([[len(t), 1.0, 0.0, 0.0] for t in texts])

    collator = CuMACollator(default_data_collator, encoder=encoder)
    batch = collator([{"input_ids": [3, 4], "profile": "a democrat"}, {"input_ids": [5, 6], "profile": "a voter"}])
    assert batch["demographic_embeds"].tolist() == [[10.0, 1.0, 0.0, 0.0], [7.0, 1.0, 0.0, 0.0]]
    assert batch["input_ids"].tolist() == [[3, 4], [5, 6]]


# ---------------------------------------------------------------------------------------------------------- DPO


def pairs(n=4, seed=0):
    return datasets.Dataset.from_dict({
        "prompt": ["the cat", "the dog", "on the", "the mat"][:n], "chosen": [" sat", " ran", " mat", " sat"][:n],
        "rejected": [" ran", " sat", " cat", " dog"][:n], "demographic_embeds": z_rows(n, seed, 3.0)})


def test_dpo_trainer_with_a_cuma_peft_config_sees_z_for_chosen_and_rejected_rows(tmp_path):
    """TRL's own PEFT route: the reference is the base model (adapters disabled), the policy gets [z; z]."""
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tok = tokenizer()
    model = tiny_decoder("llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    config = cuma_model.CuMAConfig(num_experts=4, top_k=2, r=4, demographic_dim=D, router_hidden_dim=8,
                                   aux_loss_coef=0.5, task_type="CAUSAL_LM")
    capture = Capture(model)
    args = DPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=5e-2,
                     logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                     remove_unused_columns=False, bf16=False, train_sampling_strategy="sequential")
    trainer = DPOTrainer(model=model, args=args, train_dataset=pairs(), processing_class=tok, peft_config=config,
                         data_collator=CuMACollator(DataCollatorForPreference(pad_token_id=tok.pad_token_id)),
                         callbacks=[capture, CuMACallback()])
    before = trainable(trainer.model)
    trainer.train()
    z = torch.tensor(pairs()["demographic_embeds"])
    policy = [c for c in capture.calls if c.get("fused_lm_head") and torch.is_tensor(c.get("demographic_embeds"))]
    steps = [torch.cat([z[i:i + 2], z[i:i + 2]]) for i in (0, 2)]  # [z; z] for [chosen; rejected] rows
    seen = [next(i for i, zz in enumerate(steps) if torch.equal(c["demographic_embeds"], zz)) for c in policy]
    assert all(c["input_ids"].shape[0] == 4 for c in policy) and set(seen) == {0, 1}  # reference and policy alike
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(h["aux_loss"] > 0 for h in logged)
    after = trainable(trainer.model)
    assert before and any(not torch.equal(before[k], after[k]) for k in before)


def test_dpo_gradient_holds_the_aux_loss_once_per_batch_under_gradient_accumulation(tmp_path):
    """DPO's loss is a mean that Trainer divides by the accumulation steps itself (unlike SFT's token sum): the aux
    part of the gradient is still sum over micro-batches of aux / steps."""
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tok = tokenizer()
    grads, calls, model = {}, None, None
    for coef in (0.0, 0.5):
        model = tiny_decoder("llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id)
        config = cuma_model.CuMAConfig(num_experts=4, top_k=2, r=4, demographic_dim=D, router_hidden_dim=8,
                                       aux_loss_coef=coef, task_type="CAUSAL_LM")
        capture = Capture(model)
        args = DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=0.0, logging_steps=1, report_to=[],
                         use_cpu=True, save_strategy="no", disable_tqdm=True, remove_unused_columns=False, bf16=False,
                         train_sampling_strategy="sequential")
        trainer = DPOTrainer(model=model, args=args, train_dataset=pairs(), processing_class=tok, peft_config=config,
                             data_collator=CuMACollator(DataCollatorForPreference(pad_token_id=tok.pad_token_id)),
                             callbacks=[capture, CuMACallback()])
        trainer.train()
        capture.hook.remove()
        grads[coef] = {n.replace("base_model.model.", ""): g for n, g in capture.grads.items()}
        calls = [c for c in capture.calls if c.get("fused_lm_head")]
    inner = trainer.model.get_base_model()
    inner.zero_grad()
    seen = set()
    for c in calls:  # the reference and the policy see one batch each micro-batch: the aux counts once
        key = (c["input_ids"].data_ptr(), c["demographic_embeds"].sum().item())
        if key in seen:
            continue
        seen.add(key)
        with cuma_model.forward_scope(inner, c["demographic_embeds"], c["attention_mask"], compute_aux=True) as s:
            inner.model(input_ids=c["input_ids"], attention_mask=c["attention_mask"])
        (s.aux_loss() / 2).backward()
    assert len(seen) == 2
    for n, g in grads[0.5].items():
        extra = inner.get_parameter(n).grad
        expected = grads[0.0][n] + (extra if extra is not None else 0)
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-7, msg=n)
    assert any(inner.get_parameter(n).grad.abs().sum() > 0 for n in grads[0.5] if "router" in n)

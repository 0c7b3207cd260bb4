"""z must reach every router, correctly, through every way people run a decoder."""
import warnings

import pytest
import torch

import cuma_model
from tiny_models import randomize_experts, tiny_decoder

D = 6


def patched(arch="llama", seed=0, **kw):
    model = tiny_decoder(arch, seed=seed)
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=4, demographic_dim=D, router_hidden_dim=16, **kw)
    randomize_experts(model, std=0.5, seed=seed + 1)
    return model


def test_z_changes_the_output_and_rows_are_independent():
    model = patched()
    ids = torch.randint(3, 97, (3, 8))
    z = torch.randn(3, D) * 3
    full = model(ids, demographic_embeds=z).logits
    other = model(ids, demographic_embeds=torch.randn(3, D) * 3).logits
    assert not torch.allclose(full, other, atol=1e-4)
    for i in range(3):
        torch.testing.assert_close(model(ids[i:i + 1], demographic_embeds=z[i:i + 1]).logits, full[i:i + 1],
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_cached_greedy_decoding_equals_uncached(arch):
    model = patched(arch)
    ids = torch.randint(3, 97, (2, 6))
    z = torch.randn(2, D) * 3
    cached = model.generate(ids, attention_mask=torch.ones_like(ids), demographic_embeds=z, max_new_tokens=6,
                            do_sample=False, pad_token_id=0)
    uncached = model.generate(ids, attention_mask=torch.ones_like(ids), demographic_embeds=z, max_new_tokens=6,
                              do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("mode", [dict(num_beams=3, do_sample=False), dict(do_sample=True, top_k=5)],
                         ids=["beams", "sampling"])
def test_beams_and_num_return_sequences_follow_their_rows(mode):
    model = patched()
    ids = torch.randint(3, 97, (2, 5))
    z = torch.randn(2, D) * 3
    kw = dict(max_new_tokens=4, num_return_sequences=2, pad_token_id=0, **mode)

    def run(rows, conditioned):
        torch.manual_seed(0)
        mask = torch.ones_like(ids[rows])
        if not conditioned:
            return model.generate(ids[rows], attention_mask=mask, demographic_embeds=z[rows], **kw)
        with cuma_model.conditioning(model, z[rows]):  # generate expands the pending z with its rows too
            return model.generate(ids[rows], attention_mask=mask, **kw)

    both = run(slice(0, 2), False)
    assert torch.equal(run(slice(0, 2), True), both)
    if mode.get("do_sample"):
        return  # sampled rows draw from one generator: alone they draw other numbers
    for i in range(2):
        assert torch.equal(both[2 * i:2 * i + 2], run(slice(i, i + 1), False))


def test_conditioning_context_manager_for_forward_and_generate():
    model = patched()
    ids = torch.randint(3, 97, (2, 5))
    z = torch.randn(2, D)
    expected = model(ids, demographic_embeds=z).logits
    with cuma_model.conditioning(model, z):
        torch.testing.assert_close(model(ids).logits, expected)
        g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(g, model.generate(ids, attention_mask=torch.ones_like(ids), demographic_embeds=z,
                                         max_new_tokens=3, do_sample=False, pad_token_id=0))
    with pytest.raises(ValueError, match="missing conditioning"):
        model(ids)


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing):
        model = patched()
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(5))
        z = torch.randn(2, D, generator=torch.Generator().manual_seed(6))
        out = model(ids, demographic_embeds=z, labels=ids)
        out.loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("kwargs", [{"use_reentrant": True}, {}, {"use_reentrant": False}])
def test_checkpointing_keeps_the_load_balancing_gradient(kwargs):
    """Reentrant checkpointing runs the layer under no_grad: the routers' aux terms must still get their gradient
    (what PEFT's prepare_model_for_kbit_training passes, {}, included)."""
    def grads(checkpointing):
        model = patched(aux_loss_coef=5.0)  # large, so that the aux gradient dominates the routers' gradient
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            model.enable_input_require_grads()
        ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(5))
        z = torch.randn(2, D, generator=torch.Generator().manual_seed(6))
        out = model(ids, demographic_embeds=z, labels=ids)
        out.loss.backward()
        return out.aux_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    (aux, plain), (aux_ckpt, ckpt) = grads(False), grads(True)
    torch.testing.assert_close(aux_ckpt, aux)
    assert plain.keys() == ckpt.keys() and any("router" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_reentrant_checkpointing_also_replays_conditioning():
    model = patched()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    ids = torch.randint(3, 97, (2, 7))
    out = model(ids, demographic_embeds=torch.randn(2, D), labels=ids)
    out.loss.backward()  # the replay would raise "missing conditioning" if z were lost
    assert model.model.layers[0].self_attn.q_proj.cuma_B.grad.abs().sum() > 0


def test_two_patched_models_alive_at_once_even_nested():
    a, b = patched(seed=0), patched(seed=10)
    ids = torch.randint(3, 97, (2, 5))
    za, zb = torch.randn(2, D), torch.randn(2, D)
    ref_a, ref_b = a(ids, demographic_embeds=za).logits, b(ids, demographic_embeds=zb).logits
    inner = {}

    def run_a_inside_b(*args):  # model a runs in the middle of model b's forward
        inner["a"] = a(ids, demographic_embeds=za).logits

    hook = b.model.layers[0].register_forward_hook(run_a_inside_b)
    got_b = b(ids, demographic_embeds=zb).logits
    hook.remove()
    torch.testing.assert_close(got_b, ref_b)
    torch.testing.assert_close(inner["a"], ref_a)
    with cuma_model.conditioning(a, za):
        torch.testing.assert_close(b(ids, demographic_embeds=zb).logits, ref_b)


def test_no_state_is_left_on_modules_after_forward():
    model = patched()
    model.train()
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    out = model(torch.randint(3, 97, (2, 5)), demographic_embeds=torch.randn(2, D), labels=torch.randint(3, 97, (2, 5)))
    out.loss.backward()
    after = {name: set(vars(m)) for name, m in model.named_modules()}
    assert before == after
    from cuma_model import context as c
    assert c._STACKS.active == () and c._STACKS.pending == ()


def test_bad_conditioning_raises_clear_errors():
    model = patched()
    ids = torch.randint(3, 97, (4, 5))
    with pytest.raises(ValueError, match="batch 2 but the input has batch 4"):
        model(ids, demographic_embeds=torch.randn(2, D))  # no silent tiling
    with pytest.raises(ValueError, match=r"shape \[batch, 6\]"):
        model(ids, demographic_embeds=torch.randn(4, D + 1))
    with pytest.raises(ValueError, match="floating point"):
        model(ids, demographic_embeds=torch.ones(4, D, dtype=torch.long))
    with pytest.raises(ValueError, match="missing conditioning"):
        model(ids)


def test_aux_loss_is_in_outputs_and_in_the_loss():
    model = patched()
    model.train()
    ids = torch.randint(3, 97, (2, 6))
    z = torch.randn(2, D)
    out = model(ids, demographic_embeds=z, labels=ids)
    assert out.aux_loss.ndim == 0 and out.aux_loss > 0 and out["aux_loss"] is out.aux_loss
    plain = model(ids, demographic_embeds=z)
    ce = torch.nn.functional.cross_entropy(plain.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce + out.aux_loss, rtol=1e-5, atol=1e-6)
    # Two routers, each >= 1 at balance: the weighted loss is at least 0.01 * 2.
    assert out.aux_loss.item() >= 0.02 - 1e-6
    model.eval()
    assert model(ids, demographic_embeds=z).get("aux_loss") is None


def test_semantic_only_router_needs_no_z():
    model = tiny_decoder("llama")
    cuma_model.patch_model(model, demographic_dim=0, shared_A=True)
    ids = torch.randint(3, 97, (2, 5))
    assert model(ids).logits.shape == (2, 5, 97)


def test_record_routing_and_disabled_adapters():
    model = patched()
    base = tiny_decoder("llama")
    ids = torch.randint(3, 97, (2, 5))
    z = torch.randn(2, D)
    with cuma_model.record_routing(model) as trace:
        model(ids, demographic_embeds=z)
    assert [r.router_key for r in trace.records] == [r.key for r in cuma_model.routers(model)]
    assert trace.records[0].topk_idx.shape == (2, 5, 2) and trace.records[0].topk_idx.dtype == torch.int64
    with cuma_model.adapters_disabled(model):
        torch.testing.assert_close(model(ids, demographic_embeds=z).logits, base(ids).logits)


def test_deepcopy_gives_an_independent_model():
    import copy

    model = patched()
    clone = copy.deepcopy(model)
    assert clone.forward.model is clone and clone.cuma is not model.cuma
    layer = clone.model.layers[0].self_attn.q_proj
    assert layer.owner is clone.cuma and layer.cuma_router is clone.model.layers[0].self_attn.q_proj.cuma_router
    ids, z = torch.randint(3, 97, (2, 5)), torch.randn(2, D)
    torch.testing.assert_close(clone(ids, demographic_embeds=z).logits, model(ids, demographic_embeds=z).logits)
    with torch.no_grad():
        layer.cuma_B.zero_()
    assert not torch.allclose(clone(ids, demographic_embeds=z).logits, model(ids, demographic_embeds=z).logits)


def test_forward_scope_conditions_direct_backbone_calls():
    model = patched()
    model.train()
    ids, z = torch.randint(3, 97, (2, 5)), torch.randn(2, D)
    full = model(ids, demographic_embeds=z)
    with cuma_model.forward_scope(model, z) as state:
        hidden = model.model(ids).last_hidden_state  # the backbone, not the patched top-level forward
    torch.testing.assert_close(model.lm_head(hidden), full.logits)
    torch.testing.assert_close(state.aux_loss(), full.aux_loss)


def test_the_backbone_takes_z_directly():
    """Callers that run the decoder without the model's forward (TRL's fused LM head) pass z to the backbone."""
    model = patched()
    ids, z = torch.randint(3, 97, (2, 6)), torch.randn(2, D) * 3
    expected = model(ids, demographic_embeds=z).logits
    hidden = model.model(ids, demographic_embeds=z).last_hidden_state
    torch.testing.assert_close(model.lm_head(hidden), expected)
    with cuma_model.conditioning(model, z):
        torch.testing.assert_close(model.lm_head(model.model(ids).last_hidden_state), expected)
    with pytest.raises(ValueError, match="missing conditioning"):
        model.model(ids)
    model.train()
    with pytest.warns(UserWarning, match="without CuMACallback"):
        out = model.model(ids, demographic_embeds=z)
    assert out.aux_loss is not None and out.aux_loss > 0
    cuma_model.unpatch_model(model)
    assert "forward" not in model.model.__dict__


def router_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "router" in n and p.grad is not None}


def caller_loss(hidden):
    """A loss a caller might build from the hidden states (a fixed projection: the final norm makes a plain
    square mean nearly constant)."""
    probe = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(7))
    return (hidden.float() * probe).sum()


def test_a_direct_backbone_call_puts_the_aux_loss_into_the_callers_gradient():
    """Whatever loss the caller builds from the backbone's hidden states, its gradient carries aux / steps."""
    model = patched().train()
    model.cuma.accumulation_steps = 3  # what CuMACallback hands over from the trainer
    ids, z = torch.randint(3, 97, (2, 6)), torch.randn(2, D) * 3
    out = model.model(ids, demographic_embeds=z)
    hidden = out.last_hidden_state
    assert out.aux_loss > 0 and not out.aux_loss.requires_grad  # in the gradient already: adding it changes nothing
    caller_loss(hidden).backward()
    direct = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad()
    with cuma_model.forward_scope(model, z) as state:
        hidden_ = model.model(ids).last_hidden_state
    aux_part = state.aux_loss() / 3
    (caller_loss(hidden_) + aux_part).backward()
    assert set(direct) == {n for n, p in model.named_parameters() if p.requires_grad}
    for n, g in direct.items():
        torch.testing.assert_close(g, model.get_parameter(n).grad, rtol=1e-5, atol=1e-8, msg=n)
    torch.testing.assert_close(hidden, hidden_)  # the forward is untouched
    model.zero_grad()
    with cuma_model.forward_scope(model, z) as state:
        model.model(ids)
    (state.aux_loss() / 3).backward()
    assert all(g.abs().sum() > 0 for g in router_grads(model).values())  # the aux part is not negligible


def test_under_fp16_autocast_a_direct_backbone_call_leaves_the_aux_loss_out_and_says_so():
    grads = []
    for coef in (0.5, 0.0):
        model = patched(aux_loss_coef=coef).train()  # same seed: the same weights
        model.cuma.accumulation_steps = 1
        ids, z = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(0)), torch.ones(2, D)
        with torch.autocast("cpu", dtype=torch.float16), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hidden = model.model(ids, demographic_embeds=z).last_hidden_state
        assert any("fp16 loss scaling" in str(w.message) for w in caught) == (coef > 0)
        caller_loss(hidden).backward()
        grads.append(router_grads(model))
    assert grads[0] and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_generate_after_a_trainer_replaced_the_forward():
    """TRL's fused LM head puts its own forward (without demographic_embeds) over ours: generate still takes z."""
    from trl.trainer.utils import add_fused_lm_head

    model = patched()
    ids, z = torch.randint(3, 97, (2, 5)), torch.randn(2, D) * 3
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, num_beams=2, num_return_sequences=2,
              do_sample=False, pad_token_id=0)
    expected = model.generate(ids, demographic_embeds=z, **kw)
    add_fused_lm_head(model)
    assert torch.equal(model.generate(ids, demographic_embeds=z, **kw), expected)
    with cuma_model.conditioning(model, z):
        assert torch.equal(model.generate(ids, **kw), expected)
    with pytest.raises(ValueError, match=r"generate got 1 row\(s\) of demographic_embeds for 2 prompt row"):
        model.generate(ids, demographic_embeds=z[:1], **kw)


def test_text_generation_pipeline():
    from transformers import pipeline

    from tiny_models import word_tokenizer

    tok = word_tokenizer(["hello", "world", "yes", "no"])
    model = tiny_decoder("llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=4, demographic_dim=D)
    randomize_experts(model, std=0.5)
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    z = torch.randn(1, D) * 3
    kw = dict(max_new_tokens=4, do_sample=False, return_full_text=False)
    text = pipe("hello world", demographic_embeds=z, **kw)[0]["generated_text"]
    with cuma_model.conditioning(model, z):
        assert pipe("hello world", **kw)[0]["generated_text"] == text
        two = pipe("hello world", num_beams=2, num_return_sequences=2, **kw)
    assert len(two) == 2
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    direct = model.generate(ids, demographic_embeds=z, max_new_tokens=4, do_sample=False)
    assert tok.decode(direct[0, ids.shape[1]:], skip_special_tokens=True) == text


def test_threads_keep_their_conditioning_apart():
    import threading

    model = patched().eval()
    ids = torch.randint(3, 97, (2, 5))
    zs = [torch.randn(2, D) * 3 for _ in range(2)]
    with torch.no_grad():
        expected = [model(ids, demographic_embeds=z).logits for z in zs]
    both_inside, got = threading.Barrier(2), [None, None]

    def run(i):
        with cuma_model.conditioning(model, zs[i]), torch.no_grad():
            both_inside.wait()  # each thread's block is open while the other one runs
            got[i] = [model(ids).logits for _ in range(5)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert all(torch.equal(g, expected[i]) for g in got[i])
    assert not torch.equal(expected[0], expected[1])


def test_a_4d_mask_needs_aux_token_weights_to_leave_padding_out_of_the_aux_loss():
    model = patched()
    model.train()
    ids = torch.randint(3, 97, (2, 6))
    z = torch.randn(2, D)
    mask2d = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    real = mask2d.bool()
    visible = torch.ones(6, 6, dtype=torch.bool).tril() & real[:, None, :]
    visible |= torch.eye(6, dtype=torch.bool) & ~real[:, :, None]  # padding sees itself: no empty softmax row
    mask4d = visible[:, None]
    expected = model(ids, demographic_embeds=z, attention_mask=mask2d).aux_loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weighted = model(ids, demographic_embeds=z, attention_mask=mask4d, aux_token_weights=mask2d).aux_loss
    torch.testing.assert_close(weighted, expected)
    with pytest.warns(UserWarning, match="aux_token_weights"):
        unweighted = model(ids, demographic_embeds=z, attention_mask=mask4d).aux_loss
    assert not torch.allclose(unweighted, expected)  # the padding tokens were counted
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per model
        model(ids, demographic_embeds=z, attention_mask=mask4d)
    quiet = patched()
    quiet.eval()  # no load-balancing loss outside training: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet(ids, demographic_embeds=z, attention_mask=mask4d)


def _streamed(model, tok, generate_kwargs):
    """The streaming recipe: generate in a worker thread, the text read from a TextIteratorStreamer here. The
    streamer's timeout makes a stream that never ends fail the test instead of hanging it."""
    import threading

    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=60, skip_special_tokens=True)
    failure = []

    def run():
        try:
            with torch.no_grad():
                model.generate(**generate_kwargs, streamer=streamer)
        except Exception as err:  # noqa: BLE001 - handed to the test
            failure.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    text = "".join(streamer)
    thread.join(timeout=60)
    assert not thread.is_alive()
    return text, failure


def _streaming_setup():
    from tiny_models import word_tokenizer

    tok = word_tokenizer(["hello", "world", "yes", "no", "maybe"])
    model = tiny_decoder("llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=4, demographic_dim=D)
    randomize_experts(model, std=0.5)
    inputs = tok(["hello world"], return_tensors="pt")
    return model.eval(), tok, dict(inputs, max_new_tokens=6, do_sample=False)


@pytest.mark.parametrize("how", ["block", "kwargs"])
def test_streaming_from_a_worker_thread(how):
    """The standard recipe: generate in a worker thread with a TextIteratorStreamer, the conditioning block (or the
    keyword) around it."""
    model, tok, kw = _streaming_setup()
    z = torch.randn(1, D) * 3
    with torch.no_grad():
        direct = model.generate(**kw, demographic_embeds=z)
    expected = tok.decode(direct[0, kw["input_ids"].shape[1]:], skip_special_tokens=True)
    with cuma_model.conditioning(model, z, share_with_threads=how == "block"):  # around the worker, as in the recipe
        text, failure = _streamed(model, tok, kw if how == "block" else {**kw, "demographic_embeds": z})
    assert not failure and text == expected
    other, _ = _streamed(model, tok, {**kw, "demographic_embeds": -z})
    assert other != expected  # z reached the streamed generation


def test_blocks_open_in_several_threads_are_not_guessed_between():
    import threading

    model, tok, kw = _streaming_setup()
    opened, release = threading.Event(), threading.Event()

    def other_thread():
        with cuma_model.conditioning(model, torch.randn(1, D), share_with_threads=True):
            opened.set()
            release.wait(timeout=60)

    holder = threading.Thread(target=other_thread)
    holder.start()
    opened.wait(timeout=60)
    try:
        with cuma_model.conditioning(model, torch.randn(1, D), share_with_threads=True):
            text, failure = _streamed(model, tok, kw)  # a third thread, with no block of its own
    finally:
        release.set()
        holder.join(timeout=60)
    assert text == "" and "open in several threads" in str(failure[0])
    assert not cuma_model.context._OPEN_BLOCKS  # every block closed


def test_a_block_stays_in_its_thread_unless_shared():
    """A server thread that forgot its z is refused, never routed with the z another request's block holds."""
    model, tok, kw = _streaming_setup()
    with cuma_model.conditioning(model, torch.randn(1, D)):
        text, failure = _streamed(model, tok, kw)
    assert text == "" and "missing conditioning" in str(failure[0])


def test_a_failing_streamed_generate_ends_the_stream():
    """A generate that fails in the worker ends the stream, so the reader stops instead of waiting forever."""
    model, tok, kw = _streaming_setup()
    text, failure = _streamed(model, tok, kw)  # no conditioning anywhere
    assert text == ""
    assert len(failure) == 1 and "missing conditioning" in str(failure[0])
    _, failure = _streamed(model, tok, {**kw, "demographic_embeds": torch.randn(2, D)})  # fails in generate's check
    assert "1 prompt row(s)" in str(failure[0])

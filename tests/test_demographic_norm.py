"""z statistics at the routers' input (`demographic_norm`): what the routers compute, how the statistics are fitted,
and that they travel with the adapter through both save paths and resume."""
import json

import pytest
import torch

import cuma_model
from cuma_model.router import DemographicRouter, demographic_statistics
from tiny_models import randomize_experts, tiny_decoder

D = 6


def correlated_profiles(n=200, seed=0):
    """Profiles like a sentence encoder's: a large common part, a small variable part in a few directions."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(3, D, generator=g)
    return 2.0 + torch.randn(n, 3, generator=g) @ basis * 0.1 + 1e-4 * torch.randn(n, D, generator=g)


def test_statistics_centre_and_whiten_the_profiles():
    z = correlated_profiles()
    mean, whiten = demographic_statistics(z, whiten=True)
    torch.testing.assert_close(mean, z.mean(0))
    white = (z - mean) @ whiten.T
    eigenvalues = torch.linalg.eigvalsh(white.T @ white / (len(z) - 1))
    assert 0.5 < eigenvalues[-3:].min() and eigenvalues.max() < 2.0  # the three real directions: about unit variance
    assert eigenvalues[:-3].max() < 0.01  # the near-constant ones stay near constant
    raw = torch.linalg.eigvalsh(((z - mean).T @ (z - mean)) / (len(z) - 1))
    assert raw[-3:].max() / raw[-3:].min() > 1.5 * eigenvalues[-3:].max() / eigenvalues[-3:].min()  # evened out
    assert demographic_statistics(z, whiten=False)[1] is None
    with pytest.raises(ValueError, match="at least 2 rows"):
        demographic_statistics(z[:1], whiten=True)
    with pytest.raises(ValueError, match="NaN or inf"):
        demographic_statistics(torch.full((3, D), float("nan")), whiten=False)
    with pytest.raises(ValueError, match="all alike"):
        demographic_statistics(torch.ones(5, D), whiten=True)


def test_whitening_fitted_on_few_profiles_does_not_blow_up_new_ones():
    """Fewer training profiles than dimensions (the usual case: 384-d sentence embeddings): a new profile's whitened
    z stays on the scale of the training profiles'."""
    g = torch.Generator().manual_seed(1)

    def unit_profiles(n):
        v = torch.randn(n, 64, generator=g) * 0.3 + 1.0
        return v / v.norm(dim=1, keepdim=True)

    train, new = unit_profiles(20), unit_profiles(200)
    mean, whiten = demographic_statistics(train, whiten=True)
    norm = lambda rows: ((rows - mean) @ whiten.T).norm(dim=1).mean()  # noqa: E731
    assert norm(new) < 2.0 * norm(train)


def test_an_unfitted_router_refuses_to_route():
    router = DemographicRouter(8, D, 4, 2, hidden_dim=16, demographic_norm="center")
    with pytest.raises(ValueError, match="never fitted"):
        router.logits(torch.randn(2, 3, 8), torch.randn(2, D))


@pytest.mark.parametrize("norm", ["center", "whiten"])
def test_the_router_routes_on_the_transformed_z(norm):
    torch.manual_seed(0)
    plain = DemographicRouter(8, D, 4, 2, hidden_dim=16, demographic_scale=3.0)
    normed = DemographicRouter(8, D, 4, 2, hidden_dim=16, demographic_scale=3.0, demographic_norm=norm)
    normed.load_state_dict(plain.state_dict(), strict=False)
    z, x = correlated_profiles(5), torch.randn(5, 7, 8)
    mean, whiten = demographic_statistics(correlated_profiles(), whiten=norm == "whiten")
    normed.set_demographic_norm(mean, whiten)
    expected = (z - mean) @ whiten.T if whiten is not None else z - mean
    torch.testing.assert_close(normed.logits(x, z), plain.logits(x, expected))
    assert not torch.allclose(normed.logits(x, z), plain.logits(x, z))


def patched(norm="whiten", seed=0):
    model = tiny_decoder("llama", seed=seed)
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=4, demographic_dim=D, router_hidden_dim=8,
                           demographic_norm=norm)
    randomize_experts(model, std=0.5)
    return model


def test_the_statistics_are_saved_with_the_adapter_on_both_paths(tmp_path):
    from peft import PeftModel, get_peft_model

    model = cuma_model.fit_demographic_norm(patched(), correlated_profiles())
    ids, z = torch.randint(3, 97, (2, 5)), correlated_profiles(2, seed=3)
    model.eval()
    with torch.no_grad():
        expected = model(ids, demographic_embeds=z).logits
    cuma_model.save_pretrained(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["demographic_norm"] == "whiten"
    peft_model = get_peft_model(tiny_decoder("llama"), cuma_model.CuMAConfig(
        num_experts=4, top_k=2, r=4, demographic_dim=D, router_hidden_dim=8, demographic_norm="whiten"))
    cuma_model.checkpoint.load_adapter_tensors(peft_model.get_base_model(),
                                               cuma_model.checkpoint.read_adapter_weights(tmp_path / "a"), "a")
    peft_model.save_pretrained(tmp_path / "b")  # PEFT's own writer
    for loaded in (cuma_model.from_pretrained(tiny_decoder("llama"), tmp_path / "a"),
                   PeftModel.from_pretrained(tiny_decoder("llama"), tmp_path / "a"),
                   PeftModel.from_pretrained(tiny_decoder("llama"), tmp_path / "b")):
        loaded.eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids, demographic_embeds=z).logits, expected)
    trained = cuma_model.from_pretrained(tiny_decoder("llama"), tmp_path / "a", is_trainable=True)
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert trainable and not any("z_mean" in n or "z_whiten" in n for n in trainable)
    assert not any(b.requires_grad for n, b in trained.named_buffers() if "z_" in n)


def test_an_adapter_without_statistics_refuses_to_fit_and_a_version_2_file_reads_as_none(tmp_path):
    with pytest.raises(ValueError, match="demographic_norm 'none'"):
        cuma_model.fit_demographic_norm(patched("none"), correlated_profiles())
    with pytest.raises(ValueError, match="needs a z"):
        cuma_model.CuMAConfig(demographic_dim=0, demographic_norm="center")
    cuma_model.save_pretrained(patched("none"), tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    assert d["demographic_norm"] == "none"
    # a version 2 file was written before the option existed: it lacks the key and reads as "none"
    d = {k: v for k, v in d.items() if k not in ("demographic_norm", "demographic_projection_layers")}
    (tmp_path / "adapter_config.json").write_text(json.dumps(d | {"cuma_config_version": 2}))
    assert cuma_model.CuMAConfig.load(tmp_path).demographic_norm == "none"
    model = cuma_model.fit_demographic_norm(patched("center"), correlated_profiles())
    cuma_model.save_pretrained(model, tmp_path / "c")
    d = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert d["cuma_config_version"] == 5 and d["demographic_norm"] == "center"
    del d["demographic_norm"]
    (tmp_path / "c" / "adapter_config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"lacks the keys \['demographic_norm'\]"):
        cuma_model.CuMAConfig.load(tmp_path / "c")

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from sfcd.errors import ConfigError
from sfcd.models.loading import load_model
from sfcd.models.sites import hooks, parse_site, run_with_cache, site_dim, site_module, valid_sites


@pytest.fixture(scope="module")
def neox(test_run):
    return load_model(test_run.run_dir)


def test_sites_match_the_modules(neox):
    x = torch.tensor([[0, 5, 6, 7]])
    names = valid_sites(neox)
    cache = run_with_cache(neox, x, [parse_site(n, neox) for n in names], stop_early=False)
    out = neox(x, output_hidden_states=True)
    torch.testing.assert_close(cache["resid.0"], out.hidden_states[1].detach())  # the last one is after ln_f
    torch.testing.assert_close(cache["embed"], out.hidden_states[0].detach())
    # parallel residual: block output = input + attn + mlp
    torch.testing.assert_close(
        cache["resid.1"], cache["resid.0"] + cache["attn.1"] + cache["mlp.1"], atol=1e-5, rtol=1e-5
    )
    assert cache["mlp_act.0"].shape[-1] == site_dim(neox, parse_site("mlp_act.0")) == neox.config.intermediate_size


def test_forward_stops_after_the_last_needed_site(neox):
    calls = []
    handle = site_module(neox, parse_site("resid.1")).register_forward_hook(lambda *a: calls.append(1))
    try:
        run_with_cache(neox, torch.tensor([[0, 5, 6]]), [parse_site("attn.0"), parse_site("resid.0")])
        assert calls == []  # layer 1 never ran
        run_with_cache(neox, torch.tensor([[0, 5, 6]]), [parse_site("mlp.1")])
        assert calls == []  # stopped inside layer 1, before its output
    finally:
        handle.remove()


def test_unknown_site_lists_the_valid_ones(neox):
    with pytest.raises(ConfigError, match=r"unknown site 'resid\.7'.*resid\.1"):
        parse_site("resid.7", neox)
    with pytest.raises(ConfigError, match="unknown site 'blocks.0.hook_resid_post'"):
        parse_site("blocks.0.hook_resid_post", neox)


def test_replacing_a_site_changes_the_output(neox):
    x = torch.tensor([[0, 5, 6, 7]])
    with torch.no_grad():
        clean = neox(x).logits
        with hooks(neox, {parse_site("mlp.0"): lambda a: a}):
            same = neox(x).logits
        with hooks(neox, {parse_site("mlp.0"): torch.zeros_like}):
            ablated = neox(x).logits
    torch.testing.assert_close(clean, same)
    assert not torch.allclose(clean, ablated)


def test_gpt2_sites():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=30, bos_token_id=0, eos_token_id=0))
    model.eval()
    x = torch.tensor([[1, 2, 3]])
    cache = run_with_cache(model, x, [parse_site(n, model) for n in valid_sites(model)], stop_early=False)
    out = model(x, output_hidden_states=True)
    torch.testing.assert_close(cache["resid.0"], out.hidden_states[1].detach())
    assert cache["mlp_act.1"].shape[-1] == 64

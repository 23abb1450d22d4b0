import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from sfcd.errors import ConfigError
from sfcd.models.loading import load_model
from sfcd.models.sites import hooks, parse_site, run_with_cache, site_dim, site_module, valid_sites


@pytest.fixture(scope="module")
def neox(test_run):
    return load_model(test_run.run_dir)


def _block_io(model, blocks, x):
    """Each block's input and output, from plain forward hooks on the blocks (no sfcd code)."""
    seen = []
    handles = [
        b.register_forward_hook(lambda m, a, out: seen.append((a[0], out[0] if isinstance(out, tuple) else out)))
        for b in blocks
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_sites_match_the_modules(neox):
    """Each site against the model's own computation: the MLP output and its hidden activation computed here by
    calling the layer's submodules on the block's input, the attention output as what the parallel residual leaves
    (block out - block in - MLP out). Bugs caught: attn and mlp mapped to each other's module (the sum
    resid = resid_prev + attn + mlp alone cannot see it), a site read from another layer, mlp_act before the
    nonlinearity."""
    x = torch.tensor([[0, 5, 6, 7]])
    names = valid_sites(neox)
    cache = run_with_cache(neox, x, [parse_site(n, neox) for n in names], stop_early=False)
    out = neox(x, output_hidden_states=True)
    torch.testing.assert_close(cache["resid.0"], out.hidden_states[1].detach())  # the last one is after ln_f
    torch.testing.assert_close(cache["embed"], out.hidden_states[0].detach())
    layers = neox.gpt_neox.layers
    for layer, (h_in, h_out) in enumerate(_block_io(neox, layers, x)):
        blk = layers[layer]
        with torch.no_grad():
            act = blk.mlp.act(blk.mlp.dense_h_to_4h(blk.post_attention_layernorm(h_in)))  # parallel: MLP reads h_in
            mlp = blk.mlp.dense_4h_to_h(act)
        torch.testing.assert_close(cache[f"resid.{layer}"], h_out)
        torch.testing.assert_close(cache[f"mlp_act.{layer}"], act)
        torch.testing.assert_close(cache[f"mlp.{layer}"], mlp)
        torch.testing.assert_close(cache[f"attn.{layer}"], h_out - h_in - mlp, atol=1e-5, rtol=1e-5)
        assert (cache[f"attn.{layer}"] - mlp).abs().max() > 1e-2  # the two differ: a swap would show
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


def test_replacing_a_site_replaces_that_modules_output(neox):
    """A replacement at mlp.0 (the output doubled) equals the same replacement made by a plain forward hook on
    layer 0's MLP; one returning None leaves the logits alone. Bugs caught: the replacement applied at another
    module, to the module's input, or not returned into the forward pass."""
    x = torch.tensor([[0, 5, 6, 7]])
    handle = neox.gpt_neox.layers[0].mlp.register_forward_hook(lambda m, a, out: 2 * out)
    try:
        with torch.no_grad():
            want = neox(x).logits
    finally:
        handle.remove()
    with torch.no_grad():
        clean = neox(x).logits
        with hooks(neox, {parse_site("mlp.0"): lambda a: None}):
            same = neox(x).logits
        with hooks(neox, {parse_site("mlp.0"): lambda a: 2 * a}):
            doubled = neox(x).logits
    torch.testing.assert_close(clean, same)
    torch.testing.assert_close(doubled, want)
    assert (doubled - clean).abs().max() > 1e-3


def test_gpt2_sites():
    """GPT-2's sequential blocks: resid.0 is the block's output, mlp.0 the MLP computed here on the stream after
    attention (block input + attn.0), and the block's output their sum. Bugs caught: GPT-2's attn and mlp mapped
    to each other's module, mlp_act before the nonlinearity."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=30, bos_token_id=0, eos_token_id=0))
    model.eval()
    x = torch.tensor([[1, 2, 3]])
    cache = run_with_cache(model, x, [parse_site(n, model) for n in valid_sites(model)], stop_early=False)
    out = model(x, output_hidden_states=True)
    torch.testing.assert_close(cache["resid.0"], out.hidden_states[1].detach())
    torch.testing.assert_close(cache["embed"], out.hidden_states[0].detach())
    blocks = model.transformer.h
    for layer, (h_in, h_out) in enumerate(_block_io(model, blocks, x)):
        blk = blocks[layer]
        mid = h_in + cache[f"attn.{layer}"]  # the stream after attention
        with torch.no_grad():
            act = blk.mlp.act(blk.mlp.c_fc(blk.ln_2(mid)))
            mlp = blk.mlp.c_proj(act)
        torch.testing.assert_close(cache[f"mlp_act.{layer}"], act)
        torch.testing.assert_close(cache[f"mlp.{layer}"], mlp)
        torch.testing.assert_close(cache[f"resid.{layer}"], h_out)
        torch.testing.assert_close(h_out, mid + mlp, atol=1e-5, rtol=1e-5)
    assert cache["mlp_act.1"].shape[-1] == 64

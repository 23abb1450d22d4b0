"""Activation signatures and matching by them, against numpy/scipy computed here on dense activations, and the
case that motivates them: a checkpoint whose basis moved (the same features, rotated) is one checkpoint to
activation matching and a new dictionary to decoder matching."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from sfcd.development.matching import match_features, presence, unit_rows
from sfcd.development.saes import LiveFeatures, match_sets
from sfcd.development.signatures import Signatures, correlation, read_signatures


def _acts(n: int, f: int, seed: int, density: float = 0.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, f, generator=g) * (torch.rand(n, f, generator=g) < density)
    x[:, 0] = 0  # a feature that never fires
    x[:, 1] = 0
    x[:5, 1] = 1.0  # and one that fires on the first positions only
    return x


def test_correlation_is_numpys_pearson_block_by_block():
    # catches: the centring dropped (raw cosine of activations), a block's rows offset, the norm of the
    # uncentred vector, a never-firing feature given NaN or a nonzero correlation
    a = _acts(700, 37, 0)
    b = torch.cat([a[:, 10:20] * 3 + 0.05 * _acts(700, 10, 1, 0.5), _acts(700, 15, 2)], 1)
    sa, sb = Signatures.from_dense(a), Signatures.from_dense(b)
    got = torch.cat([correlation(sa, sb, lo, lo + 8) for lo in range(0, len(sa), 8)])  # blocks of 8 rows
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.nan_to_num(np.corrcoef(a.double().T.numpy(), b.double().T.numpy())[:37, 37:])
    assert got.shape == (37, 25)
    np.testing.assert_allclose(got.numpy(), ref, atol=2e-5)
    assert (got[0] == 0).all()  # never fired: correlates 0
    assert int(sa.fires[1]) == 5 and int(sa.fires[0]) == 0


def test_a_feature_firing_everywhere_at_a_near_constant_value_correlates_exactly():
    # catches: the covariance as dot(a, b) - n mean_a mean_b in float32, which cancels for such a feature (its
    # self-correlation came out at -3.8 over 2^18 tokens)
    g = torch.Generator().manual_seed(11)
    n = 2**16
    base = torch.randn(n, generator=g, dtype=torch.float64)
    a = torch.stack([10 + 0.01 * base, torch.rand(n, generator=g, dtype=torch.float64) * (base > 1)], 1)
    b = torch.stack([10 + 0.01 * (base + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)), a[:, 1]], 1)
    got = correlation(Signatures.from_dense(a.float()), Signatures.from_dense(b.float()), 0, 2)
    ref = np.corrcoef(a.float().double().T.numpy(), b.float().double().T.numpy())[:2, 2:]
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-4)


def test_select_keeps_the_chosen_rows_in_order():
    # catches: a selected row's nonzeros read from the next row (an off-by-one in the row starts)
    a = _acts(300, 20, 3)
    s = Signatures.from_dense(a).select(np.array([7, 2, 19, 0]))
    assert torch.equal(s.dense_rows(0, 4), a[:, [7, 2, 19, 0]].T)
    assert s.fires.tolist() == [int((a[:, j] > 0).sum()) for j in (7, 2, 19, 0)]


def test_presence_and_matching_by_signatures_against_scipy():
    # catches: presence reading only candidate pairs, counts per row mixed with counts per column, the exact
    # (dense) assignment replaced by a truncated candidate list
    a = _acts(500, 30, 4)
    b = torch.cat([a[:, torch.randperm(30, generator=torch.Generator().manual_seed(5))[:20]], _acts(500, 12, 6)], 1)
    b = b + 0.3 * _acts(500, 32, 7, 0.3)
    sa, sb = Signatures.from_dense(a), Signatures.from_dense(b)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.nan_to_num(np.corrcoef(a.double().T.numpy(), b.double().T.numpy())[:30, 30:])
    p = presence(sa, sb, 0.5, tile=600)  # tiles of 600 floats: one row of A per block
    np.testing.assert_allclose(p.best_a, c.max(1), atol=2e-5)
    np.testing.assert_allclose(p.best_b, c.max(0), atol=2e-5)
    assert p.count_a.tolist() == (c >= 0.5).sum(1).tolist() and p.count_b.tolist() == (c >= 0.5).sum(0).tolist()
    r, col = linear_sum_assignment(-np.clip(c, 0, None))
    ref = dict(zip(r.tolist(), col.tolist(), strict=True))
    # a small pair set is matched exactly, whatever the candidate count; forced onto the large sets' path (8
    # candidates, sparse bipartite matching), the same here, where no pair >= 0.7 is outside a top 8
    for k, dense in ((8, 4_000_000), (1, 4_000_000), (8, 0)):
        m = match_features(sa, sb, candidates=k, dense_pairs=dense)
        assert np.clip(m.sim, 0, None).sum() == pytest.approx(np.clip(c, 0, None)[r, col].sum(), abs=1e-4)
        assert {i: int(j) for i, j in enumerate(m.match) if m.sim[i] >= 0.7} == {
            i: j for i, j in ref.items() if c[i, j] >= 0.7
        }


def test_a_rotated_basis_is_the_same_dictionary_to_activation_matching_only():
    """A checkpoint whose residual basis turned (an orthogonal R) with the same features: its SAE is the first one
    with W_enc and W_dec turned by R, reading activations turned by R. It fires exactly as the first on the same
    tokens, so activation matching carries every feature; decoder cosine sees rows near orthogonal to the old
    ones and calls them all new. Catches: signatures read on another sample than each other's, or matching by
    decoders when signatures are given."""
    from sfcd.sae.topk import TopKSAE

    g = torch.Generator().manual_seed(8)
    d, f = 24, 48
    sae = TopKSAE(d, f, k=4)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        sae.b_dec.zero_()
    R = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    turned = TopKSAE(d, f, k=4)
    turned.load_state_dict(sae.state_dict())
    with torch.no_grad():
        turned.W_enc.copy_(R.T @ sae.W_enc)  # turned.encode(x @ R.T ... ) : x R -> (x R)(R^T W) = x W
        turned.W_dec.copy_(sae.W_dec @ R)
    x = torch.randn(4000, d, generator=g)
    with torch.no_grad():
        fa, fb = sae.encode(x), turned.encode(x @ R)
    assert torch.allclose(fa, fb, atol=1e-4)
    sa, sb = Signatures.from_dense(fa), Signatures.from_dense(fb)
    live = np.nonzero(sa.fires.numpy() >= 5)[0]
    by_acts = match_sets(LiveFeatures(live, sa.select(live), f), LiveFeatures(live, sb.select(live), f))
    assert (by_acts.sim[live] >= 0.99).all() and (by_acts.match[live] == live).all()
    rows = [unit_rows(w.detach()[live]) for w in (sae.W_dec, turned.W_dec)]
    by_dec = match_sets(LiveFeatures(live, rows[0], f), LiveFeatures(live, rows[1], f))
    assert (by_dec.sim[live] >= 0.7).mean() < 0.1


def test_read_signatures_streams_what_the_encoders_give_on_the_same_positions():
    # catches: positions numbered per batch or per chunk of rows, special tokens kept, one encoder's
    # triplets filed under another's name
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from sfcd.models.sites import parse_site, run_with_cache

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = GPTNeoXForCausalLM(cfg).eval()
    windows = np.random.default_rng(0).integers(0, 50, size=(10, 12))
    site = parse_site("resid.0", model)
    with torch.no_grad():
        a = run_with_cache(model, torch.from_numpy(windows), [site])[site.name].flatten(0, 1)
    keep = ~np.isin(windows.flatten(), [0, 1])
    W = torch.randn(a.shape[1], 16, generator=torch.Generator().manual_seed(1))

    def enc(scale):
        return lambda x: torch.relu(x @ W * scale - 0.1 * scale)

    # batches of 3 windows (36 positions) encoded 7 rows at a time: positions must run on across both
    got = read_signatures(model, "resid.0", {"one": enc(1.0), "two": enc(2.0)}, windows, (0, 1), batch=3, rows=7)
    for name, scale in (("one", 1.0), ("two", 2.0)):
        ref = enc(scale)(a[torch.from_numpy(keep)])
        assert got[name].n_tokens == int(keep.sum()) and got[name].csr._nnz() > 0.05 * ref.numel()
        assert torch.allclose(got[name].dense_rows(0, 16).float(), ref.T, atol=1e-6), name


def test_matching_with_no_features_on_either_side():
    # catches: an empty candidate list concatenated (a ValueError) when a site has no live features at two steps
    empty = Signatures.from_dense(torch.zeros(30, 0))
    some = Signatures.from_dense(_acts(30, 4, 12, 0.5))
    for a, b in ((empty, empty), (empty, some), (some, empty)):
        m = match_features(a, b)
        assert len(m.match) == len(a) and (m.match == -1).all()
        p = presence(a, b, 0.7)
        assert len(p.best_a) == len(a) and len(p.best_b) == len(b)


@pytest.mark.parametrize("how", ["decoders", "signatures"])
def test_matching_refuses_two_kinds_or_two_widths(how):
    from sfcd.errors import InputError

    a = torch.randn(5, 8)
    b = torch.randn(5, 9) if how == "decoders" else Signatures.from_dense(torch.rand(20, 5))
    with pytest.raises(InputError):
        match_features(a, b)


def test_too_few_held_out_tokens_is_a_clear_error_naming_the_way_out(tmp_path):
    # catches: an empty sample passed on (every feature then "unmatched": all born, all dead) or a KeyError
    from sfcd.config import compose
    from sfcd.data.tokens import write_tokens
    from sfcd.development.analysis import site_signatures
    from sfcd.errors import ConfigError
    from sfcd.paths import RunDir

    run = RunDir(tmp_path)
    run.tokens("val").parent.mkdir(parents=True)
    write_tokens(run.tokens("val"), [[1, 2, 3]], 50, 3)  # fewer than one window
    cfg = compose(["experiment=test", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="study.match=decoders"):
        site_signatures(cfg, run, [8], "resid.0", {})

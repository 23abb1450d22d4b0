import numpy as np
import pytest
import torch

from sfcd.models.loading import load_model
from sfcd.models.sites import parse_site
from sfcd.sae.evaluate import density_metrics, reconstruction_metrics, spliced_losses
from sfcd.sae.relu import ReLUSAE


def val_windows(test_run) -> np.ndarray:
    from sfcd.activations.harvest import token_windows
    from sfcd.data.tokens import read_tokens
    from sfcd.paths import RunDir

    return token_windows(read_tokens(RunDir(test_run.run_dir).tokens("val")), 32, 8)


def perfect_sae(d: int) -> ReLUSAE:
    """x = relu(x) - relu(-x): a ReLU SAE with d_sae = 2d that reconstructs exactly."""
    sae = ReLUSAE(d, 2 * d, l1_coeff=0.0)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_perfect_reconstruction_scores_one(test_run):
    model = load_model(test_run.run_dir)
    site = parse_site("resid.0", model)
    sae = perfect_sae(32)
    rng = np.random.default_rng(0)
    windows = val_windows(test_run)
    m = spliced_losses(model, site, sae, windows)
    assert abs(m["ce_sae"] - m["ce_clean"]) < 1e-4 and m["kl_sae"] < 1e-6
    assert abs(m["ce_loss_score"] - 1) < 1e-3 and abs(m["kl_score"] - 1) < 1e-3
    assert m["ce_zero"] > m["ce_clean"]
    acts = rng.normal(size=(500, 32)).astype(np.float32)
    r, fired = reconstruction_metrics(sae, acts)
    assert abs(r["fve"] - 1) < 1e-6 and abs(r["cosine"] - 1) < 1e-6 and abs(r["l2_ratio"] - 1) < 1e-6
    assert abs(r["l0"] - 32) < 1e-6  # each dimension fires one of its two features
    d, density = density_metrics(fired, 500)
    assert d["dead_fraction"] == 0 and torch.allclose(density.sum(), torch.tensor(32.0, dtype=torch.float64))


def test_a_shrinking_sae_scores_what_plain_hooks_compute(test_run):
    """A planted SAE whose reconstruction is 0.3 x exactly (the perfect one, decoder shrunk): its spliced losses,
    KL, CE loss score and KL score, and its FVE, against the same splice done here with a plain forward hook on
    layer 0 (the output times 0.3, or zeros), cross-entropy and KL written out. Bugs caught: the CE loss score's
    terms swapped or its denominator wrong, KL taken the other way round (spliced || clean) or per sequence,
    losses averaged per batch, an FVE over the uncentred variance."""
    import torch.nn.functional as F

    model = load_model(test_run.run_dir)
    sae = perfect_sae(32)
    with torch.no_grad():
        sae.W_dec.mul_(0.3)  # shrinks the reconstruction
    windows = val_windows(test_run)
    m = spliced_losses(model, parse_site("resid.0", model), sae, windows, batch=3)  # batches of 3, 3 and 2

    x = torch.from_numpy(windows).long()
    block = model.gpt_neox.layers[0]

    def logits_with(fn):
        def hook(module, args, out):
            return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)

        handle = block.register_forward_hook(hook)
        try:
            with torch.no_grad():
                return model(x).logits[:, :-1].flatten(0, 1)
        finally:
            handle.remove()

    clean, shrunk, zero = (logits_with(fn) for fn in (lambda h: h, lambda h: 0.3 * h, torch.zeros_like))
    targets = x[:, 1:].flatten()
    ce = {k: F.cross_entropy(v, targets).item() for k, v in (("clean", clean), ("sae", shrunk), ("zero", zero))}
    p = F.log_softmax(clean, -1)
    kl = {k: (p.exp() * (p - F.log_softmax(v, -1))).sum(-1).mean().item() for k, v in (("sae", shrunk), ("zero", zero))}
    for k in ("clean", "sae", "zero"):
        assert m[f"ce_{k}"] == pytest.approx(ce[k], abs=1e-5), k
    for k in ("sae", "zero"):
        assert m[f"kl_{k}"] == pytest.approx(kl[k], rel=1e-4, abs=1e-7), k
    score = (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"])
    assert m["ce_loss_score"] == pytest.approx(score, abs=1e-4) and 0.05 < score < 0.95  # not 0 or 1: has teeth
    assert m["kl_score"] == pytest.approx((kl["zero"] - kl["sae"]) / kl["zero"], abs=1e-4)
    acts = np.random.default_rng(0).normal(loc=0.5, size=(200, 32)).astype(np.float32)  # mean far from 0
    r, _ = reconstruction_metrics(sae, acts)
    a = torch.from_numpy(acts).double()
    fve = 1 - (0.7 * a).pow(2).sum() / (a - a.mean(0)).pow(2).sum()
    assert abs(r["l2_ratio"] - 0.3) < 1e-5 and abs(r["cosine"] - 1) < 1e-5
    assert r["fve"] == pytest.approx(float(fve), abs=1e-5) and r["fve"] < 0.6


def test_excluded_positions_keep_their_activations(test_run):
    # catches: the SAE (or the zero ablation) spliced in at BOS/EOS positions that training left out
    import torch.nn.functional as F

    from sfcd.models.sites import hooks

    model = load_model(test_run.run_dir)
    site = parse_site("resid.0", model)
    sae = perfect_sae(32)
    with torch.no_grad():
        sae.W_dec.mul_(0.3)
    windows = val_windows(test_run)
    m = spliced_losses(model, site, sae, windows, exclude_ids=set(np.unique(windows).tolist()))
    assert m["ce_sae"] == m["ce_clean"] and m["ce_zero"] == m["ce_clean"]  # nothing replaced anywhere
    eos = 0
    x = torch.from_numpy(windows)
    assert (x == eos).any()
    with torch.no_grad(), hooks(model, {site: lambda a: torch.where((x != eos)[..., None], sae(a), a)}):
        logits = model(x).logits[:, :-1].flatten(0, 1)
    expect = F.cross_entropy(logits, x[:, 1:].flatten()).item()
    got = spliced_losses(model, site, sae, windows, exclude_ids={eos})
    everywhere = spliced_losses(model, site, sae, windows)
    assert abs(got["ce_sae"] - expect) < 1e-5 and abs(everywhere["ce_sae"] - expect) > 1e-4


def test_density_fractions_only_where_the_tokens_resolve_them():
    # catches: below_1e-5 reported from 32k tokens, where it can only repeat the dead fraction
    fired = torch.tensor([0, 1, 3, 100])
    d, _ = density_metrics(fired, 32_768)
    assert d["below_1e-5"] is None and d["below_1e-6"] is None and d["dead_fraction"] == 0.25
    d, _ = density_metrics(fired, 2_000_000)  # resolves 5e-7: 1 and 3 firings are densities 5e-7 and 1.5e-6
    assert d["below_1e-5"] == 0.75 and d["below_1e-6"] == 0.5

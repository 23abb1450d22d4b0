"""Each latent's whole lifecycle (onset, offset, transients, gaps), Bayazit et al.'s RelDec bins, both of Minder et
al.'s Latent Scaling ratios with support counts and bootstrap intervals, the planted series at K = 8, and the
crosscoder null (one checkpoint against itself, and against a near copy)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from sfcd.crosscoders.model import BatchTopKCrosscoder, L1Crosscoder
from sfcd.crosscoders.reading import Accumulator, decoder_stats, lifecycle_counts, summary
from sfcd.crosscoders.synthetic import LIFECYCLE_KINDS, plant_series, recovery
from tests.crosscoders.quick import fit


def _with_norms(norms: list[list[float]], d: int = 5) -> BatchTopKCrosscoder:
    n, K = len(norms), len(norms[0])
    cc = BatchTopKCrosscoder(K * d, n, n_blocks=K, k=1)
    w = torch.randn(n, K, d, generator=torch.Generator().manual_seed(0))
    w = w / w.norm(dim=2, keepdim=True) * torch.tensor(norms)[..., None]
    with torch.no_grad():
        cc.W_dec.copy_(w.reshape(n, K * d))
    return cc


def test_lifecycle_and_reldec_bins_on_hand_set_norms():
    """The planted answer is written beside each pattern. Bugs caught: a transient (absent at the first and the
    last checkpoint) left without an onset or counted as persisting, gaps not counted, offset off by one, the bins
    on the wrong side of 0.3 or 0.7 (absent < 0.3 <= shared <= 0.7 < dominant)."""
    patterns = {  # norms over K = 6 -> (onset, offset, transient, gaps, emerged)
        0: ([1, 1, 1, 1, 1, 1], (0, -1, False, 0, 0)),
        1: ([0.01, 0.02, 1, 0.9, 1, 1], (2, -1, False, 0, 2)),
        2: ([1, 0.8, 0.05, 0.01, 0.0, 0.0], (0, 2, False, 0, -1)),
        3: ([0.0, 0.1, 1, 0.8, 0.1, 0.0], (2, 4, True, 0, -1)),  # transient
        4: ([1, 0.01, 0.02, 1, 1, 1], (0, -1, False, 2, 3)),  # a gap of two
        5: ([0.0, 1, 0.1, 1, 0.2, 0.0], (1, 4, True, 1, -1)),  # transient with a gap
    }
    cc = _with_norms([p for p, _ in patterns.values()])
    st = decoder_stats(cc, presence=0.3)
    for i, (norms, (onset, offset, transient, gaps, emerged)) in patterns.items():
        got = (int(st["onset"][i]), int(st["offset"][i]), bool(st["transient"][i]), int(st["gaps"][i]))
        assert got == (onset, offset, transient, gaps), (i, norms, got)
        assert int(st["emerged"][i]) == emerged and int(st["died"][i]) == offset
    life = lifecycle_counts(st, torch.ones(6, dtype=torch.bool), 6)
    assert life["onset"].tolist() == [3, 1, 2, 0, 0, 0]  # the transients (rows 3, 5) are counted at their onset
    assert life["transient_onset"].tolist() == [0, 1, 1, 0, 0, 0]
    assert life["offset"].tolist() == [0, 0, 1, 0, 2, 0]
    # RelDec bins: pairs of checkpoints with known ratios
    bins = decoder_stats(_with_norms([[1, 3], [0.31, 0.69], [1, 1], [0.29, 0.71], [0.0, 1.0]]))["reldec_bin"]
    assert bins.tolist() == [[0, 2], [1, 1], [1, 1], [0, 2], [0, 2]]  # 0.25/0.75, 0.31/0.69, 0.5, 0.29/0.71, 0/1
    pair = decoder_stats(_with_norms([[1, 3, 3, 0.5]]))["pair_bin"]
    assert pair.tolist() == [[2, 1, 0]]  # 0.75 (second dominant), 0.5 (shared), 0.14 (first dominant)


def test_latent_scaling_both_ratios_support_and_intervals_against_numpy():
    """Planted (orthonormal concepts): latent 0's concept is in both checkpoints' data but its decoder is ~0 at
    checkpoint 0 (complete shrinkage: nu_eps 1 there); latent 1's concept is absent at 0, where a second latent
    reading it writes it anyway (so the reconstruction holds it: nu_r high, and the error opposes it). Both betas
    are checked against least squares in numpy, the support against the firing count, the intervals against a
    bootstrap written out in numpy over the same blocks and draws.
    Bugs caught: the own term added to the reconstruction instead of removed (beta_r), a ratio to the wrong
    checkpoint, support counted over batches, blocks not resampled together."""
    K, d, n = 2, 8, 6000
    rng = np.random.default_rng(0)
    # two orthonormal concepts, basis vectors: exactly orthogonal in float32, so a token without a concept gives its
    # latent exactly 0 (a generic orthonormal pair gives +-1e-8 there, counted as firing or not by rounding)
    u = np.eye(d)[rng.choice(d, 2, replace=False)]
    c = rng.uniform(0.5, 2, (n, 2)) * (rng.random((n, 2)) < 0.3)
    a0 = c[:, :1] * u[0]  # checkpoint 0: concept 0 only
    a1 = c[:, :1] * u[0] + c[:, 1:] * u[1]
    x = torch.tensor(np.concatenate([a0, a1], 1), dtype=torch.float32)
    cc = L1Crosscoder(K * d, 3, n_blocks=K)
    U = torch.tensor(u, dtype=torch.float32)
    with torch.no_grad():
        for p in (cc.W_enc, cc.b_enc, cc.b_dec, cc.W_dec):
            p.zero_()
        cc.W_enc[d:, 0], cc.W_enc[d:, 1], cc.W_enc[d:, 2] = U[0], U[1], 0.5 * U[1]
        cc.W_dec[0, :d], cc.W_dec[0, d:] = 0.01 * U[0], U[0]  # shrunk at checkpoint 0
        cc.W_dec[1, d:] = U[1]
        cc.W_dec[2, :d], cc.W_dec[2, d:] = U[1], 0.2 * U[1]  # writes latent 1's direction at checkpoint 0
    acc = Accumulator(cc, blocks=5)
    for xb in x.split(500):  # 12 batches, round-robin over 5 blocks
        acc.add(xb)
    out = acc.latent_scaling(resamples=64, seed=3)
    f = np.maximum(x.numpy() @ cc.W_enc.detach().numpy(), 0)
    W = cc.W_dec.detach().numpy().reshape(3, K, d)
    recon = (f @ cc.W_dec.detach().numpy()).reshape(n, K, d)
    xs = x.numpy().reshape(n, K, d)
    block = (np.arange(n) // 500) % 5
    nums = np.zeros((2, 5, 3, K))
    dens = np.zeros((5, 3))
    for i in range(3):
        di = W[i, np.argmax(np.linalg.norm(W[i], axis=1))]
        design = f[:, i : i + 1] * di
        for m in range(K):
            own = f[:, i : i + 1] * W[i, m]
            for r, target in enumerate((xs[:, m] - recon[:, m] + own, recon[:, m] - own)):
                for b in range(5):
                    nums[r, b, i, m] = (design[block == b] * target[block == b]).sum()
            dens[:, i] = [(design[block == b] ** 2).sum() for b in range(5)]
    betas = nums.sum(1) / dens.sum(0)[None, :, None]
    assert np.allclose(out["beta"].numpy(), betas[0], rtol=1e-3, atol=1e-4)
    assert np.allclose(out["beta_r"].numpy(), betas[1], rtol=1e-3, atol=1e-4)
    strongest = np.array([1, 1, 0])
    for r, key in enumerate(("nu_eps", "nu_r")):
        ref = betas[r][np.arange(3), strongest][:, None]
        want = np.where(np.abs(ref) >= 1e-6, betas[r] / np.where(ref == 0, 1, ref), np.nan)
        assert np.allclose(out[key].numpy(), want, rtol=1e-3, atol=1e-4, equal_nan=True), key
    # by hand: nu_eps = 1 for latent 0 at checkpoint 0 (shrinkage: its concept is there), -0.5 / 0.9 for latent 1
    # (absent: checkpoint 0's error along it is latent 2's wrong write); nu_r = 0.5 / 0.1 for latent 1 at 0
    assert out["nu_eps"][0, 0] == pytest.approx(1.0, abs=1e-4)
    assert out["nu_eps"][1, 0] == pytest.approx(-0.5 / 0.9, abs=1e-4)
    assert out["nu_r"][1, 0] == pytest.approx(5.0, abs=1e-3)
    assert out["support"].tolist() == (f > 0).sum(0).tolist()
    # the intervals: the same draws, in numpy
    draws = torch.randint(5, (64, 5), generator=torch.Generator().manual_seed(3)).numpy()
    counts = np.stack([np.bincount(row, minlength=5) for row in draws])
    for r, key in enumerate(("nu_eps", "nu_r")):
        bb = np.einsum("rb,bim->rim", counts, nums[r]) / (counts @ dens)[..., None]
        ref = bb[:, np.arange(3), strongest][..., None]
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: no ratio there, as in sfcd
            nu = np.where(np.abs(ref) >= 1e-6, bb / ref, np.nan)
            lo, hi = np.nanquantile(nu, [0.025, 0.975], axis=0)
        assert np.allclose(out[f"{key}_lo"].numpy(), lo, rtol=1e-3, atol=1e-4, equal_nan=True), key
        assert np.allclose(out[f"{key}_hi"].numpy(), hi, rtol=1e-3, atol=1e-4, equal_nan=True), key
    s = summary(decoder_stats(cc), out["beta"], torch.ones(3, dtype=torch.bool), [10, 20], 0.5, out)
    assert s["latent_scaling_support"]["min"] == float((f > 0).sum(0).min())


def test_planted_lifecycle_is_recovered_at_k8():
    """Planted series at K = 8 with every kind (persistent, emerging, dying, rotating, transient, ramp, gap; six
    features each, d = 32): the crosscoder's latents give each feature's onset, offset, transient flag and gap
    count. Measured (seed 0, 1000 steps): all four exact for 0.98 of the features, per kind >= 0.83. At 500 steps
    it was 0.90 on one CPU and 0.88 on another (an AVX-512 one, whose float sums differ), where the transient flags
    fell to 0.67: too near the thresholds, so it trains twice as long. An untrained crosscoder reads every feature
    as present throughout and fails."""
    x, truth = plant_series(n_tokens=32_768, K=8, d=32, per_kind=6, seed=0, kinds=LIFECYCLE_KINDS)
    cc = fit(x, 8, m=128, k=3, steps=1000)
    r = recovery(cc, truth)
    by = r["lifecycle_by_kind"]
    assert r["mean_max_cos"] >= 0.9, r
    assert r["lifecycle_exact"] >= 0.8, by
    assert min(v["all"] for v in by.values()) >= 0.5, by
    assert by["transient"]["transient"] >= 0.8 and by["gap"]["gaps"] >= 0.8 and by["ramp"]["onset"] >= 0.6, by
    fresh = recovery(BatchTopKCrosscoder(8 * 32, 128, n_blocks=8, k=3), truth)["lifecycle_by_kind"]
    for kind in ("emerging", "dying", "transient", "ramp", "gap"):
        assert fresh[kind]["all"] < 0.2, (kind, fresh)


@pytest.mark.parametrize("copy", ["same", "near"])
def test_crosscoder_null_shows_no_development(copy):
    """One checkpoint against itself (its activations twice), and against a near copy (rotated by 0.02 rad with
    its own noise: two checkpoints a few steps apart): every live latent has onset 0, no offset, no transient, no
    gap, and RelDec "shared" at both. Bug caught: a presence or bin rule that reads a change into two equal
    blocks (e.g. presence against the sum of norms, or bins on the wrong axis)."""
    x, truth = plant_series(n_tokens=16_384, K=2, d=24, per_kind=16, seed=1, kinds=("persistent",))
    a = x[:, :24]
    if copy == "same":
        b = a
    else:
        rng = np.random.default_rng(5)
        q, _ = np.linalg.qr(rng.standard_normal((24, 24)))
        rot = np.eye(24) + 0.02 * (q - q.T) / 2  # a small rotation (first order)
        b = (a @ rot + 0.01 * rng.standard_normal(a.shape)).astype(np.float32)
    cc = fit(np.concatenate([a, b], 1), 2, m=64, k=3, steps=300)
    acc = Accumulator(cc, blocks=2)
    acc.add(torch.from_numpy(np.concatenate([a, b], 1)))
    live = acc.fired > 0
    st = decoder_stats(cc)
    assert int(live.sum()) >= 12
    assert (st["onset"][live] == 0).all() and (st["offset"][live] == -1).all()
    assert not st["transient"][live].any() and (st["gaps"][live] == 0).all()
    assert (st["reldec_bin"][live] == 1).all() and (st["pair_bin"][live] == 1).all()
    s = summary(st, torch.ones(cc.d_sae, 2), live, [100, 101], 0.5)
    assert s["shared_by_all"] == 1.0 and s["transient"] == 0.0 and s["with_gaps"] == 0.0

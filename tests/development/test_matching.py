import numpy as np
import pytest
import torch

from sfcd.development.lineage import lineage
from sfcd.development.matching import assign, match_activations, match_decoders
from sfcd.errors import InputError


def test_matching_recovers_a_permutation_of_perturbed_features():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(300, 48, generator=g)
    perm = torch.randperm(300, generator=g)
    W2 = W[perm] + 0.05 * torch.randn(300, 48, generator=g) * W.norm(dim=1, keepdim=True) / 48**0.5
    m = match_decoders(W2, W)
    assert np.array_equal(m.match, perm.numpy())  # feature i of the copy is feature perm[i] of the original
    assert m.shared_fraction() == 1.0 and m.mmcs > 0.95
    # an unrelated SAE shares (almost) nothing
    other = match_decoders(torch.randn(300, 48, generator=g), W)
    assert other.shared_fraction() < 0.05


def test_sparse_assignment_agrees_with_the_hungarian():
    rng = np.random.default_rng(0)
    n_a, n_b = 60, 80
    sims = rng.random((n_a, n_b)) ** 6  # a few high similarities per row
    cols = np.argsort(-sims, 1)[:, :8]  # candidates: the top 8 per row
    rows = np.repeat(np.arange(n_a), 8)
    cols = cols.flatten()
    dense_match, dense_sim = assign(rows, cols, sims[rows, cols], n_a, n_b)  # Hungarian, full matrix
    sparse_match, sparse_sim = assign(rows, cols, sims[rows, cols], n_a, n_b, dense_limit=0)
    assert sparse_sim.sum() == pytest.approx(dense_sim.sum(), abs=1e-9)  # both optimal on the same problem
    assert len(set(sparse_match[sparse_match >= 0])) == (sparse_match >= 0).sum()  # one-to-one


def test_activation_matching():
    g = torch.Generator().manual_seed(1)
    acts = torch.relu(torch.randn(2000, 40, generator=g))
    perm = torch.randperm(40, generator=g)
    m = match_activations(acts[:, perm] * 3 + 0.01 * torch.rand(2000, 40, generator=g), acts)
    assert np.array_equal(m.match, perm.numpy()) and m.shared_fraction() == 1.0
    with pytest.raises(InputError, match="same tokens"):
        match_activations(acts[:10], acts)


def test_width_mismatch_is_an_error():
    with pytest.raises(InputError, match="input widths 8 and 16"):
        match_decoders(torch.randn(4, 8), torch.randn(4, 16))


def test_lineage_births_deaths_splits_and_first_steps():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(6, 32, generator=g)
    new = torch.randn(2, 32, generator=g)
    s0 = base[:4]  # features 0..3
    s1 = torch.cat([base[:4], new[:1]])  # +1 birth
    s2 = torch.cat([base[[0, 1, 3]], new[:1], 0.9 * base[1:2] + 0.1 * new[1:2]])  # feature 2 dies; 1 splits
    ms = [match_decoders(s1, s0), match_decoders(s2, s1)]
    changes, first, persisted = lineage([0, 10, 20], ms, [4, 5, 5])
    assert (changes[0].births, changes[0].deaths) == (1, 0)
    assert changes[1].deaths == 1 and changes[1].splits == 1 and changes[1].merges == 0
    assert first.tolist()[:4] == [0, 0, 0, 10]  # the new feature first appears at step 10
    assert persisted.tolist()[:4] == [True, True, True, False]

"""The noise floor: births, deaths, splits and merges beyond the seed variance, on planted SAE decoders.

A planted "SAE" is a set of true feature directions (each one slightly perturbed per seed), minus the features
this seed missed, plus a few junk directions only this seed learned, plus one feature this seed alone split in
two. The two seeds of one checkpoint never miss the same feature, so every change between checkpoints that is
not planted is seed variance, and the answer is known without the code."""

import numpy as np
import pytest
import torch

from sfcd.development.lineage import beyond_floor, floor, interval
from sfcd.development.matching import match_decoders

D = 64


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def truth(n: int, g: torch.Generator) -> torch.Tensor:
    return unit(torch.randn(n, D, generator=g))


def seed_sae(T: torch.Tensor, g: torch.Generator, drop: list[int], split: int | None, junk: int = 3) -> torch.Tensor:
    """One seed's decoder rows: T's rows (each at cosine ~0.97 to the truth) without ``drop``, ``split`` replaced
    by two rows at cosine 0.86 to it (and 0.47 to each other), and ``junk`` random rows; shuffled."""
    rows = []
    for i, t in enumerate(T):
        if i in drop:
            continue
        t = unit(t + 0.25 * unit(torch.randn(D, generator=g)))
        if i == split:
            u = torch.randn(D, generator=g)
            u = unit(u - (u @ t) * t)
            rows += [unit(t + 0.6 * u), unit(t - 0.6 * u)]
        else:
            rows.append(t)
    rows += list(truth(junk, g))
    W = torch.stack(rows)
    return W[torch.randperm(len(W), generator=g)]


def two_seeds(T: torch.Tensor, g: torch.Generator, persistent: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The two seeds of one checkpoint: each misses 3 persistent features, never the same ones, and splits one."""
    pick = torch.randperm(len(persistent), generator=g)[:8].tolist()
    p = [persistent[i] for i in pick]
    return seed_sae(T, g, p[:3], p[6]), seed_sae(T, g, p[3:6], p[7])


def counts(bf: dict) -> dict:
    return {k: len(v) for k, v in bf.items()}


def raw_births(a1: torch.Tensor, a0: torch.Tensor) -> int:
    """Today's raw count: features of the later SAE with no match >= 0.7 in the earlier one."""
    return int((unit(a1) @ unit(a0).T).max(1).values.lt(0.7).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_checkpoint_against_itself_shows_no_development_beyond_the_floor(seed):
    """Four seeds of one checkpoint, read as two steps: nothing is born, dies, splits or merges beyond the
    floor, while the raw counts of today's lineage report births (the seeds' junk and misses)."""
    g = torch.Generator().manual_seed(seed)
    T = truth(40, g)
    a0, b0 = two_seeds(T, g, list(range(40)))
    a1, b1 = two_seeds(T, g, list(range(40)))
    assert counts(beyond_floor(a0, b0, a1, b1)) == {"births": 0, "deaths": 0, "splits": 0, "merges": 0}
    assert raw_births(a1, a0) >= 3  # at least the later seed's junk: what today's births column reports
    # the two SAEs of one checkpoint as the two steps (A0 = A1, B0 = B1 swapped): nothing either
    assert counts(beyond_floor(a0, b0, b0, a0)) == {"births": 0, "deaths": 0, "splits": 0, "merges": 0}


@pytest.mark.parametrize("seed", [0, 1])
def test_two_nearby_checkpoints_show_no_development_beyond_the_floor(seed):
    """The second checkpoint's features are the first's, each turned slightly (cosine ~0.97), as a few
    training steps do: no births or deaths beyond the floor."""
    g = torch.Generator().manual_seed(10 + seed)
    T0 = truth(40, g)
    T1 = unit(T0 + 0.25 * unit(torch.randn(40, D, generator=g)))
    a0, b0 = two_seeds(T0, g, list(range(40)))
    a1, b1 = two_seeds(T1, g, list(range(40)))
    assert counts(beyond_floor(a0, b0, a1, b1)) == {"births": 0, "deaths": 0, "splits": 0, "merges": 0}
    assert raw_births(a1, a0) >= 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_births_deaths_splits_and_merges_are_counted_exactly(seed):
    """Step 1 drops features 0-4, adds 4 new ones, splits feature 5 in two and merges features 6 and 7 into
    one (both seeds of each step agree on them); seed noise on top. Beyond the floor: exactly those."""
    g = torch.Generator().manual_seed(20 + seed)
    T0 = truth(40, g)
    u = unit(torch.randn(D, generator=g))
    m = T0[6].clone()  # features 6 and 7 of step 0 are m +- 0.6 u'; step 1 has m alone
    u = unit(u - (u @ m) * m)
    T0[7] = unit(m - 0.6 * u)
    T0[6] = unit(m + 0.6 * u)
    v = torch.randn(D, generator=g)
    v = unit(v - (v @ T0[5]) * T0[5])
    new = truth(4, g)
    T1 = torch.cat([T0[8:], new, unit(T0[5] + 0.6 * v)[None], unit(T0[5] - 0.6 * v)[None], m[None]])
    n_old = 40 - 8  # the features of step 0 that step 1 keeps (rows 8.. of T0 are rows 0.. of T1)
    a0, b0 = two_seeds(T0, g, list(range(8, 40)))  # seeds miss and split only persistent features
    a1, b1 = two_seeds(T1, g, list(range(n_old)))
    bf = beyond_floor(a0, b0, a1, b1)
    assert counts(bf) == {"births": 4, "deaths": 5, "splits": 1, "merges": 1}
    # and they are the planted features: born ones point at the new directions, the dead ones at T0[:5]
    cos = lambda W, T: (unit(W) @ T.T).max(1)  # noqa: E731
    assert bool((cos(a1[bf["births"]], new).values > 0.9).all())
    assert sorted(cos(a0[bf["deaths"]], T0[:5]).indices.tolist()) == [0, 1, 2, 3, 4]
    assert cos(a0[bf["splits"]], T0).indices.tolist() == [5]
    assert abs(float(unit(a1[bf["merges"]])[0] @ m)) > 0.9
    assert raw_births(a1, a0) > 4  # the raw count also holds the later seed's junk and the features A0 missed


def test_floor_counts_one_checkpoints_two_seeds_with_an_interval():
    """The floor between two planted seeds: A's births are its 3 junk rows plus the 3 features B missed
    (A's split rows have their parent in B); B's deaths likewise; A's one split feature is one merge seen from
    B (two of A's rows each match B's one), and B's split is a split of A... and the intervals hold them."""
    g = torch.Generator().manual_seed(3)
    T = truth(40, g)
    a = seed_sae(T, g, drop=[0, 1, 2], split=10)
    b = seed_sae(T, g, drop=[3, 4, 5], split=11)
    m = match_decoders(a, b)
    f = floor(a, b, m.sim)
    assert (f["births"], f["deaths"], f["splits"], f["merges"]) == (6, 6, 1, 1)
    assert f["n_a"] == 40 - 3 + 1 + 3 and f["n_b"] == 41
    # one-to-one shared: every A row whose feature B has, except one of A's two split halves
    assert f["shared"] == pytest.approx((37 - 3 - 1) / 41, abs=1 / 41)
    for k in ("births", "deaths", "splits", "merges", "shared"):
        assert f[f"{k}_lo"] <= f[k] <= f[f"{k}_hi"]
    assert f["births_hi"] > f["births"] > f["births_lo"]  # a real interval, not a point


def test_the_interval_is_the_bootstrap_over_features():
    """Against an independent bootstrap: resample 500 features with replacement, count the marked ones."""
    rng = np.random.default_rng(0)
    marked = np.zeros(500, dtype=bool)
    marked[:40] = True
    boot = [marked[rng.integers(0, 500, 500)].sum() for _ in range(4000)]
    lo, hi = interval(40, 500)
    assert abs(lo - np.quantile(boot, 0.025)) <= 1 and abs(hi - np.quantile(boot, 0.975)) <= 1


def test_a_split_or_merge_one_seed_already_shows_is_not_counted():
    """Feature g is split in two at step 1 by both seeds, but one seed of step 0 had already split it the same
    way; features h1, h2 merge into m in one seed of step 1, the other keeps them apart: seed variance, so
    neither counts (while both seeds of step 1 agree on the split and both of step 0 hold h1 and h2)."""
    g = torch.Generator().manual_seed(5)
    T = truth(30, g)
    v = torch.randn(D, generator=g)
    v = unit(v - (v @ T[0]) * T[0])
    halves = torch.stack([unit(T[0] + 0.6 * v), unit(T[0] - 0.6 * v)])
    m = T[1]
    u = torch.randn(D, generator=g)
    u = unit(u - (u @ m) * m)
    pair = torch.stack([unit(m + 0.6 * u), unit(m - 0.6 * u)])
    rest = T[2:]
    a0 = torch.cat([T[:1], pair, rest])
    b0 = torch.cat([halves, pair, rest])  # this seed already split feature 0
    a1 = torch.cat([halves, m[None], rest])  # this seed merged the pair
    b1 = torch.cat([halves, pair, rest])
    assert counts(beyond_floor(a0, b0, a1, b1)) == {"births": 0, "deaths": 0, "splits": 0, "merges": 0}
    # the same, with both seeds agreeing at both steps: one split and one merge
    assert counts(beyond_floor(a0, torch.cat([T[:1], pair, rest]), a1, torch.cat([halves, m[None], rest]))) == {
        "births": 0,
        "deaths": 0,
        "splits": 1,
        "merges": 1,
    }


def test_presence_is_exact_across_tiles():
    """Against a direct computation of the full cosine matrix; tiles of 7 x 50 force several blocks."""
    from sfcd.development.matching import presence

    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(23, 8, generator=g), torch.randn(50, 8, generator=g)
    b[:5] = a[:5] + 0.1 * torch.randn(5, 8, generator=g)  # a few pairs above 0.7
    s = unit(a) @ unit(b).T
    p = presence(a, b, threshold=0.7, tile=7 * 50)
    assert np.allclose(p.best_a, s.max(1).values, atol=1e-6) and np.allclose(p.best_b, s.max(0).values, atol=1e-6)
    assert p.count_a.tolist() == (s >= 0.7).sum(1).tolist() and p.count_b.tolist() == (s >= 0.7).sum(0).tolist()
    assert p.count_a.sum() >= 5


def test_the_null_pairs_the_seeds_across_the_steps():
    """Feature 0 is missed by the main SAE at both steps and learned by both second seeds: no change (each step
    has it), but the crossed pairing (a0, a1) -> (b0, b1) sees it born, as seed variance can make a birth.
    Feature 1 is born for real (both seeds of step 1, neither of step 0): counted, and in no crossed pairing."""
    g = torch.Generator().manual_seed(11)
    T = truth(20, g)
    a0, b0 = T[2:], torch.cat([T[:1], T[2:]])
    a1, b1 = torch.cat([T[1:2], T[2:]]), T
    bf = beyond_floor(a0, b0, a1, b1, null=True)
    assert len(bf["births"]) == 1 and unit(a1[bf["births"]])[0] @ T[1] > 0.99
    # pairings: (a0, a1) -> (b0, b1), (a0, b1) -> (b0, a1), (b0, b1) -> (a0, a1), (b0, a1) -> (a0, b1)
    assert bf["null"]["births"] == [1, 0, 0, 0] and bf["null"]["deaths"] == [0, 0, 1, 0]
    assert bf["null"]["splits"] == bf["null"]["merges"] == [0, 0, 0, 0]

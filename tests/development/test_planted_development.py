"""Scoring against a planted construction (sfcd/development/groundtruth.py) on dictionaries whose answer is known by
construction: which latents are the construction's at a checkpoint, where their lineage begins, and the onset.

The dictionaries are hand-made (a latent fires on a chosen set of tokens), so the right answer is known without
any training: before the planted step the construction's words have only a token latent of one untrained word
(what an SAE fitted on a model that never saw them can hold), after it a latent shared by all of its words.
"""

from __future__ import annotations

import numpy as np
import torch

from sfcd.development import groundtruth as G
from sfcd.development.findings import first_steps
from sfcd.development.matching import Matching

VOCAB = 40
PLANTED = list(range(30, 36))
CONTROL = list(range(20, 26))
OTHER = list(range(2, 20))


def _dictionary(latents: list[list[int]]):
    """encode(one-hot token) = 1 on each latent's tokens."""
    w = torch.zeros(VOCAB, len(latents))
    for j, toks in enumerate(latents):
        w[toks, j] = 1.0
    return lambda a: torch.relu(a @ w)


def _batches(seed: int, n: int = 4000, batch: int = 500):
    g = np.random.default_rng(seed)
    # a corpus where each construction's words are 10% of the tokens
    pool = OTHER * 8 + PLANTED * 3 + CONTROL * 3 + [0, 1]
    toks = torch.from_numpy(g.choice(pool, n)).long()
    keep = toks > 1  # BOS/EOS left out, as G.stream leaves them out
    toks = toks[keep]
    for b in range(0, len(toks), batch):
        t = toks[b : b + batch]
        yield torch.nn.functional.one_hot(t, VOCAB).float(), t


KINDS = {"planted": PLANTED, "control": CONTROL}
# before S: a control class latent, a token latent of one untrained planted word, a latent on everything
BEFORE = [CONTROL, [PLANTED[0]], OTHER + PLANTED + CONTROL, OTHER[:6]]
# after S: the same, and a latent shared by the planted words
AFTER = [CONTROL, PLANTED, OTHER + PLANTED + CONTROL, OTHER[:6]]


def test_construction_latents_need_several_of_its_words():
    # catches: the precision rule alone (a token latent of one untrained word counted as the construction's
    # feature before it entered training), a latent on everything counted (precision ignored), recall ignored
    before = G.concentration(_dictionary(BEFORE), _batches(0), KINDS)
    after = G.concentration(_dictionary(AFTER), _batches(1), KINDS)
    assert before.features("planted") == []
    assert before.summary("planted")["token_features"] == 1  # latent 1: concentrated, but one word only
    assert after.features("planted") == [1]
    assert before.features("control") == after.features("control") == [0]
    # precision and recall against a count by hand: latent 2 fires on every non-special token
    p, r = after.scores("planted")
    toks = torch.cat([t for _, t in _batches(1)])
    share = np.isin(toks.numpy(), PLANTED).mean()
    assert abs(p[2] - share) < 1e-9 and r[2] == 1.0 and r[3] == 0.0 and p[1] == 1.0
    assert after.words("planted")[1] == len(PLANTED) and before.words("planted")[1] == 1


def test_lineage_and_onset_date_the_first_checkpoint_after_the_step():
    # catches: a lineage that walks through a match below the threshold, or stops one step early/late; an onset
    # that takes the first present step even when absent later; first_after taking checkpoint S itself (it has
    # seen only steps 0..S-1)
    steps = [10, 20, 30]
    assert G.first_after(steps, 20) == 30 and G.first_after(steps, 19) == 20 and G.first_after(steps, 30) is None
    assert G.onset(steps, [True, False, True]) == 30 and G.onset(steps, [False, True, True]) == 20
    assert G.onset(steps, [True, True, False]) is None

    def m(match, sim):
        match, sim = np.array(match), np.array(sim, dtype=float)
        return Matching(match, sim, sim, (np.arange(len(match)), match, sim))

    # matchings[k]: steps[k+1] -> steps[k]; feature 0 carried throughout, 1 new at 30, 2 matched weakly at 20
    ms = [m([0, 1, 2], [0.9, 0.9, 0.5]), m([0, -1, 2], [0.95, 0.0, 0.8])]
    assert first_steps(steps, ms, [0, 1, 2], 0.7) == [10, 30, 20]

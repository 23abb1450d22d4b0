"""Scoring against a planted construction (sfcd/development/groundtruth.py) on dictionaries whose answer is known by
construction: which latents are the construction's at a checkpoint, where their lineage begins, and the onset.

The dictionaries are hand-made (a latent fires on a chosen set of tokens), and so are the model's activations
(each token its own direction, plus, for the words of a learned construction, a direction of their class), so the
right answer is known without any training: before the planted step the construction's words have only latents a
model that never saw them can give (a token latent of one untrained word, one on all of its words alike, one on
words that share no direction), after it latents on classes of its words that share one.
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
    """encode(activation) = 1 on each latent's tokens (read from the activation's one-hot part)."""
    w = torch.zeros(VOCAB, len(latents))
    for j, toks in enumerate(latents):
        w[toks, j] = 1.0
    return lambda a: torch.relu(a[:, :VOCAB] @ w)


# a learned word's class direction: (noun, verb, number) with the number a smaller part (cosine 0.6 between a
# construction's singular and plural nouns, 0 between its nouns and verbs)
CLASS_DIRECTION = {
    "noun.singular": (2.0, 0.0, 1.0),
    "noun.plural": (2.0, 0.0, -1.0),
    "verb.singular": (0.0, 2.0, 1.0),
    "verb.plural": (0.0, 2.0, -1.0),
}


def _batches(seed: int, n: int = 4000, batch: int = 500, learned: tuple[str, ...] = ("control",)):
    """(activations, token ids): a one-hot token plus, for the words of the ``learned`` constructions, their
    class's direction (three dimensions per construction, scaled to dominate the one-hot part)."""
    table = torch.zeros(VOCAB, VOCAB + 6)
    table[:, :VOCAB] = torch.eye(VOCAB)
    for i, kind in enumerate(("planted", "control")):
        if kind in learned:
            for tok, c in zip(KINDS[kind], ROLES, strict=True):
                table[tok, VOCAB + 3 * i : VOCAB + 3 * i + 3] = 3 * torch.tensor(CLASS_DIRECTION[c])
    g = np.random.default_rng(seed)
    # a corpus where each construction's words are 10% of the tokens
    pool = OTHER * 8 + PLANTED * 3 + CONTROL * 3 + [0, 1]
    toks = torch.from_numpy(g.choice(pool, n)).long()
    keep = toks > 1  # BOS/EOS left out, as G.stream leaves them out
    toks = toks[keep]
    for b in range(0, len(toks), batch):
        t = toks[b : b + batch]
        yield table[t], t


KINDS = {"planted": PLANTED, "control": CONTROL}
# each construction's words: two nouns (both numbers) and one verb (both forms), as sfcd.data.planted orders them
ROLES = ["noun.singular", "noun.plural"] * 2 + ["verb.singular", "verb.plural"]
CLASSES = {"planted": ROLES, "control": ROLES}
# before S: a control latent on its nouns, a token latent of one untrained planted word, a latent on everything,
# one on other words, one on every planted word alike (the never-seen token an untrained embedding gives), and
# one on its plural nouns, which before S share no direction (two random embeddings)
BEFORE = [CONTROL[:4], [PLANTED[0]], OTHER + PLANTED + CONTROL, OTHER[:6], PLANTED, [PLANTED[1], PLANTED[3]]]
# after S: the same, with a latent on the planted nouns in place of the token latent (what training on it teaches)
AFTER = [CONTROL[:4], PLANTED[:4], OTHER + PLANTED + CONTROL, OTHER[:6], PLANTED, [PLANTED[1], PLANTED[3]]]


def test_construction_latents_need_several_of_its_words_and_its_structure():
    # catches: the precision rule alone (a token latent of one untrained word counted as the construction's
    # feature before it entered training), a latent on everything counted (precision ignored), recall ignored,
    # the never-seen-token latent (on all of its words alike) counted, a structure rule that needs every class
    before = G.concentration(_dictionary(BEFORE), _batches(0), KINDS, CLASSES)
    after = G.concentration(_dictionary(AFTER), _batches(1, learned=("planted", "control")), KINDS, CLASSES)
    assert before.features("planted") == []
    s = before.summary("planted")
    # latents 1, 4 and 5 are concentrated; 4 is on every class alike, 5 on words that share no direction
    assert s["token_features"] == 3 and s["unstructured_features"] == 1 and s["incoherent_features"] == 1
    assert after.features("planted") == [1, 5]  # the nouns (cosine 0.6 across numbers), the plural nouns
    assert before.features("control") == after.features("control") == [0]
    # without classes and activations both rules are off: the never-seen-token latent and the one on two random
    # words pass the others
    assert before.coherence("planted")[4] < 0.5
    bare, enc = G.Concentration(KINDS, "cpu"), _dictionary(BEFORE)
    for a, t in _batches(0):
        bare.add(enc(a), t)
    assert bare.features("planted") == [4, 5]
    # precision and recall against a count by hand: latent 2 fires on every non-special token
    p, r = after.scores("planted")
    toks = torch.cat([t for _, t in _batches(1, learned=("planted", "control"))])
    share = np.isin(toks.numpy(), PLANTED).mean()
    assert abs(p[2] - share) < 1e-9 and r[2] == 1.0 and r[3] == 0.0 and p[1] == 1.0
    assert after.words("planted")[1] == 4 and before.words("planted")[1] == 1 and before.words("planted")[4] == 6
    # coherence against the cosines written out: nouns' pairs are 2 same-class (cosine ~1) and 4 across numbers
    coh = after.coherence("planted")
    assert abs(coh[1] - (2 * 1.0 + 4 * 0.6) / 6) < 0.05 and coh[5] > 0.95 and np.isnan(coh[3])


def test_word_classes_follow_the_sentences():
    # catches: classes out of step with own_words, or verb classes swapped (the structure rule would read roles
    # and numbers from the wrong words): read from the sentences the corpus generates, the subject noun's number
    # is the verb's
    import random

    from sfcd.data.planted import own_words, sentence, word_classes

    rng = random.Random(0)
    for kind in ("planted", "control"):
        cls = dict(zip(own_words(kind), word_classes(kind), strict=True))
        seen = set()
        for _ in range(200):
            w = sentence(rng, kind).rstrip(".").split()
            noun, verb = w[1], w[-2]  # The N [P the N2] V C
            assert cls[noun].startswith("noun.") and cls[verb].startswith("verb.")
            assert cls[noun].split(".")[1] == cls[verb].split(".")[1], (noun, verb)
            seen |= {noun, verb}
        assert seen == set(own_words(kind))


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

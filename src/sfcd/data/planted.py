"""A planted developmental ground truth: a construction that enters the training batches at a chosen step.

Two agreement constructions of one kind, each with its own nouns and verbs (made-up words that no other
sentence kind, and no copy span, ever emits):

``planted``  The N [P the N2] V C.   N and V from :data:`~sfcd.data.vocab.PLANTED_NOUNS`/``PLANTED_VERBS``
``control``  The N [P the N2] V C.   the same with ``CONTROL_NOUNS``/``CONTROL_VERBS``

V agrees with N. With ``corpus.planted.step=S`` the corpus stage writes two training token files: ``train.tokens``
(every kind, the planted construction included: what the model trains on from step S, and what every later
stage harvests, so the SAEs of every checkpoint see the same tokens) and ``train_before.tokens`` (the same
generator without the planted construction: what the model trains on before S). The control has the same share
of sentences in both files (the other kinds take the planted share before S), so nothing about it changes at S.
Each construction gets a task (``planted``, ``control``: the nounpp template, the construction's own answer
verbs), scored in the train log.
"""

from __future__ import annotations

import random

from sfcd.data import vocab as V

KINDS = ("planted", "control")
CONSTRUCTIONS = ("agreement",)
#: the task files written for the planted constructions (the same names as the kinds)
TASKS = KINDS


def _words(kind: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    if kind == "planted":
        return V.PLANTED_NOUNS, V.PLANTED_VERBS
    if kind == "control":
        return V.CONTROL_NOUNS, V.CONTROL_VERBS
    raise ValueError(f"unknown planted kind {kind!r}; expected one of {KINDS}")


def own_words(kind: str) -> list[str]:
    """The construction's own words (nouns and verbs, both numbers): none of them occurs anywhere else."""
    nouns, verbs = _words(kind)
    return [w for pair in (*nouns, *verbs) for w in pair]


def word_classes(kind: str) -> list[str]:
    """The role and number of each of :func:`own_words` (same order): ``noun.singular``, ``noun.plural``,
    ``verb.singular`` (the form after a singular noun, ``blicks``), ``verb.plural``."""
    nouns, verbs = _words(kind)
    roles = (("noun", nouns), ("verb", verbs))
    return [f"{role}.{n}" for role, pairs in roles for _ in pairs for n in ("singular", "plural")]


def own_token_ids(tokenizer, kind: str) -> list[int]:
    """The token ids of ``kind``'s own words as they occur in text (after a space); each must be one token."""
    ids = []
    for w in own_words(kind):
        enc = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            from sfcd.errors import InputError

            raise InputError(
                f"the planted word {w!r} is {len(enc)} tokens with this tokenizer, expected one; "
                "use the corpus's own tokenizer (corpus.tokenizer unset) or raise corpus.vocab_size"
            )
        ids.append(enc[0])
    return ids


def sentence(rng: random.Random, kind: str) -> str:
    """One sentence of the ``kind`` construction: ``The N [P the N2] V C.`` with V agreeing with N."""
    nouns, verbs = _words(kind)
    n = rng.randrange(2)
    head = f"The {rng.choice(nouns)[n]}"
    if rng.random() < 0.5:
        head += f" {rng.choice(V.PREPOSITIONS)} the {rng.choice(V.PP_NOUNS)[rng.randrange(2)]}"
    return f"{head} {rng.choice(verbs)[n]} {rng.choice(V.PLANTED_COMPLEMENTS)}."


def mixtures(mixture: dict[str, float], weight: float, control_weight: float) -> tuple[dict, dict]:
    """The sentence mixtures (before the planted step, from it on): the control's share is the same in both;
    before the step, the built-in kinds take the planted construction's share in their own proportions."""
    base = sum(w for w in mixture.values() if w > 0)
    if base <= 0:
        raise ValueError("the corpus mixture has no positive weight")
    after = {**mixture, "planted": weight, "control": control_weight}
    before = {k: w * (base + weight) / base for k, w in mixture.items()} | {"control": control_weight}
    return before, after


def task_pairs(kind: str, n: int, seed: int) -> list[dict[str, str]]:
    """Up to ``n`` distinct pairs of the construction's task: ``The N P the N2`` -> V (agreeing with N), the
    patch flips N's number (the nounpp template, with the construction's own nouns and answer verbs)."""
    nouns, verbs = _words(kind)
    rng = random.Random(f"{seed}:{kind}")
    seen: dict[tuple[str, str], dict[str, str]] = {}
    tries = 0
    while len(seen) < n and tries < 50 * n:
        tries += 1
        noun, verb, n1, n2 = rng.choice(nouns), rng.choice(verbs), rng.randrange(2), rng.randrange(2)
        tail = f" {rng.choice(V.PREPOSITIONS)} the {rng.choice(V.PP_NOUNS)[n2]}"
        p = dict(
            clean_prefix=f"The {noun[n1]}{tail}",
            patch_prefix=f"The {noun[1 - n1]}{tail}",
            clean_answer=" " + verb[n1],
            patch_answer=" " + verb[1 - n1],
            case=f"{('singular', 'plural')[n1]}_{('singular', 'plural')[n2]}",
        )
        seen.setdefault((p["clean_prefix"], p["clean_answer"]), p)
    return list(seen.values())
